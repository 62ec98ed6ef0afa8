// Non-temporal (streaming) stores for outputs far larger than the caches that the kernel writes
// once and does not read back: a streamed line skips the read-for-ownership of a normal store
// (a third less memory traffic) and does not evict the inputs from the caches. Streamed stores are
// weakly ordered: a thread ends its share of the work with stream_fence() before another reads.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace maskkern {

// About half the last-level cache: an output this large would not stay there for its reader, so
// normal stores would only evict the inputs; smaller outputs are stored normally, so that the next
// op finds them in the caches.
constexpr size_t kStreamBytes = size_t{16} << 20;

inline bool worth_streaming(size_t output_bytes) { return output_bytes >= kStreamBytes; }

// dst[0, bytes) = src[0, bytes), or zeros when src is null: the 32-byte-aligned middle streamed,
// the unaligned head and tail stored normally.
inline void stream_copy(void* dst, const void* src, size_t bytes) {
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  const auto plain = [](char* to, const char* from, size_t n) {
    if (n == 0) {
      return;
    }
    if (from != nullptr) {
      std::memcpy(to, from, n);
    } else {
      std::memset(to, 0, n);
    }
  };
#if defined(__AVX2__)
  const size_t head = std::min(bytes, (32 - reinterpret_cast<uintptr_t>(d) % 32) % 32);
  plain(d, s, head);
  const size_t vectors = (bytes - head) / 32;
  auto* dv = reinterpret_cast<__m256i*>(d + head);
  const __m256i zero = _mm256_setzero_si256();
  for (size_t i = 0; i < vectors; ++i) {
    _mm256_stream_si256(
        dv + i, s ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + head) + i) : zero);
  }
  const size_t done = head + vectors * 32;
  plain(d + done, s ? s + done : nullptr, bytes - done);
#else
  plain(d, s, bytes);
#endif
}

// dst[0, n) = row[0, n) and dst[n, len) = 0 (all-zero bits = +0.0), streamed when `stream`.
// Unless streaming, the row was computed in dst itself and only the tail is written. When
// streaming, row is scratch with room for len elements: its zeros are extended to the cache line
// where dst's zeros begin, so that no line gets both a normal and a streamed store (a normal store
// reads the line first, and the streamed one then evicts it again: a round trip per row).
template <typename T>
void write_row(T* dst, T* row, int64_t n, int64_t len, bool stream) {
  const auto bytes = [](int64_t count) { return static_cast<size_t>(count) * sizeof(T); };
  if (stream) {
    int64_t m = n;
    while (n > 0 && m < len && reinterpret_cast<uintptr_t>(dst + m) % 64 != 0) {
      ++m;
    }
    if (m > n) {
      std::memset(row + n, 0, bytes(m - n));
    }
    stream_copy(dst, row, bytes(m));
    stream_copy(dst + m, nullptr, bytes(len - m));
  } else if (len > n) {
    std::memset(dst + n, 0, bytes(len - n));
  }
}

inline void stream_fence() {
#if defined(__AVX2__)
  _mm_sfence();
#endif
}

}  // namespace maskkern
