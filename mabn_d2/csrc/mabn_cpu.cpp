// CPU kernels of MABN2d: the four memory-bound passes of mabn_d2/kernels.py, for contiguous
// (N, C, H, W) tensors of float32 / float64 / float16 / bfloat16.
//
//   second_moment(x)          -> mean over N, H, W of x^2                  (C,)  one read
//   channel_affine(x, a, b)   -> a[c] * x + b[c]                        (N,C,H,W)  read + write
//   grad_reductions(dy, x)    -> (sum dy, sum dy * x) over N, H, W       2 x (C,)  two reads
//   grad_input(dy, x, a, b)   -> a[c] * dy + b[c] * x                   (N,C,H,W)  2 reads + write
//
// Arithmetic is in float32 for 16/32-bit inputs (float64 for float64); per-channel sums are
// accumulated in float64 across planes, so x^2 of half inputs never overflows and large
// tensors do not lose precision. Reductions split the work into a fixed number of chunks
// whatever the thread count and add the chunks' partial sums in order: results are
// deterministic (a resumed run continues bit for bit).
//
// No pybind11: the ops are registered with the dispatcher (torch.ops.mabn_d2.*), which keeps
// the JIT compile short.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <sys/mman.h>
#include <unistd.h>

#ifdef __AVX__
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <tuple>
#include <vector>

namespace mabn_d2 {
namespace {

using at::Tensor;

// Work unit: a segment of at most kSegment elements of one (n, c) plane, so that a single huge
// plane is still split across threads.
constexpr int64_t kSegment = 1 << 16;
// Reductions always use this many chunks (fewer if there are fewer units): deterministic sums.
constexpr int64_t kReduceChunks = 64;
// Independent accumulators in the innermost loops (hides the add latency; maps to vector lanes).
constexpr int64_t kLanes = 32;
// Fewer elements than this are not worth waking other threads for.
constexpr int64_t kParallelMin = int64_t{1} << 15;

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

struct Layout {
  int64_t channels;
  int64_t plane;     // H * W
  int64_t segs;      // segments per plane
  int64_t units;     // N * C * segs

  explicit Layout(const Tensor& x)
      : channels(x.size(1)),
        plane(x.size(2) * x.size(3)),
        segs(std::max<int64_t>(1, (plane + kSegment - 1) / kSegment)),
        units(x.size(0) * x.size(1) * segs) {}

  // Unit u covers elements [begin, end) of the flat tensor and belongs to channel c.
  void unit(int64_t u, int64_t* c, int64_t* begin, int64_t* end) const {
    const int64_t p = u / segs, s = u % segs;
    *c = p % channels;
    *begin = p * plane + s * kSegment;
    *end = p * plane + std::min(plane, (s + 1) * kSegment);
  }
};

// Optionally back large outputs with transparent huge pages (THP "madvise" mode): a fresh
// 100 MB output costs ~25,000 page faults, often more than the pass itself; PyTorch does the
// same for every allocation under THP_MEM_ALLOC_ENABLE=1. Off by default: on a loaded machine
// huge-page faults were measured to be several times slower instead (docs/speed.md).
// Advisory only: madvise failing changes nothing but speed.
std::atomic<bool> g_hugepages{false};
constexpr uintptr_t kHugePage = uintptr_t{2} << 20;

Tensor empty_output(const Tensor& like) {
  Tensor out = at::empty_like(like);
#ifdef MADV_HUGEPAGE
  const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + out.nbytes()) & ~(kHugePage - 1);
  if (g_hugepages.load(std::memory_order_relaxed) && last >= first + 2 * kHugePage) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return out;
}

void set_hugepages(bool enabled) { g_hugepages.store(enabled); }

void check_input(const Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "mabn_d2 CPU kernels: ", name, " must be on the CPU");
  TORCH_CHECK(x.dim() == 4, "mabn_d2 CPU kernels: ", name, " must be (N, C, H, W), got ",
              x.sizes());
  TORCH_CHECK(x.is_contiguous(), "mabn_d2 CPU kernels: ", name, " must be contiguous");
}

void check_pair(const Tensor& dy, const Tensor& x) {
  check_input(dy, "dy");
  check_input(x, "x");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(),
              "mabn_d2 CPU kernels: dy and x must have the same shape and dtype, got ", dy.sizes(),
              " ", dy.scalar_type(), " and ", x.sizes(), " ", x.scalar_type());
}

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

// sums[k] accumulates f over the units of chunk k; then the chunks are added in order.
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
      const int64_t u1 = std::min(lay.units, (k + 1) * per_chunk);
      for (int64_t u = k * per_chunk; u < u1; ++u) {
        int64_t c, begin, end;
        lay.unit(u, &c, &begin, &end);
        acc_t s[2] = {0, 0};
        body(begin, end, s);
        for (int j = 0; j < n_out; ++j) out[c * n_out + j] += static_cast<double>(s[j]);
      }
    }
  });
  std::vector<double> total(width, 0.0);
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t i = 0; i < width; ++i) total[i] += partial[k * width + i];
  }
  return total;
}

template <typename scalar_t, typename acc_t>
acc_t sum_squares(const scalar_t* __restrict__ x, int64_t n) {
  acc_t lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      const acc_t v = static_cast<acc_t>(x[i + j]);
      lane[j] += v * v;
    }
  }
  acc_t s = 0;
  for (; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    s += v * v;
  }
  for (int64_t j = 0; j < kLanes; ++j) s += lane[j];
  return s;
}

template <typename scalar_t, typename acc_t>
void sum_and_dot(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, int64_t n,
                 acc_t* out) {
  acc_t sd[kLanes] = {}, sdx[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) {
      const acc_t g = static_cast<acc_t>(dy[i + j]);
      sd[j] += g;
      sdx[j] += g * static_cast<acc_t>(x[i + j]);
    }
  }
  acc_t a = 0, b = 0;
  for (; i < n; ++i) {
    const acc_t g = static_cast<acc_t>(dy[i]);
    a += g;
    b += g * static_cast<acc_t>(x[i]);
  }
  for (int64_t j = 0; j < kLanes; ++j) {
    a += sd[j];
    b += sdx[j];
  }
  out[0] += a;
  out[1] += b;
}

// Large float32 outputs can be written with non-temporal (streaming) stores, which skip reading
// each output cache line before overwriting it (a third less memory traffic for y = a * x + b).
// That only pays when the output's pages are already resident (memory reused by the allocator):
// on fresh pages the OS has just zeroed the lines into the cache, and streaming past them was
// measured 30 % slower. Mode: 0 never, 1 when the output is large and resident (default), 2
// whenever the output is large (tests).
//
// Streamed writes must cover whole cache lines to pay: planes (H * W) this large make the
// partial lines at plane boundaries negligible (RoI-head planes of 7 x 7 do not stream).
constexpr int64_t kStreamMinBytes = int64_t{32} << 20;
constexpr int64_t kStreamMinPlane = 4096;
std::atomic<int> g_streaming{1};

void set_streaming(int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 2, "mabn_d2: streaming mode must be 0, 1 or 2, got ", mode);
  g_streaming.store(static_cast<int>(mode));
}

bool page_resident(uintptr_t address) {
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  unsigned char state = 0;
  return mincore(reinterpret_cast<void*>(address & ~(page - 1)), 1, &state) == 0 && (state & 1);
}

bool stream_into(const Tensor& out) {
  const int mode = g_streaming.load(std::memory_order_relaxed);
  if (mode == 0 || out.scalar_type() != at::kFloat || out.nbytes() < kStreamMinBytes ||
      out.size(2) * out.size(3) < kStreamMinPlane) {
    return false;
  }
  const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  // First and last page: a block the allocator reused, not one it just got from the OS.
  return mode == 2 || (page_resident(begin) && page_resident(begin + out.nbytes() - 1));
}

// out = a * x + b over one segment.
template <typename scalar_t, typename acc_t>
void affine_segment(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t n, acc_t a,
                    acc_t b) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(a * static_cast<acc_t>(x[i]) + b);
}

// out = a * dy + b * x over one segment.
template <typename scalar_t, typename acc_t>
void axpby_segment(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                   scalar_t* __restrict__ out, int64_t n, acc_t a, acc_t b) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<scalar_t>(a * static_cast<acc_t>(dy[i]) + b * static_cast<acc_t>(x[i]));
  }
}

#ifdef __AVX__
// a * x + b, fused where the compiler fuses the scalar loops above (built with -mfma, it
// contracts a * x + b into fma(a, x, b) and a * dy + b * x into fma(a, dy, b * x)).
inline __m256 madd(__m256 a, __m256 x, __m256 b) {
#ifdef __FMA__
  return _mm256_fmadd_ps(a, x, b);
#else
  return _mm256_add_ps(_mm256_mul_ps(a, x), b);
#endif
}

inline int64_t unaligned_head(const float* out, int64_t n) {
  const int64_t misaligned = (reinterpret_cast<uintptr_t>(out) & 31) / sizeof(float);
  return std::min<int64_t>(n, misaligned ? 8 - misaligned : 0);
}

// The float32 segments with streaming stores: scalar until `out` is 32-byte aligned, then 8
// lanes per store, the same arithmetic as the loops above (identical bits, tested). Streaming
// stores are weakly ordered: each segment ends with a fence in the thread that wrote it.
void affine_segment_stream(const float* __restrict__ x, float* __restrict__ out, int64_t n,
                           float a, float b) {
  int64_t i = unaligned_head(out, n);
  affine_segment<float, float>(x, out, i, a, b);
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
  for (; i + 8 <= n; i += 8) {
    _mm256_stream_ps(out + i, madd(va, _mm256_loadu_ps(x + i), vb));
  }
  affine_segment<float, float>(x + i, out + i, n - i, a, b);
  _mm_sfence();
}

void axpby_segment_stream(const float* __restrict__ dy, const float* __restrict__ x,
                          float* __restrict__ out, int64_t n, float a, float b) {
  int64_t i = unaligned_head(out, n);
  axpby_segment<float, float>(dy, x, out, i, a, b);
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
  for (; i + 8 <= n; i += 8) {
    const __m256 bx = _mm256_mul_ps(vb, _mm256_loadu_ps(x + i));
    _mm256_stream_ps(out + i, madd(va, _mm256_loadu_ps(dy + i), bx));
  }
  axpby_segment<float, float>(dy + i, x + i, out + i, n - i, a, b);
  _mm_sfence();
}
#endif

// Elementwise pass over all units, in parallel; `body(c, begin, end)`.
template <typename Body>
void for_each_unit(const Layout& lay, const Body& body) {
  // At least kParallelMin elements per task so small tensors do not pay for threading.
  const int64_t grain =
      std::max<int64_t>(1, kParallelMin / std::max<int64_t>(1, std::min(lay.plane, kSegment)));
  at::parallel_for(0, lay.units, grain, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      int64_t c, begin, end;
      lay.unit(u, &c, &begin, &end);
      body(c, begin, end);
    }
  });
}

// Streaming passes for float32 outputs (see stream_into); false (nothing done) for other dtypes
// or CPUs without AVX.
template <typename scalar_t, typename acc_t>
bool affine_streaming(const Layout&, const scalar_t*, scalar_t*, const std::vector<acc_t>&,
                      const std::vector<acc_t>&) {
  return false;
}
template <typename scalar_t, typename acc_t>
bool axpby_streaming(const Layout&, const scalar_t*, const scalar_t*, scalar_t*,
                     const std::vector<acc_t>&, const std::vector<acc_t>&) {
  return false;
}

#ifdef __AVX__
bool affine_streaming(const Layout& lay, const float* px, float* py, const std::vector<float>& a,
                      const std::vector<float>& b) {
  for_each_unit(lay, [&](int64_t c, int64_t begin, int64_t end) {
    affine_segment_stream(px + begin, py + begin, end - begin, a[c], b[c]);
  });
  return true;
}

bool axpby_streaming(const Layout& lay, const float* pdy, const float* px, float* pdx,
                     const std::vector<float>& a, const std::vector<float>& b) {
  for_each_unit(lay, [&](int64_t c, int64_t begin, int64_t end) {
    axpby_segment_stream(pdy + begin, px + begin, pdx + begin, end - begin, a[c], b[c]);
  });
  return true;
}
#endif

Tensor second_moment(const Tensor& x, at::ScalarType out_dtype) {
  check_input(x, "x");
  const Layout lay(x);
  const int64_t count = x.numel() / lay.channels;
  Tensor out = at::empty({lay.channels}, x.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mabn_second_moment",
                                  [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const auto sums = chunked_channel_sums<acc_t>(lay, 1, [&](int64_t b, int64_t e, acc_t* s) {
      s[0] = sum_squares<scalar_t, acc_t>(px + b, e - b);
    });
    Tensor mean = at::empty({lay.channels}, x.options().dtype(at::kDouble));
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
  Tensor y = empty_output(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mabn_channel_affine",
                                  [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const auto a = coefficient<acc_t>(scale), b = coefficient<acc_t>(shift);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* py = y.data_ptr<scalar_t>();
    if (stream_into(y) && affine_streaming(lay, px, py, a, b)) return;
    for_each_unit(lay, [&](int64_t c, int64_t begin, int64_t end) {
      affine_segment<scalar_t, acc_t>(px + begin, py + begin, end - begin, a[c], b[c]);
    });
  });
  return y;
}

std::tuple<Tensor, Tensor> grad_reductions(const Tensor& dy, const Tensor& x,
                                           at::ScalarType out_dtype) {
  check_pair(dy, x);
  const Layout lay(x);
  Tensor both = at::empty({2, lay.channels}, x.options().dtype(at::kDouble));
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
  Tensor dx = empty_output(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mabn_grad_input",
                                  [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const auto a = coefficient<acc_t>(a_t), b = coefficient<acc_t>(b_t);
    const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* pdx = dx.data_ptr<scalar_t>();
    if (stream_into(dx) && axpby_streaming(lay, pdy, px, pdx, a, b)) return;
    for_each_unit(lay, [&](int64_t c, int64_t begin, int64_t end) {
      axpby_segment<scalar_t, acc_t>(pdy + begin, px + begin, pdx + begin, end - begin, a[c],
                                     b[c]);
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY(mabn_d2, m) {
  m.def("second_moment(Tensor x, ScalarType out_dtype) -> Tensor");
  m.def("channel_affine(Tensor x, Tensor scale, Tensor shift) -> Tensor");
  m.def("grad_reductions(Tensor dy, Tensor x, ScalarType out_dtype) -> (Tensor, Tensor)");
  m.def("grad_input(Tensor dy, Tensor x, Tensor a, Tensor b) -> Tensor");
  m.def("set_hugepages(bool enabled) -> ()", &set_hugepages);
  m.def("set_streaming(int mode) -> ()", &set_streaming);
}

TORCH_LIBRARY_IMPL(mabn_d2, CPU, m) {
  m.impl("second_moment", &second_moment);
  m.impl("channel_affine", &channel_affine);
  m.impl("grad_reductions", &grad_reductions);
  m.impl("grad_input", &grad_input);
}

}  // namespace mabn_d2
