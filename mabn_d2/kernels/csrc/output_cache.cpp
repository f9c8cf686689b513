// The output cache: a c10::Allocator that keeps freed large blocks for the next output.
//
// glibc serves blocks of 32 MiB and more with fresh mmap pages and returns them to the OS on
// free, and the OS zeroes every fresh page on first touch: at detection shapes that costs as
// much as the kernel itself, in every training step (docs/speed.md). A block freed here waits
// for the next output of about its size instead (best fit, at most 1/8 larger; of equal ones
// the most recently freed, whose pages are likeliest still in cache). Freed blocks stay
// allocated up to what the model needs: at most as many bytes as its outputs from here have
// held at once (the peak of the blocks in use; a training step frees them all at its end and
// the next one asks for the same again), or up to a fixed limit where one is set (env
// MABN_D2_CPU_CACHE_MB; 0 turns the cache off); the least recently freed go first. Allocations are reported to PyTorch's profiler like the
// default allocator's, so memory profiles and peak-memory numbers see them.
#include "output_cache.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <iterator>
#include <limits>
#include <map>
#include <mutex>
#include <utility>

namespace mabn_d2 {
namespace {

constexpr size_t kCacheMinBytes = size_t{4} << 20;
constexpr size_t kCacheGranule = size_t{2} << 20;  // block sizes: multiples of 2 MiB
constexpr size_t kPageAlign = 4096;
constexpr int64_t kFollowModel = -1;
constexpr size_t kNoLimit = std::numeric_limits<size_t>::max();

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
      blocks_in_use_ += block_size;
      peak_blocks_in_use_ = std::max(peak_blocks_in_use_, blocks_in_use_);
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

  // Bytes, or kFollowModel: the peak of the blocks in use. Also evicts down to the new limit.
  void set_limit(int64_t bytes) {
    TORCH_CHECK(bytes >= 0 || bytes == kFollowModel,
                "mabn_d2: the output cache limit must be >= 0 bytes (or -1: what the model "
                "needs), got ", bytes);
    std::vector<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_ = bytes == kFollowModel ? kNoLimit : static_cast<size_t>(bytes);
      evict(0, evicted);
    }
    free_blocks(evicted);
  }

  bool enabled() const { return limit_.load(std::memory_order_relaxed) > 0; }

  // {limit (-1: what the model needs), cached bytes, bytes in use, hits, misses, peak of the
  // blocks in use}
  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t limit = limit_.load();
    return {limit == kNoLimit ? kFollowModel : static_cast<int64_t>(limit),
            static_cast<int64_t>(cached_), static_cast<int64_t>(in_use_),
            static_cast<int64_t>(hits_), static_cast<int64_t>(misses_),
            static_cast<int64_t>(peak_blocks_in_use_)};
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

  // Under mutex_: how many freed bytes may stay.
  size_t cap() const { return std::min(limit_.load(), peak_blocks_in_use_); }

  // Under mutex_: drops the least recently freed blocks until `incoming` more bytes fit.
  void evict(size_t incoming, std::vector<Block>& evicted) {
    while (!free_.empty() && cached_ + incoming > cap()) {
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
      cache.blocks_in_use_ -= lease->size;
      if (lease->size <= cache.cap()) {
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
  // size -> (block, when freed): best fit by size, eviction by age (a linear scan: blocks are
  // at least kCacheMinBytes, so the limit allows few of them).
  std::multimap<size_t, std::pair<void*, uint64_t>> free_;
  // The default follows the model; mabn_d2.kernels.cpp sets MABN_D2_CPU_CACHE_MB, where given,
  // on load.
  std::atomic<size_t> limit_{kNoLimit};
  size_t cached_ = 0;
  size_t in_use_ = 0;
  size_t blocks_in_use_ = 0;  // their block sizes (in_use_: the bytes asked for)
  size_t peak_blocks_in_use_ = 0;
  uint64_t clock_ = 0;
  uint64_t hits_ = 0;
  uint64_t misses_ = 0;
};

}  // namespace

c10::Allocator* output_cache_for(size_t nbytes) {
  OutputCache& cache = OutputCache::instance();
  return cache.enabled() && nbytes >= kCacheMinBytes ? &cache : nullptr;
}

void set_output_cache_limit(int64_t bytes) { OutputCache::instance().set_limit(bytes); }
std::vector<int64_t> output_cache_stats() { return OutputCache::instance().stats(); }
void empty_output_cache() { OutputCache::instance().empty(); }

}  // namespace mabn_d2
