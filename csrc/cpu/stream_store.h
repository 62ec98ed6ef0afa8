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

#include "cpu/vec_row.h"

namespace maskkern {

// About half the last-level cache: an output this large would not stay there for its reader, so
// normal stores would only evict the inputs; smaller outputs are stored normally, so that the next
// op finds them in the caches.
constexpr size_t kStreamBytes = size_t{16} << 20;

inline bool worth_streaming(size_t output_bytes) { return output_bytes >= kStreamBytes; }

// dst[0, bytes) = src[0, bytes), or zeros when src is null: the middle, aligned to the widest
// vector (64 bytes with AVX-512, else 32), streamed; the unaligned head and tail stored normally.
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
#if defined(__AVX512F__)
  using Line = __m512i;  // one streamed store per cache line: half the instructions of two
  const auto stream_line = [](Line* to, const char* from) {
    _mm512_stream_si512(to, from ? _mm512_loadu_si512(from) : _mm512_setzero_si512());
  };
#else
  using Line = __m256i;
  const auto stream_line = [](Line* to, const char* from) {
    _mm256_stream_si256(to, from ? _mm256_loadu_si256(reinterpret_cast<const Line*>(from))
                                 : _mm256_setzero_si256());
  };
#endif
  constexpr size_t width = sizeof(Line);
  const size_t head = std::min(bytes, (width - reinterpret_cast<uintptr_t>(d) % width) % width);
  plain(d, s, head);
  const size_t vectors = (bytes - head) / width;
  auto* dv = reinterpret_cast<Line*>(d + head);
  for (size_t i = 0; i < vectors; ++i) {
    stream_line(dv + i, s ? s + head + i * width : nullptr);
  }
  const size_t done = head + vectors * width;
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

// Streams the `bytes` (16, 32 or 64) at src to dst, which is aligned to them.
template <size_t bytes>
inline void stream_aligned(void* dst, const void* src) {
  static_assert(bytes == 16 || bytes == 32 || bytes == 64);
#if defined(__AVX512F__)
  if constexpr (bytes == 64) {
    _mm512_stream_si512(static_cast<__m512i*>(dst), _mm512_load_si512(src));
    return;
  }
#endif
#if defined(__AVX2__)
  if constexpr (bytes >= 32) {
    for (size_t i = 0; i < bytes / 32; ++i) {
      _mm256_stream_si256(static_cast<__m256i*>(dst) + i,
                          _mm256_load_si256(static_cast<const __m256i*>(src) + i));
    }
  } else {
    _mm_stream_si128(static_cast<__m128i*>(dst), _mm_load_si128(static_cast<const __m128i*>(src)));
  }
#else
  std::memcpy(dst, src, bytes);
#endif
}

// dst[j, j + count) = vector_at(j, count) for the vectors of [0, n), and dst[n, len) = 0. A
// streamed row made of whole cache lines goes out vector by vector, straight from the registers
// (the lanes past n zeroed), so every line gets streamed stores only. Otherwise the row is finished
// in `row`, which is dst itself unless streaming (then scratch of len elements, which may be the
// memory vector_at reads: each vector is read before it is stored), and written with write_row.
template <typename scalar_t, typename VectorAt>
void write_row_vectors(scalar_t* dst, int64_t n, int64_t len, bool stream, scalar_t* scratch,
                       const VectorAt& vector_at) {
  using Vec = Vectorized<acc_type<scalar_t>>;
  constexpr int64_t lanes = kLanes<scalar_t>;
  const bool whole_lines = reinterpret_cast<uintptr_t>(dst) % 64 == 0 &&
                           static_cast<size_t>(len) * sizeof(scalar_t) % 64 == 0;
  if (stream && whole_lines) {
    alignas(64) scalar_t staged[lanes];
    int64_t j = 0;
    for (; j < n; j += lanes) {
      const int64_t count = std::min(lanes, n - j);
      store(staged,
            count < lanes ? Vec::set(Vec(0), vector_at(j, count), count) : vector_at(j, count),
            lanes);
      stream_aligned<sizeof(staged)>(dst + j, staged);
    }
    store(staged, Vec(0), lanes);
    for (; j < len; j += lanes) {
      stream_aligned<sizeof(staged)>(dst + j, staged);
    }
    return;
  }
  scalar_t* row = stream ? scratch : dst;
  for (int64_t j = 0; j < n; j += lanes) {
    const int64_t count = std::min(lanes, n - j);
    store(row + j, vector_at(j, count), count);
  }
  write_row(dst, row, n, len, stream);
}

inline void stream_fence() {
#if defined(__AVX2__)
  _mm_sfence();
#endif
}

}  // namespace maskkern
