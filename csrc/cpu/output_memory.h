// Output memory of the CPU kernels: large outputs come from a cache of blocks that earlier outputs
// of maskkern gave back, already faulted in.
//
// Why: a large allocation comes straight from mmap, and the kernel is the first to touch it, so
// every call pays the OS to fault in and zero its pages, which can cost more than the kernel
// itself. Training loops ask for the same sizes step after step, so a freed output is kept and
// handed to the next request of the same rounded size, the way PyTorch's CUDA caching allocator
// does. New blocks are 2 MiB-aligned and advised to use transparent huge pages, which fault in
// with far less work per byte.
//
// The cache holds at most MASKKERN_CPU_CACHE_MB MiB (read at the first output; default 1024; 0
// turns it off); beyond that the least recently returned blocks are unmapped. empty_cache()
// unmaps every cached block; set_cache_bypassed(true) makes outputs come from, and go back to, the
// OS (the benchmark's measure of what the cache is worth). Blocks in use are reported to the
// PyTorch profiler as allocations, so memory profiles stay true. Sanitizer builds
// (MASKKERN_SANITIZE) bypass the cache: a block is rounded up, and a write past a tensor's end
// would land in the block instead of a redzone.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace maskkern {

// An uninitialised contiguous tensor that the caller is about to fill completely.
at::Tensor empty_for_writing(at::IntArrayRef sizes, const at::TensorOptions& options);

// Unmaps every cached block; returns the bytes released.
int64_t empty_cache();

// Returns the previous setting.
bool set_cache_bypassed(bool bypassed);

}  // namespace maskkern
