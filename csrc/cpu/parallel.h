// The CPU kernels' task scheduler.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "cpu/stream_store.h"

namespace maskkern {

// Runs worker(claim) once on each intra-op thread; claim(task) hands out the tasks [0, tasks) one
// at a time (an atomic counter) and returns false when none is left. On shared cores a thread that
// is descheduled then does not hold up a fixed share of the work; which thread runs a task never
// changes a result. Each thread ends with stream_fence(), so streamed stores are visible after.
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

}  // namespace maskkern
