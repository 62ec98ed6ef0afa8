// Fresh output memory for the CPU kernels. A large output comes straight from mmap, and the kernel
// is the first to touch it: faulting it in 4 KiB pages costs more than the kernels themselves on
// our machines (two fresh 32 MiB outputs: ~32 ms of CPU in 4 KiB pages, ~8 ms in 2 MiB pages; a
// 512 MiB logits gradient: ~1 s against 0.3 s of compute). So, before the first write, ask for
// transparent huge pages on the buffer's aligned 2 MiB blocks — as PyTorch's own allocator does for
// every allocation under THP_MEM_ALLOC_ENABLE=1. Only advice: where THP is off, the range is not a
// private mapping or its pages are already touched, nothing changes.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstddef>
#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace maskkern {

inline void advise_huge_pages(void* ptr, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const auto begin = reinterpret_cast<uintptr_t>(ptr);
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + bytes) & ~(kHugePage - 1);
  if (last > first) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // errors ignored
  }
#endif
}

// An uninitialised tensor that the caller is about to fill completely.
inline at::Tensor empty_for_writing(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  advise_huge_pages(t.data_ptr(), t.nbytes());
  return t;
}

}  // namespace maskkern
