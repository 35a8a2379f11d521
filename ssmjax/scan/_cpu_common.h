// Helpers shared by the CPU FFI kernels of ssmjax.scan (_<name>_cpu.cc): work split over
// XLA's intra-op thread pool and typed views of FFI buffers. Header-only; ssmjax.scan._ffi
// hashes it with each kernel source, so editing it rebuilds the kernels.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ssmjax_cpu {

namespace ffi = xla::ffi;

// Runs body(unit) for unit in [0, units) on the pool (the caller works too) and returns
// when every unit is done. Late pool tasks find no unit left and touch only `state`.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t units, int64_t threads, const F& body) {
  threads = std::min(threads, units);
  if (threads <= 1) {
    for (int64_t i = 0; i < units; ++i) body(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mutex;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  const F* fn = &body;
  auto run = [state, units, fn]() {
    for (;;) {
      int64_t i = state->next.fetch_add(1);
      if (i >= units) return;
      (*fn)(i);
      if (state->done.fetch_add(1) + 1 == units) {
        std::lock_guard<std::mutex> lock(state->mutex);
        state->cv.notify_all();
      }
    }
  };
  for (int64_t t = 1; t < threads; ++t) {
    auto task = run;
    pool.Schedule(std::move(task));
  }
  run();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->cv.wait(lock, [&] { return state->done.load() == units; });
}

template <typename T>
T* data(ffi::AnyBuffer& x) { return static_cast<T*>(x.untyped_data()); }
template <typename T>
T* data(ffi::Result<ffi::AnyBuffer>& x) { return static_cast<T*>(x->untyped_data()); }

}  // namespace ssmjax_cpu
