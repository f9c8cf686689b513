// What every kernel shares: the accumulation type, how a (N, C, H, W) tensor is cut into work
// units and walked in parallel, deterministic per-channel sums, and the input checks.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace mabn_d2 {

using at::Tensor;

// Work unit: a segment of at most kSegment elements of one (n, c) plane, so that a single huge
// plane is still split across threads.
constexpr int64_t kSegment = 1 << 16;
// Reductions always use this many chunks (fewer if there are fewer units): deterministic sums.
constexpr int64_t kReduceChunks = 64;
// Fewer elements than this are not worth waking other threads for.
constexpr int64_t kParallelMin = int64_t{1} << 15;

// Arithmetic in float32 for 16/32-bit inputs (the squares of half inputs exceed the half
// range), float64 for float64.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

struct Layout {
  int64_t batch;     // N
  int64_t channels;
  int64_t plane;     // H * W
  int64_t segs;      // segments per plane
  int64_t units;     // N * C * segs

  explicit Layout(const Tensor& x)
      : batch(x.size(0)),
        channels(x.size(1)),
        plane(x.size(2) * x.size(3)),
        segs(std::max<int64_t>(1, (plane + kSegment - 1) / kSegment)),
        units(x.size(0) * x.size(1) * segs) {}

  // body(c, begin, end) for the units u0 <= u < u1 in order: unit u covers elements
  // [begin, end) of the flat tensor, in channel c. No division per unit (RoI heads have
  // hundreds of thousands of 49-element units).
  template <typename Body>
  void walk(int64_t u0, int64_t u1, const Body& body) const {
    if (u0 >= u1) return;
    int64_t p = u0 / segs, s = u0 % segs, c = p % channels;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t base = p * plane;
      body(c, base + s * kSegment, base + std::min(plane, (s + 1) * kSegment));
      if (++s == segs) {
        s = 0;
        ++p;
        if (++c == channels) c = 0;
      }
    }
  }
};

// Elementwise pass over all units, in parallel; `body(c, begin, end)`.
template <typename Body>
void for_each_unit(const Layout& lay, const Body& body) {
  // At least kParallelMin elements per task so small tensors do not pay for threading.
  const int64_t grain =
      std::max<int64_t>(1, kParallelMin / std::max<int64_t>(1, std::min(lay.plane, kSegment)));
  at::parallel_for(0, lay.units, grain, [&](int64_t u0, int64_t u1) { lay.walk(u0, u1, body); });
}

// sums[k] accumulates f over the units of chunk k; then the chunks are added in order, so the
// result does not depend on the thread count (a resumed run continues bit for bit).
// `body(begin, end, acc_t* s)` adds the segment's contribution to s[0..n_out).
template <typename acc_t, typename Body>
std::vector<double> chunked_channel_sums(const Layout& lay, int n_out, const Body& body) {
  const int64_t chunks = std::min(kReduceChunks, lay.units);
  const int64_t per_chunk = (lay.units + chunks - 1) / chunks;
  const int64_t width = lay.channels * n_out;
  std::vector<double> partial(chunks * width, 0.0);
  // Small tensors: one thread (same chunks, same sums) instead of a parallel region.
  const int64_t grain = lay.units * std::min(lay.plane, kSegment) < kParallelMin ? chunks : 1;
  at::parallel_for(0, chunks, grain, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      double* out = partial.data() + k * width;
      lay.walk(k * per_chunk, std::min(lay.units, (k + 1) * per_chunk),
               [&](int64_t c, int64_t begin, int64_t end) {
                 acc_t s[2] = {0, 0};
                 body(begin, end, s);
                 for (int j = 0; j < n_out; ++j) out[c * n_out + j] += static_cast<double>(s[j]);
               });
    }
  });
  std::vector<double> total(width, 0.0);
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t i = 0; i < width; ++i) total[i] += partial[k * width + i];
  }
  return total;
}

inline void check_input(const Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "mabn_d2 CPU kernels: ", name, " must be on the CPU");
  TORCH_CHECK(x.dim() == 4, "mabn_d2 CPU kernels: ", name, " must be (N, C, H, W), got ",
              x.sizes());
  TORCH_CHECK(x.is_contiguous(), "mabn_d2 CPU kernels: ", name, " must be contiguous");
}

inline void check_pair(const Tensor& dy, const Tensor& x) {
  check_input(dy, "dy");
  check_input(x, "x");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(),
              "mabn_d2 CPU kernels: dy and x must have the same shape and dtype, got ", dy.sizes(),
              " ", dy.scalar_type(), " and ", x.sizes(), " ", x.scalar_type());
}

}  // namespace mabn_d2
