// Large outputs come from a cache of freed blocks (output_cache.cpp), as CUDA tensors do from
// PyTorch's caching allocator, so that a training step does not pay the OS's page zeroing for
// fresh activation-sized outputs every time.
#pragma once

#include <c10/core/Allocator.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace mabn_d2 {

// The allocator for an output of `nbytes`, or nullptr where PyTorch's own should serve it
// (a small output, or the cache turned off). c10 only, no ATen, so that output_cache.cpp
// compiles quickly.
c10::Allocator* output_cache_for(size_t nbytes);

// The ops behind mabn_d2.kernels.cpp.set_output_cache_limit / output_cache_stats /
// empty_output_cache.
void set_output_cache_limit(int64_t bytes);
// {limit (-1: what the model needs), cached bytes, bytes in use, hits, misses, peak of the
// blocks in use}
std::vector<int64_t> output_cache_stats();
void empty_output_cache();

}  // namespace mabn_d2
