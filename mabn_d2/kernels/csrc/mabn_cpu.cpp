// CPU kernels of MABN2d: the four memory-bound passes of mabn_d2/kernels.py, for contiguous
// (N, C, H, W) tensors of float32 / float64 / float16 / bfloat16.
//
//   second_moment(x)          -> mean over N, H, W of x^2                  (C,)  one read
//   channel_affine(x, a, b)   -> a[c] * x + b[c]                        (N,C,H,W)  read + write
//   grad_reductions(dy, x)    -> (sum dy, sum dy * x) over N, H, W       2 x (C,)  two reads
//   grad_input(dy, x, a, b)   -> a[c] * dy + b[c] * x                   (N,C,H,W)  2 reads + write
//
// and the fused training step (train_forward / train_backward, at the end of this file): the
// statistics, the step's per-channel arithmetic and the output of a whole layer in one op per
// direction, channel by channel (x read once, y written once; dy and x read once, dx written
// once).
//
// Outputs of 4 MiB and more come from a cache of freed blocks (OutputCache below), so that a
// training step does not pay the OS's page zeroing for fresh 100 MB outputs every time.
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
#include <ATen/EmptyTensor.h>
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
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
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
constexpr int64_t kShortLanes = 8;
constexpr int64_t kLongRun = 1024;
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

// Large outputs (>= kCacheMinBytes) come from a cache of blocks, as on CUDA from PyTorch's
// caching allocator. glibc serves blocks of 32 MiB and more with fresh mmap pages and returns
// them to the OS on free, and the OS zeroes every fresh page on first touch: at detection shapes
// that cost as much as the kernel itself, in every training step (docs/speed.md). A block freed
// here waits for the next output of about its size instead (best fit, at most 1/8 larger;
// of equal ones the most recently freed, whose pages are likeliest still in cache).
// Freed blocks stay allocated up to a limit (env MABN_D2_CPU_CACHE_MB, default 1024; 0 turns the
// cache off), the least recently freed go first. Allocations are reported to PyTorch's
// profiler like the default allocator's, so memory profiles and peak-memory numbers see them.
constexpr size_t kCacheMinBytes = size_t{4} << 20;
constexpr size_t kCacheGranule = size_t{2} << 20;  // block sizes: multiples of 2 MiB
constexpr size_t kPageAlign = 4096;

class OutputCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    const size_t size = (nbytes + kCacheGranule - 1) / kCacheGranule * kCacheGranule;
    void* block = nullptr;
    size_t block_size = size;
    size_t in_use = 0, held = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.lower_bound(size);
      if (it != free_.end() && it->first <= size + size / 8) {
        it = std::prev(free_.upper_bound(it->first));  // of that size, the most recently freed
        block_size = it->first;
        block = it->second.first;
        cached_ -= block_size;
        free_.erase(it);
        ++hits_;
      } else {
        ++misses_;
      }
      in_use_ += nbytes;
      in_use = in_use_;
      held = in_use_ + cached_;
    }
    if (block == nullptr) block = allocate_block(size);
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(block, static_cast<int64_t>(nbytes), in_use, held,
                                       c10::Device(c10::DeviceType::CPU));
    }
    auto* lease = new Lease{block, block_size, nbytes};
    return {block, lease, &OutputCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Bytes; also evicts down to the new limit.
  void set_limit(int64_t bytes) {
    TORCH_CHECK(bytes >= 0, "mabn_d2: the output cache limit must be >= 0 bytes, got ", bytes);
    std::vector<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_ = static_cast<size_t>(bytes);
      evict(0, evicted);
    }
    free_blocks(evicted);
  }

  bool enabled() const { return limit_.load(std::memory_order_relaxed) > 0; }

  // {limit, cached bytes, bytes in use, hits, misses}
  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(limit_.load()), static_cast<int64_t>(cached_),
            static_cast<int64_t>(in_use_), static_cast<int64_t>(hits_),
            static_cast<int64_t>(misses_)};
  }

  void empty() {
    std::vector<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto& [size, entry] : free_) evicted.push_back({entry.first, size});
      free_.clear();
      cached_ = 0;
    }
    free_blocks(evicted);
  }

  // Never destroyed: outputs may outlive static destruction at exit.
  static OutputCache& instance() {
    static auto* cache = new OutputCache();
    return *cache;
  }

 private:
  struct Block {
    void* ptr;
    size_t size;
  };
  struct Lease {
    void* ptr;
    size_t size;    // of the block
    size_t nbytes;  // asked for (what the profiler was told)
  };

  OutputCache() = default;

  // From the C allocator (glibc, or jemalloc/tcmalloc where preloaded), so that a block it can
  // serve from memory it already holds is not taken from the OS.
  static void* allocate_block(size_t size) {
    void* p = nullptr;
    if (posix_memalign(&p, kPageAlign, size) != 0) {
      instance().empty();  // give the cached blocks back and try once more
      if (posix_memalign(&p, kPageAlign, size) != 0) p = nullptr;
    }
    TORCH_CHECK_WITH(OutOfMemoryError, p != nullptr, "mabn_d2: could not allocate ", size,
                     " bytes for an output");
    return p;
  }

  static void free_blocks(const std::vector<Block>& blocks) {
    for (const Block& b : blocks) std::free(b.ptr);
  }

  // Under mutex_: drops the least recently freed blocks until `incoming` more bytes fit.
  void evict(size_t incoming, std::vector<Block>& evicted) {
    while (!free_.empty() && cached_ + incoming > limit_) {
      auto oldest = free_.begin();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->second.second < oldest->second.second) oldest = it;
      }
      evicted.push_back({oldest->second.first, oldest->first});
      cached_ -= oldest->first;
      free_.erase(oldest);
    }
  }

  static void release(void* context) {
    auto* lease = static_cast<Lease*>(context);
    OutputCache& cache = instance();
    std::vector<Block> evicted;
    bool keep = false;
    size_t in_use = 0, held = 0;
    {
      std::lock_guard<std::mutex> lock(cache.mutex_);
      cache.in_use_ -= lease->nbytes;
      if (lease->size <= cache.limit_) {
        cache.evict(lease->size, evicted);
        cache.free_.emplace(lease->size, std::make_pair(lease->ptr, ++cache.clock_));
        cache.cached_ += lease->size;
        keep = true;
      }
      in_use = cache.in_use_;
      held = cache.in_use_ + cache.cached_;
    }
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(lease->ptr, -static_cast<int64_t>(lease->nbytes), in_use,
                                       held, c10::Device(c10::DeviceType::CPU));
    }
    if (!keep) evicted.push_back({lease->ptr, lease->size});
    free_blocks(evicted);
    delete lease;
  }

  std::mutex mutex_;
  // size -> (block, when freed): best fit by size, eviction by age (a few dozen entries).
  std::multimap<size_t, std::pair<void*, uint64_t>> free_;
  std::atomic<size_t> limit_{size_t{1024} << 20};  // mabn_d2.kernels.cpp sets it on load
  size_t cached_ = 0;
  size_t in_use_ = 0;
  uint64_t clock_ = 0;
  uint64_t hits_ = 0;
  uint64_t misses_ = 0;
};

Tensor empty_output(const Tensor& like) {
  OutputCache& cache = OutputCache::instance();
  if (!cache.enabled() || static_cast<size_t>(like.nbytes()) < kCacheMinBytes) {
    return at::empty_like(like);
  }
  return at::detail::empty_generic(like.sizes(), &cache, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   like.scalar_type(), c10::MemoryFormat::Contiguous);
}

void set_output_cache_limit(int64_t bytes) { OutputCache::instance().set_limit(bytes); }
std::vector<int64_t> output_cache_stats() { return OutputCache::instance().stats(); }
void empty_output_cache() { OutputCache::instance().empty(); }

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

// Short runs (RoI-head planes of 7 x 7 or 14 x 14) with one vector of lanes: 32 lanes would
// leave most of such a run to the scalar tail and the final sum of the lanes.
template <typename scalar_t, typename acc_t>
acc_t sum_squares(const scalar_t* __restrict__ x, int64_t n) {
  return n >= kLongRun ? sum_squares_lanes<kLanes, scalar_t, acc_t>(x, n)
                       : sum_squares_lanes<kShortLanes, scalar_t, acc_t>(x, n);
}

template <typename scalar_t, typename acc_t>
void sum_and_dot(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x, int64_t n,
                 acc_t* out) {
  if (n >= kLongRun) {
    sum_and_dot_lanes<kLanes, scalar_t, acc_t>(dy, x, n, out);
  } else {
    sum_and_dot_lanes<kShortLanes, scalar_t, acc_t>(dy, x, n, out);
  }
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

// A fresh output (pages the OS has not mapped yet) is prefaulted with one madvise call per
// thread (MADV_POPULATE_WRITE, Linux >= 5.14) instead of one page fault per 4 KB page while the
// kernel writes it: the OS still zeroes every page, but without a trap per page (measured:
// 111 MB, 2 threads, 23 ms of faults -> 15 ms). Where the call is unsupported it fails and the
// pages fault in as usual.
constexpr int64_t kPopulateMinBytes = int64_t{4} << 20;
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
std::atomic<bool> g_populate{true};

void populate(const Tensor& out) {
#ifdef __linux__
  static const int64_t page = static_cast<int64_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(out.data_ptr()) + page - 1) & ~(page - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(out.data_ptr()) + out.nbytes()) & ~(page - 1);
  if (end <= begin) return;
  const int64_t pages = static_cast<int64_t>((end - begin) / page);
  at::parallel_for(0, pages, 256, [&](int64_t p0, int64_t p1) {
    if (madvise(reinterpret_cast<void*>(begin + p0 * page), (p1 - p0) * page,
                MADV_POPULATE_WRITE) != 0) {
      g_populate.store(false);  // unsupported here (EINVAL): do not try again
    }
  });
#endif
}

struct Output {
  Tensor tensor;
  bool stream;  // write it with streaming stores
};

// An output shaped like `like`: streaming stores where stream_into says so (decided on the
// memory as the allocator gave it), fresh large blocks prefaulted.
Output new_output(const Tensor& like) {
  Tensor out = empty_output(like);
  const bool stream = stream_into(out);
  // The last page: the first one of a fresh block already holds the allocator's header.
  if (g_populate.load(std::memory_order_relaxed) && out.nbytes() >= kPopulateMinBytes &&
      !page_resident(reinterpret_cast<uintptr_t>(out.data_ptr()) + out.nbytes() - 1)) {
    populate(out);
  }
  return {out, stream};
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
  at::parallel_for(0, lay.units, grain, [&](int64_t u0, int64_t u1) { lay.walk(u0, u1, body); });
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
  const Output out = new_output(x);
  const Tensor& y = out.tensor;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mabn_channel_affine",
                                  [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const auto a = coefficient<acc_t>(scale), b = coefficient<acc_t>(shift);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* py = y.data_ptr<scalar_t>();
    if (out.stream && affine_streaming(lay, px, py, a, b)) return;
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
  const Output out = new_output(x);
  const Tensor& dx = out.tensor;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mabn_grad_input",
                                  [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const auto a = coefficient<acc_t>(a_t), b = coefficient<acc_t>(b_t);
    const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* pdx = dx.data_ptr<scalar_t>();
    if (out.stream && axpby_streaming(lay, pdy, px, pdx, a, b)) return;
    for_each_unit(lay, [&](int64_t c, int64_t begin, int64_t end) {
      axpby_segment<scalar_t, acc_t>(pdy + begin, px + begin, pdx + begin, end - begin, a[c],
                                     b[c]);
    });
  });
  return dx;
}


// ---------------------------------------------------------------------------------------------
// The fused training step: statistics, schedule and output of one layer in one op per direction.
//
// Every coefficient of channel c depends on channel c's statistics only, so each thread takes
// whole channels: it reduces a channel's planes and, while they are still in its cache, makes
// that channel's output from them. Activation memory is then read once and written once in
// forward (x -> y; three passes with the separate kernels) and read once per input in backward
// (dy, x -> dx; five passes separately). The per-channel arithmetic follows
// mabn_d2/functional.py operation by operation in the statistics dtype.
//
// The one cross-channel rule -- a step whose statistics are not all finite leaves the moving
// averages as they were, and then normalises with the old average -- is applied after the
// channel loop: in that (rare) case the output pass is redone with the kept average.

// Channel by channel only where a channel's memory is a few long runs: a channel of many short
// planes (RoI heads: 1024 planes of 7 x 7) is spread over as many pages as it has planes, which
// defeats the prefetchers and the TLB (measured 1.9x slower at (1024, 256, 7, 7), 1.3x at
// (512, 256, 14, 14)). Those go through memory in order instead, in separate passes (the
// statistics, then the output), still in one op.
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
  Tensor inv_std_t = at::empty({C}, running.options());
  Tensor r_t = at::empty({C}, running.options());
  Tensor chi2_t = at::empty({C}, running.options());
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
  Tensor finite_t = at::empty({}, x.options().dtype(at::kBool));
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
  const Output out = input_grad ? new_output(x) : Output{at::empty({0}, x.options()), false};
  const Tensor& dx = out.tensor;
  Tensor dweight_t = at::empty({C}, weight.options());
  Tensor dbias_t = at::empty({C}, weight.options());
  Tensor psi_batch_t = at::empty({C}, weight.options());
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
}  // namespace

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
  m.def("set_output_cache_limit(int bytes) -> ()", &set_output_cache_limit);
  m.def("output_cache_stats() -> int[]", &output_cache_stats);
  m.def("empty_output_cache() -> ()", &empty_output_cache);
  m.def("set_streaming(int mode) -> ()", &set_streaming);
}

TORCH_LIBRARY_IMPL(mabn_d2, CPU, m) {
  m.impl("second_moment", &second_moment);
  m.impl("channel_affine", &channel_affine);
  m.impl("grad_reductions", &grad_reductions);
  m.impl("grad_input", &grad_input);
  m.impl("train_forward", &train_forward);
  m.impl("train_backward", &train_backward);
}

}  // namespace mabn_d2
