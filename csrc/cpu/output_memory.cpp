// The output cache described in output_memory.h.

#include "cpu/output_memory.h"

#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/Storage.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <list>
#include <mutex>
#include <utility>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace maskkern {
namespace {

#if defined(__linux__) && !defined(MASKKERN_SANITIZE)
constexpr bool kCacheBuilt = true;
#else
constexpr bool kCacheBuilt = false;
#endif

constexpr size_t kHugePage = size_t{2} << 20;
// Below this, malloc serves outputs from its heap, whose pages are already warm.
constexpr size_t kMinCachedBytes = size_t{1} << 20;

size_t round_up(size_t n, size_t multiple) { return (n + multiple - 1) / multiple * multiple; }

#ifdef __linux__
// A 2 MiB-aligned private anonymous mapping of `bytes` (a multiple of 2 MiB), or nullptr: map
// 2 MiB more than needed and unmap the unaligned head and tail.
void* map_block(size_t bytes) {
  const size_t span = bytes + kHugePage;
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) {
    return nullptr;
  }
  const auto begin = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t first = round_up(begin, kHugePage), last = first + bytes, end = begin + span;
  if (first > begin) {
    munmap(raw, first - begin);
  }
  if (end > last) {
    munmap(reinterpret_cast<void*>(last), end - last);
  }
#ifdef MADV_HUGEPAGE
  madvise(reinterpret_cast<void*>(first), bytes, MADV_HUGEPAGE);  // only advice: errors ignored
#endif
  return reinterpret_cast<void*>(first);
}

void unmap_block(void* ptr, size_t bytes) { munmap(ptr, bytes); }
#else
void* map_block(size_t) { return nullptr; }
void unmap_block(void*, size_t) {}
#endif

size_t limit_from_env() {
  const char* text = std::getenv("MASKKERN_CPU_CACHE_MB");
  if (text == nullptr || *text == '\0') {
    return size_t{1024} << 20;
  }
  char* end = nullptr;
  const long long mb = std::strtoll(text, &end, 10);
  return (*end != '\0' || mb <= 0) ? 0 : static_cast<size_t>(mb) << 20;
}

class OutputCache {
 public:
  OutputCache() : limit_(kCacheBuilt ? limit_from_env() : 0) {}

  bool enabled() const { return limit_ > 0 && !bypassed_.load(std::memory_order_relaxed); }

  // While bypassed, outputs come from the OS and freed blocks go back to it; the cached blocks
  // stay cached. Returns the previous setting.
  bool set_bypassed(bool bypassed) { return bypassed_.exchange(bypassed); }

  // A block of exactly `bytes` (a multiple of 2 MiB): the most recently returned one of that
  // size, else a new mapping; nullptr when mmap fails.
  void* take(size_t bytes) {
    void* ptr = nullptr;
    size_t in_use = 0, reserved = 0;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->second == bytes) {
          ptr = it->first;
          cached_ -= bytes;
          free_.erase(it);
          break;
        }
      }
      if (ptr == nullptr) {
        ptr = map_block(bytes);
      }
      if (ptr != nullptr) {
        in_use_ += bytes;
      }
      in_use = in_use_, reserved = in_use_ + cached_;
    }
    if (ptr != nullptr) {
      c10::reportMemoryUsageToProfiler(ptr, static_cast<int64_t>(bytes), in_use, reserved,
                                       c10::Device(c10::kCPU));
    }
    return ptr;
  }

  // Keeps the block for the next request of its size (while bypassed, unmaps it); unmaps the least
  // recently returned blocks beyond the limit.
  void give_back(void* ptr, size_t bytes) {
    size_t in_use = 0, reserved = 0;
    std::list<std::pair<void*, size_t>> evicted;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      in_use_ -= bytes;
      if (bypassed_.load(std::memory_order_relaxed)) {
        evicted.emplace_back(ptr, bytes);
      } else {
        free_.emplace_front(ptr, bytes);
        cached_ += bytes;
        evict_beyond_limit(evicted);
      }
      in_use = in_use_, reserved = in_use_ + cached_;
    }
    unmap_all(evicted);
    c10::reportMemoryUsageToProfiler(ptr, -static_cast<int64_t>(bytes), in_use, reserved,
                                     c10::Device(c10::kCPU));
  }

  int64_t clear() {
    std::list<std::pair<void*, size_t>> evicted;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      evicted.swap(free_);
      cached_ = 0;
    }
    return unmap_all(evicted);
  }

 private:
  // Moves the least recently returned blocks beyond the limit to `evicted`; mutex_ held.
  void evict_beyond_limit(std::list<std::pair<void*, size_t>>& evicted) {
    while (cached_ > limit_) {
      evicted.splice(evicted.end(), free_, std::prev(free_.end()));
      cached_ -= evicted.back().second;
    }
  }

  // Outside the lock: munmap is a system call.
  static int64_t unmap_all(const std::list<std::pair<void*, size_t>>& blocks) {
    int64_t released = 0;
    for (const auto& [p, n] : blocks) {
      unmap_block(p, n);
      released += static_cast<int64_t>(n);
    }
    return released;
  }

  const size_t limit_;
  std::atomic<bool> bypassed_{false};
  std::mutex mutex_;
  std::list<std::pair<void*, size_t>> free_;  // most recently returned first
  size_t cached_ = 0, in_use_ = 0;
};

// Never destroyed: tensors may be freed during interpreter shutdown, after static destructors.
OutputCache& cache() {
  static auto* instance = new OutputCache();
  return *instance;
}

struct Block {
  void* ptr;
  size_t bytes;
};

void return_block(void* ctx) {
  const auto* block = static_cast<Block*>(ctx);
  cache().give_back(block->ptr, block->bytes);
  delete block;
}

}  // namespace

at::Tensor empty_for_writing(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t nbytes = static_cast<size_t>(c10::multiply_integers(sizes)) *
                        static_cast<size_t>(options.dtype().itemsize());
  if (!options.device().is_cpu() || nbytes < kMinCachedBytes || !cache().enabled()) {
    return at::empty(sizes, options);
  }
  const size_t bytes = round_up(nbytes, kHugePage);
  void* ptr = cache().take(bytes);
  if (ptr == nullptr) {
    return at::empty(sizes, options);  // out of address space: PyTorch reports it its own way
  }
  c10::DataPtr data(ptr, new Block{ptr, bytes}, &return_block, c10::Device(c10::kCPU));
  // Resizable through the default CPU allocator, like any CPU tensor's storage.
  c10::Storage storage(c10::Storage::use_byte_size_t(), nbytes, std::move(data),
                       c10::GetCPUAllocator(), /*resizable=*/true);
  return at::empty({0}, options).set_(storage, 0, sizes);
}

int64_t empty_cache() { return cache().clear(); }

bool set_cache_bypassed(bool bypassed) { return cache().set_bypassed(bypassed); }

// The cache's ops live with the cache, in the CPU kernel library (one per instruction-set level,
// of which one is loaded): an uninitialised contiguous CPU tensor for a kernel to fill; the
// release of every cached block (returns the bytes released); the bypass.
TORCH_LIBRARY_FRAGMENT(maskkern, m) {
  m.def("empty_for_writing(int[] size, ScalarType dtype) -> Tensor",
        [](at::IntArrayRef size, at::ScalarType dtype) {
          return empty_for_writing(size, at::TensorOptions().dtype(dtype));
        });
  m.def("empty_cache() -> int", &empty_cache);
  m.def("set_cache_bypassed(bool bypassed) -> bool", &set_cache_bypassed);
}

}  // namespace maskkern
