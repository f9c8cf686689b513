// Registers the C++ backend's ops with the dispatcher as torch.ops.mabn_d2.* (no pybind11
// module, which keeps the JIT compile short). The only translation unit that includes
// torch/library.h.
#include "ops.h"

#include "output.h"
#include "output_cache.h"

#include <torch/library.h>

TORCH_LIBRARY(mabn_d2, m) {
  m.def("second_moment(Tensor x, ScalarType out_dtype) -> Tensor");
  m.def("channel_affine(Tensor x, Tensor scale, Tensor shift) -> Tensor");
  m.def("grad_reductions(Tensor dy, Tensor x, ScalarType out_dtype) -> (Tensor, Tensor)");
  m.def("grad_input(Tensor dy, Tensor x, Tensor a, Tensor b) -> Tensor");
  m.def(
      "train_forward(Tensor x, Tensor weight, Tensor bias, Tensor(a!) running, "
      "Tensor(b!) chi2_buffer, int slot, bool use_batch_stats, bool renorm, float renorm_clip, "
      "float momentum, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "train_backward(Tensor dy, Tensor x, Tensor weight, Tensor inv_std, Tensor r, "
      "Tensor(a!) psi_buffer, int slot, bool use_batch_stats, bool forward_finite, "
      "bool input_grad) -> (Tensor, Tensor, Tensor)");
  m.def("set_output_cache_limit(int bytes) -> ()", &mabn_d2::set_output_cache_limit);
  m.def("output_cache_stats() -> int[]", &mabn_d2::output_cache_stats);
  m.def("empty_output_cache() -> ()", &mabn_d2::empty_output_cache);
  m.def("set_streaming(int mode) -> ()", &mabn_d2::set_streaming);
}

TORCH_LIBRARY_IMPL(mabn_d2, CPU, m) {
  m.impl("second_moment", &mabn_d2::second_moment);
  m.impl("channel_affine", &mabn_d2::channel_affine);
  m.impl("grad_reductions", &mabn_d2::grad_reductions);
  m.impl("grad_input", &mabn_d2::grad_input);
  m.impl("train_forward", &mabn_d2::train_forward);
  m.impl("train_backward", &mabn_d2::train_backward);
}
