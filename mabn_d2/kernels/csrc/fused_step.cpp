// The fused training step: statistics, schedule and output of one layer in one op per
// direction (train_forward / train_backward).
//
// Every coefficient of channel c depends on channel c's statistics only, so each thread takes
// whole channels: it reduces a channel's planes and, while they are still in its cache, makes
// that channel's output from them. Activation memory is then read once and written once in
// forward (x -> y; three passes with the separate kernels) and read once per input in backward
// (dy, x -> dx; five passes separately). The per-channel arithmetic follows
// mabn_d2/layer/functional.py operation by operation in the statistics dtype.
//
// The one cross-channel rule -- a step whose statistics are not all finite leaves the moving
// averages as they were, and then normalises with the old average -- is applied after the
// channel loop: in that (rare) case the output pass is redone with the kept average.
#include "ops.h"

#include "common.h"
#include "output.h"
#include "simd.h"

#include <ATen/Dispatch.h>

#include <cmath>

namespace mabn_d2 {
namespace {

// Channel by channel only where a channel's memory is a few long runs: a channel of many short
// planes (RoI heads: 1024 planes of 7 x 7) is spread over as many pages as it has planes, which
// defeats the prefetchers and the TLB (docs/speed.md). Those go through memory in order
// instead, in separate passes (the statistics, then the output), still in one op.
constexpr int64_t kChannelwiseMinPlane = 1024;
constexpr int64_t kChannelwiseMaxBatch = 8;

bool channelwise(const Layout& lay) {
  return lay.plane >= kChannelwiseMinPlane || lay.batch <= kChannelwiseMaxBatch;
}

// Segments [begin, end) of channel c's planes, in memory order.
template <typename Body>
void channel_segments(const Layout& lay, int64_t c, const Body& body) {
  for (int64_t n = 0; n < lay.batch; ++n) {
    const int64_t base = (n * lay.channels + c) * lay.plane;
    for (int64_t s = 0; s < lay.plane; s += kSegment) {
      body(base + s, base + std::min(lay.plane, s + kSegment));
    }
  }
}

// body(c) for every channel, whole channels per thread.
template <typename Body>
void for_each_channel(const Layout& lay, const Body& body) {
  const int64_t per_channel = std::max<int64_t>(1, lay.batch * lay.plane);
  const int64_t grain = std::max<int64_t>(1, kParallelMin / per_channel);
  at::parallel_for(0, lay.channels, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) body(c);
  });
}

// Mean over the m slots of a moving-average buffer (m, C), with slot `slot` holding `newest`.
template <typename stat_t>
stat_t moving_mean(const stat_t* buffer, int64_t m, int64_t channels, int64_t c, int64_t slot,
                   stat_t newest) {
  double s = 0;
  for (int64_t k = 0; k < m; ++k) s += k == slot ? newest : buffer[k * channels + c];
  return static_cast<stat_t>(s / static_cast<double>(m));
}

struct StepSchedule {
  int64_t slot;
  bool use_batch_stats;
  bool renorm;
  double renorm_clip;
  double momentum;
  double eps;
};

template <typename stat_t>
struct ForwardCoefficients {
  stat_t inv_std, r;
};

// inv_std = rsqrt(var + eps); r = clamp(rsqrt(running + eps) / inv_std, 1 / clip, clip).
template <typename stat_t>
ForwardCoefficients<stat_t> forward_coefficients(stat_t var, stat_t running,
                                                 const StepSchedule& st) {
  const stat_t eps = static_cast<stat_t>(st.eps);
  const stat_t inv_std = stat_t(1) / std::sqrt(var + eps);
  stat_t r = 1;
  if (st.renorm) {
    r = (stat_t(1) / std::sqrt(running + eps)) / inv_std;
    r = std::min(std::max(r, static_cast<stat_t>(1.0 / st.renorm_clip)),
                 static_cast<stat_t>(st.renorm_clip));
  }
  return {inv_std, r};
}

// torch.lerp(start, end, weight).
template <typename stat_t>
stat_t lerp(stat_t start, stat_t end, stat_t weight) {
  return weight < stat_t(0.5) ? start + weight * (end - start)
                              : end - (end - start) * (stat_t(1) - weight);
}

// A per-channel vector (C,) or, with `buffer`, a moving-average buffer (m, C), in `dtype`.
void check_state(const Tensor& t, const Tensor& x, at::ScalarType dtype, const char* name,
                 bool buffer = false) {
  const bool shape_ok = buffer ? (t.dim() == 2 && t.size(0) > 0 && t.size(1) == x.size(1))
                               : (t.dim() == 1 && t.size(0) == x.size(1));
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dtype && shape_ok,
              "mabn_d2 fused step: ", name, " must be a contiguous CPU ", dtype, " tensor of ",
              buffer ? "shape (m, C)" : "shape (C,)", " with C = ", x.size(1), ", got ",
              t.scalar_type(), " ", t.sizes());
}

// Checks a moving-average buffer (m, C), its slot and the input; returns m.
int64_t check_buffer_slot(const Tensor& buffer, const Tensor& x, at::ScalarType dtype,
                          const char* name, int64_t slot) {
  check_state(buffer, x, dtype, name, true);
  const int64_t m = buffer.size(0);
  TORCH_CHECK(slot >= 0 && slot < m, "mabn_d2 fused step: slot ", slot, " outside [0, ", m, ")");
  TORCH_CHECK(x.numel() > 0, "mabn_d2 fused step: empty input");
  return m;
}

at::ScalarType stats_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> train_forward(
    const Tensor& x, const Tensor& weight, const Tensor& bias, Tensor& running,
    Tensor& chi2_buffer, int64_t slot, bool use_batch_stats, bool renorm, double renorm_clip,
    double momentum, double eps) {
  check_input(x, "x");
  const at::ScalarType sdtype = stats_type(x);
  check_state(weight, x, sdtype, "weight");
  check_state(bias, x, sdtype, "bias");
  check_state(running, x, sdtype, "running_second_moment");
  const int64_t m = check_buffer_slot(chi2_buffer, x, sdtype, "chi2_buffer", slot);
  const StepSchedule st{slot, use_batch_stats, renorm, renorm_clip, momentum, eps};
  const Layout lay(x);
  const int64_t C = lay.channels, count = lay.batch * lay.plane;
  const Output out = new_output(x);
  const Tensor& y = out.tensor;
  Tensor inv_std_t = empty_tensor({C}, running.options());
  Tensor r_t = empty_tensor({C}, running.options());
  Tensor chi2_t = empty_tensor({C}, running.options());
  bool finite = true, redo = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mabn_train_forward",
                                  [&] {
    using acc_t = typename Acc<scalar_t>::type;  // also the statistics type
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* py = y.data_ptr<scalar_t>();
    const acc_t* w = weight.const_data_ptr<acc_t>();
    const acc_t* b = bias.const_data_ptr<acc_t>();
    acc_t* run = running.data_ptr<acc_t>();
    acc_t* buf = chi2_buffer.data_ptr<acc_t>();
    acc_t* chi2 = chi2_t.data_ptr<acc_t>();
    acc_t* inv_std = inv_std_t.data_ptr<acc_t>();
    acc_t* r = r_t.data_ptr<acc_t>();
    const bool stream = out.stream;
    auto coefficients = [&](int64_t c, acc_t newest) {
      const acc_t var = st.use_batch_stats ? chi2[c] : moving_mean(buf, m, C, c, slot, newest);
      const auto k = forward_coefficients(var, run[c], st);
      inv_std[c] = k.inv_std;
      r[c] = k.r;
    };
    if (channelwise(lay)) {
      for_each_channel(lay, [&](int64_t c) {
        double s = 0;
        channel_segments(lay, c, [&](int64_t b0, int64_t b1) {
          s += static_cast<double>(sum_squares<scalar_t, acc_t>(px + b0, b1 - b0));
        });
        chi2[c] = static_cast<acc_t>(s / static_cast<double>(count));
        coefficients(c, chi2[c]);
        const acc_t scale = w[c] * r[c] * inv_std[c], shift = b[c];
        channel_segments(lay, c, [&](int64_t b0, int64_t b1) {
          affine_any<scalar_t, acc_t>(px + b0, py + b0, b1 - b0, scale, shift, stream);
        });
      });
      for (int64_t c = 0; c < C; ++c) finite = finite && std::isfinite(chi2[c]);
      redo = !finite && !st.use_batch_stats;
    } else {
      const auto sums = chunked_channel_sums<acc_t>(lay, 1, [&](int64_t b0, int64_t b1, acc_t* s) {
        s[0] = sum_squares<scalar_t, acc_t>(px + b0, b1 - b0);
      });
      for (int64_t c = 0; c < C; ++c) {
        chi2[c] = static_cast<acc_t>(sums[c] / static_cast<double>(count));
        finite = finite && std::isfinite(chi2[c]);
      }
    }
    if (redo || !channelwise(lay)) {
      // Separate output pass; after a non-finite step the moving average keeps its old slot.
      for (int64_t c = 0; c < C; ++c) coefficients(c, finite ? chi2[c] : buf[slot * C + c]);
      for_each_unit(lay, [&](int64_t c, int64_t b0, int64_t b1) {
        const acc_t scale = w[c] * r[c] * inv_std[c];
        affine_any<scalar_t, acc_t>(px + b0, py + b0, b1 - b0, scale, b[c], stream);
      });
    }
    if (finite) {
      const acc_t momentum_s = static_cast<acc_t>(st.momentum);
      for (int64_t c = 0; c < C; ++c) {
        buf[slot * C + c] = chi2[c];
        const acc_t var = st.use_batch_stats ? chi2[c] : moving_mean(buf, m, C, c, slot, chi2[c]);
        run[c] = lerp(run[c], var, momentum_s);
      }
    }
  });
  Tensor finite_t = empty_tensor({}, x.options().dtype(at::kBool));
  finite_t.fill_(finite);
  return {y, inv_std_t, r_t, finite_t};
}

std::tuple<Tensor, Tensor, Tensor> train_backward(const Tensor& dy, const Tensor& x,
                                                  const Tensor& weight, const Tensor& inv_std_t,
                                                  const Tensor& r_t, Tensor& psi_buffer,
                                                  int64_t slot, bool use_batch_stats,
                                                  bool forward_finite, bool input_grad) {
  check_pair(dy, x);
  const at::ScalarType sdtype = stats_type(x);
  check_state(weight, x, sdtype, "weight");
  check_state(inv_std_t, x, sdtype, "inv_std");
  check_state(r_t, x, sdtype, "r");
  const int64_t m = check_buffer_slot(psi_buffer, x, sdtype, "psi_buffer", slot);
  const Layout lay(x);
  const int64_t C = lay.channels, count = lay.batch * lay.plane;
  const Output out = input_grad ? new_output(x) : Output{empty_tensor({0}, x.options()), false};
  const Tensor& dx = out.tensor;
  Tensor dweight_t = empty_tensor({C}, weight.options());
  Tensor dbias_t = empty_tensor({C}, weight.options());
  Tensor psi_batch_t = empty_tensor({C}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mabn_train_backward",
                                  [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* pdx = input_grad ? dx.data_ptr<scalar_t>() : nullptr;
    const acc_t* w = weight.const_data_ptr<acc_t>();
    const acc_t* inv_std = inv_std_t.const_data_ptr<acc_t>();
    const acc_t* r = r_t.const_data_ptr<acc_t>();
    acc_t* buf = psi_buffer.data_ptr<acc_t>();
    acc_t* psi_batch = psi_batch_t.data_ptr<acc_t>();
    acc_t* dweight = dweight_t.data_ptr<acc_t>();
    acc_t* dbias = dbias_t.data_ptr<acc_t>();
    const bool stream = out.stream;
    // dx = (w r inv_std) * dy - (psi inv_std^2) * x
    auto write_dx = [&](int64_t c, acc_t psi) {
      const acc_t a = w[c] * r[c] * inv_std[c];
      const acc_t b = -psi * inv_std[c] * inv_std[c];
      channel_segments(lay, c, [&](int64_t b0, int64_t b1) {
        axpby_any<scalar_t, acc_t>(pdy + b0, px + b0, pdx + b0, b1 - b0, a, b, stream);
      });
    };
    // psi_B = mean(g * z) with g = dy * w * r and z = x * inv_std; dweight = sum(dy * r * z).
    auto channel_results = [&](int64_t c, double sum_dy_d, double sum_dy_x_d) {
      const acc_t sum_dy = static_cast<acc_t>(sum_dy_d), sum_dy_x = static_cast<acc_t>(sum_dy_x_d);
      psi_batch[c] = w[c] * r[c] * inv_std[c] * sum_dy_x / static_cast<acc_t>(count);
      dweight[c] = r[c] * inv_std[c] * sum_dy_x;
      dbias[c] = sum_dy;
    };
    auto psi_of = [&](int64_t c, bool finite) {
      if (use_batch_stats) return psi_batch[c];
      return moving_mean(buf, m, C, c, slot, finite ? psi_batch[c] : buf[slot * C + c]);
    };
    bool finite = forward_finite, redo = false;
    if (channelwise(lay)) {
      for_each_channel(lay, [&](int64_t c) {
        acc_t s[2] = {0, 0};
        double sums[2] = {0, 0};
        channel_segments(lay, c, [&](int64_t b0, int64_t b1) {
          s[0] = s[1] = 0;
          sum_and_dot<scalar_t, acc_t>(pdy + b0, px + b0, b1 - b0, s);
          sums[0] += static_cast<double>(s[0]);
          sums[1] += static_cast<double>(s[1]);
        });
        channel_results(c, sums[0], sums[1]);
        if (input_grad) write_dx(c, psi_of(c, true));
      });
      for (int64_t c = 0; c < C; ++c) finite = finite && std::isfinite(psi_batch[c]);
      redo = input_grad && !finite && !use_batch_stats;
    } else {
      const auto sums = chunked_channel_sums<acc_t>(lay, 2, [&](int64_t b0, int64_t b1, acc_t* s) {
        sum_and_dot<scalar_t, acc_t>(pdy + b0, px + b0, b1 - b0, s);
      });
      for (int64_t c = 0; c < C; ++c) {
        channel_results(c, sums[2 * c], sums[2 * c + 1]);
        finite = finite && std::isfinite(psi_batch[c]);
      }
    }
    if (input_grad && (redo || !channelwise(lay))) {
      // Separate dx pass; after a non-finite step the moving average keeps its old slot.
      std::vector<acc_t> a(C), b(C);
      for (int64_t c = 0; c < C; ++c) {
        const acc_t psi = psi_of(c, finite);
        a[c] = w[c] * r[c] * inv_std[c];
        b[c] = -psi * inv_std[c] * inv_std[c];
      }
      for_each_unit(lay, [&](int64_t c, int64_t b0, int64_t b1) {
        axpby_any<scalar_t, acc_t>(pdy + b0, px + b0, pdx + b0, b1 - b0, a[c], b[c], stream);
      });
    }
    if (finite) {
      for (int64_t c = 0; c < C; ++c) buf[slot * C + c] = psi_batch[c];
    }
  });
  return {dx, dweight_t, dbias_t};
}

}  // namespace mabn_d2
