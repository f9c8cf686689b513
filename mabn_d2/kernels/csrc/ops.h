// The ops of the C++ backend, registered as torch.ops.mabn_d2.* in ops.cpp. For contiguous
// (N, C, H, W) CPU tensors of float32 / float64 / float16 / bfloat16:
//
//   second_moment(x)          -> mean over N, H, W of x^2                  (C,)  one read
//   channel_affine(x, a, b)   -> a[c] * x + b[c]                        (N,C,H,W)  read + write
//   grad_reductions(dy, x)    -> (sum dy, sum dy * x) over N, H, W       2 x (C,)  two reads
//   grad_input(dy, x, a, b)   -> a[c] * dy + b[c] * x                   (N,C,H,W)  2 reads + write
//
// (kernels.cpp), and the fused training step, train_forward / train_backward (fused_step.cpp):
// the statistics, the step's per-channel arithmetic and the output of a whole layer in one op
// per direction. The output cache's and the streaming stores' settings are in output_cache.h
// and output.h.
//
// Arithmetic is in float32 for 16/32-bit inputs (float64 for float64); per-channel sums are
// accumulated in float64 across planes, so x^2 of half inputs never overflows and large
// tensors do not lose precision. Every reduction adds its partial sums in an order that does
// not depend on the thread count: results are deterministic (a resumed run continues bit for
// bit).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace mabn_d2 {

using at::Tensor;

// kernels.cpp
Tensor second_moment(const Tensor& x, at::ScalarType out_dtype);
Tensor channel_affine(const Tensor& x, const Tensor& scale, const Tensor& shift);
std::tuple<Tensor, Tensor> grad_reductions(const Tensor& dy, const Tensor& x,
                                           at::ScalarType out_dtype);
Tensor grad_input(const Tensor& dy, const Tensor& x, const Tensor& a_t, const Tensor& b_t);

// fused_step.cpp: returns (y, inv_std, r, finite); updates running and chi2_buffer[slot].
std::tuple<Tensor, Tensor, Tensor, Tensor> train_forward(
    const Tensor& x, const Tensor& weight, const Tensor& bias, Tensor& running,
    Tensor& chi2_buffer, int64_t slot, bool use_batch_stats, bool renorm, double renorm_clip,
    double momentum, double eps);
// Returns (dx, dweight, dbias), dx empty unless input_grad; updates psi_buffer[slot].
std::tuple<Tensor, Tensor, Tensor> train_backward(const Tensor& dy, const Tensor& x,
                                                  const Tensor& weight, const Tensor& inv_std_t,
                                                  const Tensor& r_t, Tensor& psi_buffer,
                                                  int64_t slot, bool use_batch_stats,
                                                  bool forward_finite, bool input_grad);

}  // namespace mabn_d2
