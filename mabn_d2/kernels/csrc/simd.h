// The inner loops over one segment: per-channel reductions with independent lanes, and the
// elementwise a * x + b / a * dy + b * x, with streaming (non-temporal) stores for float32.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#ifdef __AVX__
#include <immintrin.h>
#endif

namespace mabn_d2 {

// Independent accumulators in the innermost loops (hides the add latency; maps to vector lanes).
constexpr int64_t kLanes = 32;
// Short runs (RoI-head planes of 7 x 7 or 14 x 14) use one vector of lanes: 32 lanes would
// leave most of such a run to the scalar tail and the final sum of the lanes.
constexpr int64_t kShortLanes = 8;
constexpr int64_t kLongRun = 1024;

template <int64_t lanes, typename scalar_t, typename acc_t>
acc_t sum_squares_lanes(const scalar_t* __restrict__ x, int64_t n) {
  acc_t lane[lanes] = {};
  int64_t i = 0;
  for (; i + lanes <= n; i += lanes) {
#pragma omp simd
    for (int64_t j = 0; j < lanes; ++j) {
      const acc_t v = static_cast<acc_t>(x[i + j]);
      lane[j] += v * v;
    }
  }
  acc_t s = 0;
  for (; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    s += v * v;
  }
  for (int64_t j = 0; j < lanes; ++j) s += lane[j];
  return s;
}

template <int64_t lanes, typename scalar_t, typename acc_t>
void sum_and_dot_lanes(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, int64_t n,
                       acc_t* out) {
  acc_t sd[lanes] = {}, sdx[lanes] = {};
  int64_t i = 0;
  for (; i + lanes <= n; i += lanes) {
#pragma omp simd
    for (int64_t j = 0; j < lanes; ++j) {
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
  for (int64_t j = 0; j < lanes; ++j) {
    a += sd[j];
    b += sdx[j];
  }
  out[0] += a;
  out[1] += b;
}

// sum of x^2 over one segment.
template <typename scalar_t, typename acc_t>
acc_t sum_squares(const scalar_t* __restrict__ x, int64_t n) {
  return n >= kLongRun ? sum_squares_lanes<kLanes, scalar_t, acc_t>(x, n)
                       : sum_squares_lanes<kShortLanes, scalar_t, acc_t>(x, n);
}

// out[0] += sum of dy, out[1] += sum of dy * x over one segment.
template <typename scalar_t, typename acc_t>
void sum_and_dot(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, int64_t n,
                 acc_t* out) {
  if (n >= kLongRun) {
    sum_and_dot_lanes<kLanes, scalar_t, acc_t>(dy, x, n, out);
  } else {
    sum_and_dot_lanes<kShortLanes, scalar_t, acc_t>(dy, x, n, out);
  }
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
inline void affine_segment_stream(const float* __restrict__ x, float* __restrict__ out, int64_t n,
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

inline void axpby_segment_stream(const float* __restrict__ dy, const float* __restrict__ x,
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

// The segments above, streamed where `stream` asks and the CPU and dtype allow it.
template <typename scalar_t, typename acc_t>
inline void affine_any(const scalar_t* x, scalar_t* out, int64_t n, acc_t a, acc_t b,
                       bool stream) {
#ifdef __AVX__
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (stream) return affine_segment_stream(x, out, n, a, b);
  }
#endif
  affine_segment<scalar_t, acc_t>(x, out, n, a, b);
}

template <typename scalar_t, typename acc_t>
inline void axpby_any(const scalar_t* dy, const scalar_t* x, scalar_t* out, int64_t n, acc_t a,
                      acc_t b, bool stream) {
#ifdef __AVX__
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (stream) return axpby_segment_stream(dy, x, out, n, a, b);
  }
#endif
  axpby_segment<scalar_t, acc_t>(dy, x, out, n, a, b);
}

}  // namespace mabn_d2
