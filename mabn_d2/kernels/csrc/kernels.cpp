// The four separate kernels, one pass over activation memory each (the interface of
// mabn_d2.kernels; the fused step in fused_step.cpp does a training step in fewer passes).
// Reductions split the work into a fixed number of chunks whatever the thread count and add
// the chunks' partial sums in order: results are deterministic.
#include "ops.h"

#include "common.h"
#include "output.h"
#include "simd.h"

#include <ATen/Dispatch.h>

namespace mabn_d2 {
namespace {

void check_coefficient(const Tensor& v, const Tensor& like, const char* name) {
  TORCH_CHECK(v.device().is_cpu() && v.dim() == 1 && v.size(0) == like.size(1),
              "mabn_d2 CPU kernels: ", name, " must be a CPU tensor of shape (",
              like.size(1), ",), got ", v.sizes());
}

// Per-channel coefficient vector in the accumulation dtype.
template <typename acc_t>
std::vector<acc_t> coefficient(const Tensor& v) {
  const Tensor c = v.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* p = c.data_ptr<acc_t>();
  return std::vector<acc_t>(p, p + c.numel());
}

}  // namespace

Tensor second_moment(const Tensor& x, at::ScalarType out_dtype) {
  check_input(x, "x");
  const Layout lay(x);
  const int64_t count = x.numel() / lay.channels;
  Tensor out = empty_tensor({lay.channels}, x.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mabn_second_moment",
                                  [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const auto sums = chunked_channel_sums<acc_t>(lay, 1, [&](int64_t b, int64_t e, acc_t* s) {
      s[0] = sum_squares<scalar_t, acc_t>(px + b, e - b);
    });
    Tensor mean = empty_tensor({lay.channels}, x.options().dtype(at::kDouble));
    double* pm = mean.data_ptr<double>();
    for (int64_t c = 0; c < lay.channels; ++c) pm[c] = count ? sums[c] / count : 0.0;
    out.copy_(mean);
  });
  return out;
}

Tensor channel_affine(const Tensor& x, const Tensor& scale, const Tensor& shift) {
  check_input(x, "x");
  check_coefficient(scale, x, "scale");
  check_coefficient(shift, x, "shift");
  const Layout lay(x);
  const Output out = new_output(x);
  const Tensor& y = out.tensor;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mabn_channel_affine",
                                  [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const auto a = coefficient<acc_t>(scale), b = coefficient<acc_t>(shift);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* py = y.data_ptr<scalar_t>();
    for_each_unit(lay, [&](int64_t c, int64_t begin, int64_t end) {
      affine_any<scalar_t, acc_t>(px + begin, py + begin, end - begin, a[c], b[c], out.stream);
    });
  });
  return y;
}

std::tuple<Tensor, Tensor> grad_reductions(const Tensor& dy, const Tensor& x,
                                           at::ScalarType out_dtype) {
  check_pair(dy, x);
  const Layout lay(x);
  Tensor both = empty_tensor({2, lay.channels}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "mabn_grad_reductions", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const auto sums = chunked_channel_sums<acc_t>(lay, 2, [&](int64_t b, int64_t e, acc_t* s) {
      sum_and_dot<scalar_t, acc_t>(pdy + b, px + b, e - b, s);
    });
    double* pb = both.data_ptr<double>();
    for (int64_t c = 0; c < lay.channels; ++c) {
      pb[c] = sums[2 * c];
      pb[lay.channels + c] = sums[2 * c + 1];
    }
  });
  Tensor out = both.to(out_dtype);
  return {out[0], out[1]};
}

Tensor grad_input(const Tensor& dy, const Tensor& x, const Tensor& a_t, const Tensor& b_t) {
  check_pair(dy, x);
  check_coefficient(a_t, x, "a");
  check_coefficient(b_t, x, "b");
  const Layout lay(x);
  const Output out = new_output(x);
  const Tensor& dx = out.tensor;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mabn_grad_input",
                                  [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const auto a = coefficient<acc_t>(a_t), b = coefficient<acc_t>(b_t);
    const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* pdx = dx.data_ptr<scalar_t>();
    for_each_unit(lay, [&](int64_t c, int64_t begin, int64_t end) {
      axpby_any<scalar_t, acc_t>(pdy + begin, px + begin, pdx + begin, end - begin, a[c], b[c],
                                 out.stream);
    });
  });
  return dx;
}

}  // namespace mabn_d2
