// Parallel loops for the CPU kernels on XLA's own intra-op thread pool (the FFI ThreadPool
// context), so a kernel never competes with idle-spinning XLA workers for the cores.
#pragma once

#include <immintrin.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace jaxserve {

// Calls fn(i) for every i in [0, n) on the calling thread and up to num_threads - 1 pool
// tasks, items handed out in order; returns once every item is done. A task that starts late
// finds no item left and only touches the shared counters it co-owns.
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n,
                        std::function<void(int64_t)> fn) {
  if (n <= 0) return;
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    int64_t n;
    std::function<void(int64_t)> fn;
  };
  auto state = std::make_shared<State>();
  state->n = n;
  state->fn = std::move(fn);
  auto drain = [](State& s) {
    for (int64_t i = s.next.fetch_add(1); i < s.n; i = s.next.fetch_add(1)) {
      s.fn(i);
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([state, drain] { drain(*state); });
  drain(*state);
  for (int spins = 0; state->done.load(std::memory_order_acquire) < n; ++spins) {
    if (spins < 4096) {
      _mm_pause();
    } else {
      std::this_thread::yield();
    }
  }
}

}  // namespace jaxserve
