// Tasks of uneven cost spread over the threads as they free up.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace yolo_kernels {

// fn(task, state) for every task in [0, n): each thread takes the next task when it finishes one,
// with its own State (scratch) for all of them. at::parallel_for would hand each thread an equal
// share of the range up front, and a thread whose share holds the costly tasks (an image with more
// or larger boxes) would finish while the other waits. With `order`, the tasks are taken in that
// order (the costliest first: the last ones, which leave a thread idle, are then short). Which
// thread runs a task must not change its result (the kernels' tasks write their own outputs): the
// results are deterministic.
template <typename State, typename F>
void parallel_tasks(int64_t n, F&& fn, const int64_t* order = nullptr) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    State state;
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < n;) fn(order != nullptr ? order[t] : t, state);
  });
}

}  // namespace yolo_kernels
