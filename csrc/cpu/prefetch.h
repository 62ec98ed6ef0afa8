// Prefetching for row kernels that read each row only up to its extent.
//
// The helpers have internal linkage (an unnamed namespace), so each kernel file compiles its own
// copy: as shared template instantiations they change the order GCC compiles the softmax's
// functions in, and with it the register allocation of its hot loops.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/parallel.h"

namespace maskkern {
namespace {  // see the top of the file

// A row is read only up to its extent, and a read that stops short of the row's end loses the
// hardware prefetcher. So partial rows are prefetched about kPrefetchBytes ahead, into L2 (the T2
// hint): far enough to cover memory latency, near enough to stay in L2. Whole rows are left to the
// hardware prefetcher.
constexpr int64_t kPrefetchBytes = 32768;

// Rows to prefetch ahead for rows of row_len elements of T.
template <typename T>
int64_t prefetch_distance(int64_t row_len) {
  const int64_t row_bytes = std::max<int64_t>(1, row_len * static_cast<int64_t>(sizeof(T)));
  return std::clamp<int64_t>(kPrefetchBytes / row_bytes, 1, 32);
}

// Prefetches elements [0, n) of a row of row_len elements at `row` (partial rows only).
template <typename T>
void prefetch_row(const T* row, int64_t n, int64_t row_len) {
  if (n < row_len) {
    const char* c = reinterpret_cast<const char*>(row);
    for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64) {
      __builtin_prefetch(c + b, 0, 1);  // read, locality 1 = prefetcht2
      // GCC (12, -O2 and up) deletes a loop whose only effects are prefetches: a prefetch is no
      // side effect to it, and C++ loops are assumed to end (-ffinite-loops). It did, silently,
      // until this empty asm volatile (a side effect it must keep; no code, no barrier).
      asm volatile("");
    }
  }
}

// Calls f(row) for the rows of the block in order, with prefetch(row) `ahead` rows before in the
// task's order (the last rows of a block prefetch the first of the next) and, when again > 0,
// once more `again` rows before: prefetches are dropped when the core's miss buffers are full, and
// a second request for the same lines catches them. The backward (two inputs, twice the prefetches)
// asks twice; the forward once. Each block prefetches its own first rows again as it starts.
template <typename Prefetch, typename F>
void rows_prefetched(const RowBlock& b, int64_t ahead, int64_t again, const Prefetch& prefetch,
                     const F& f) {
  for (int64_t row = b.first; row < std::min(b.end, b.first + ahead); ++row) {
    prefetch(row);
  }
  for (int64_t row = b.first; row < b.end; ++row) {
    if (row + ahead < b.end) {
      prefetch(row + ahead);
    } else if (const int64_t then = b.then_first + (row + ahead - b.end); then < b.then_end) {
      prefetch(then);
    }
    if (again > 0 && row + again < b.end) {
      prefetch(row + again);
    }
    f(row);
  }
}

}  // namespace
}  // namespace maskkern
