// The kernels' outputs: streaming stores and prefaulting for activation-sized ones (output.h).
#include "output.h"

#include "output_cache.h"

#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>

namespace mabn_d2 {
namespace {

// Large float32 outputs can be written with non-temporal (streaming) stores, which skip reading
// each output cache line before overwriting it (a third less memory traffic for y = a * x + b).
// That only pays when the output's pages are already resident (memory reused by the allocator):
// on fresh pages the OS has just zeroed the lines into the cache, and streaming past them is
// slower (docs/speed.md).
//
// Streamed writes must cover whole cache lines to pay: planes (H * W) this large make the
// partial lines at plane boundaries negligible (RoI-head planes of 7 x 7 do not stream).
constexpr int64_t kStreamMinBytes = int64_t{32} << 20;
constexpr int64_t kStreamMinPlane = 4096;
std::atomic<int> g_streaming{1};

bool page_resident(uintptr_t address) {
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  unsigned char state = 0;
  return mincore(reinterpret_cast<void*>(address & ~(page - 1)), 1, &state) == 0 && (state & 1);
}

bool stream_into(const at::Tensor& out) {
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
// kernel writes it: the OS still zeroes every page, but without a trap per page
// (docs/speed.md). Where the call is unsupported it fails and the pages fault in as usual.
constexpr int64_t kPopulateMinBytes = int64_t{4} << 20;
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
std::atomic<bool> g_populate{true};

void populate(const at::Tensor& out) {
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

// From the output cache where it takes the output, from PyTorch's allocator otherwise.
at::Tensor empty_output(const at::Tensor& like) {
  c10::Allocator* cache = output_cache_for(static_cast<size_t>(like.nbytes()));
  if (cache == nullptr) return at::empty_like(like);
  return at::detail::empty_generic(like.sizes(), cache, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   like.scalar_type(), c10::MemoryFormat::Contiguous);
}

}  // namespace

void set_streaming(int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 2, "mabn_d2: streaming mode must be 0, 1 or 2, got ", mode);
  g_streaming.store(static_cast<int>(mode));
}

at::Tensor empty_tensor(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

Output new_output(const at::Tensor& like) {
  at::Tensor out = empty_output(like);
  const bool stream = stream_into(out);
  // The last page: the first one of a fresh block already holds the allocator's header.
  if (g_populate.load(std::memory_order_relaxed) && out.nbytes() >= kPopulateMinBytes &&
      !page_resident(reinterpret_cast<uintptr_t>(out.data_ptr()) + out.nbytes() - 1)) {
    populate(out);
  }
  return {out, stream};
}

}  // namespace mabn_d2
