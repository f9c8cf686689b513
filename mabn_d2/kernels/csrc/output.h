// A kernel's outputs. An activation-sized one: where its memory comes from (the output cache),
// whether to write it with streaming stores, and prefaulting its fresh pages.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace mabn_d2 {

struct Output {
  at::Tensor tensor;
  bool stream;  // write it with streaming stores (simd.h: affine_any / axpby_any)
};

// An output shaped like `like`: streaming stores where they pay (decided on the memory as the
// allocator gave it), fresh large blocks prefaulted.
Output new_output(const at::Tensor& like);

// at::empty for the small results (per-channel vectors), out of line: ATen/ops/empty.h would
// add seconds to the compile of every file that includes it.
at::Tensor empty_tensor(at::IntArrayRef sizes, const at::TensorOptions& options);

// When to stream: 0 never, 1 when the output is large and resident (default), 2 whenever the
// output is large (tests). The op behind mabn_d2.kernels.cpp.set_streaming.
void set_streaming(int64_t mode);

}  // namespace mabn_d2
