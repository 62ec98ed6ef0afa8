// The CPU kernels' scheduler: every kernel in csrc/cpu runs its threads through one of these.
//
//   parallel_tasks       tasks of any cost, claimed one at a time (an atomic counter);
//   parallel_rows        a row kernel's rows, claimed in blocks, rows costing unequal amounts;
//   parallel_row_ranges  rows of equal cost, split evenly between the threads up front.
//
// Each thread ends its share with stream_fence(), so streamed stores are visible after the call,
// and which thread runs which piece never changes a result.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "cpu/stream_store.h"

namespace maskkern {

// Below this many elements of work a second thread costs more than it saves: the least a piece of
// a static split, or a task, is given.
constexpr int64_t kMinTaskElems = 32768;

// Tasks per thread when work is cut into pieces for parallel_tasks: small enough pieces that the
// threads finish together.
constexpr int64_t kTasksPerThread = 8;

// The attention backward aims lower: each task it adds beyond one per (sequence, kv head) costs a
// copy of dQ and a pass to sum it, so it settles for fewer, larger pieces.
constexpr int64_t kSplitTasksPerThread = 4;

// Runs worker(claim) once on each intra-op thread; claim(task) hands out the tasks [0, tasks) one
// at a time (an atomic counter) and returns false when none is left. On shared cores a thread that
// is descheduled then does not hold up a fixed share of the work.
template <typename Worker>
void parallel_tasks(int64_t tasks, const Worker& worker) {
  std::atomic<int64_t> next{0};
  const auto claim = [&next, tasks](int64_t& task) {
    task = next.fetch_add(1, std::memory_order_relaxed);
    return task < tasks;
  };
  const int64_t threads = std::min<int64_t>(tasks, at::get_num_threads());
  if (threads <= 0) {
    return;
  }
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    worker(claim);
    stream_fence();
  });
}

// The rows of row_len elements a piece of a static split gets at least (kMinTaskElems).
inline int64_t min_rows_per_task(int64_t row_len) {
  return std::max<int64_t>(1, kMinTaskElems / std::max<int64_t>(row_len, 1));
}

// f(first, end) on contiguous ranges of the rows [0, rows), one range per thread
// (at::parallel_for), each of at least min_rows_per_task(row_len) rows. For rows of equal cost,
// where claiming would only add atomics and scatter a thread's rows.
template <typename F>
void parallel_row_ranges(int64_t rows, int64_t row_len, const F& f) {
  at::parallel_for(0, rows, min_rows_per_task(row_len), [&](int64_t first, int64_t end) {
    f(first, end);
    stream_fence();
  });
}

// parallel_rows' unit of work: a block of rows, and the block its task runs next (so that
// prefetching, cpu/prefetch.h, runs on into it rather than starting every block cold).
struct RowBlock {
  int64_t first, end;            // the rows of this block
  int64_t then_first, then_end;  // the rows of the task's next block; empty when it has none
};

// The tasks parallel_rows runs rows of row_len elements on: one per thread, or one in all below
// kMinTaskElems elements.
inline int64_t row_tasks(int64_t rows, int64_t row_len) {
  return rows * row_len < kMinTaskElems ? 1 : std::min<int64_t>(at::get_num_threads(), rows);
}

// Calls f(task, RowBlock) for blocks of about 64K elements of the rows [0, rows). Rows cost in
// proportion to their extent (lengths, causal), and at::parallel_for gives each thread one
// contiguous range of its indices: so the indices are tasks (`tasks` of them, from row_tasks; f
// gets its task's index for per-task scratch), and each task takes the next block from a shared
// counter when it is done with its last, which balances rows of uneven cost (a fixed round robin
// does not: under causal, alternate blocks are the longer rows). A task claims the block it runs
// next before it runs the current one: that is the RowBlock's `then`.
template <typename F>
void parallel_rows(int64_t rows, int64_t row_len, int64_t tasks, const F& f) {
  constexpr int64_t kBlockElems = 65536;
  const int64_t block = std::max<int64_t>(1, kBlockElems / std::max<int64_t>(row_len, 1));
  const int64_t blocks = (rows + block - 1) / block;
  std::atomic<int64_t> next_block{0};
  at::parallel_for(0, tasks, 1, [&](int64_t first, int64_t end) {
    for (const auto task : c10::irange(first, end)) {
      for (int64_t blk = next_block++; blk < blocks;) {
        const int64_t then = next_block++;
        const bool more = then < blocks;
        f(task, RowBlock{blk * block, std::min(rows, (blk + 1) * block), more ? then * block : 0,
                         more ? std::min(rows, (then + 1) * block) : 0});
        blk = then;
      }
    }
    stream_fence();
  });
}

}  // namespace maskkern
