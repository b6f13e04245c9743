// Work scheduling for the CPU kernels when other processes compete for the cores.
//
// at::parallel_for splits a range into one static chunk per thread: when the
// OS deschedules one thread (a data-loader worker, another job), everyone waits
// at the end for that thread's whole chunk, and the op runs at the speed of
// its slowest thread. Here each thread of an at::parallel_for(0, threads)
// region instead pulls small units from an atomic counter until none are left,
// so a stolen core costs its share of the work and no more.
//
//   parallel_for_dynamic   units whose results have one owner (rows of an
//                          output): any order gives the same bits.
//   run_ordered            units that add into shared outputs (the tile pairs
//                          of info_nce): each unit writes a private slot, and
//                          the slots are added into the outputs in unit order,
//                          so the result is bitwise the same whichever thread
//                          ran which unit, and for any thread count as long
//                          as the unit's own code is (its GEMMs run on one
//                          thread, see SerialBlas).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>

// MKL's thread-local thread count: the C entry point behind mkl_service.h's
// mkl_set_num_threads_local macro (the lower-case symbol is the Fortran one,
// which takes a pointer). Exported by torch's MKL builds; declared weak, so
// builds without MKL link and skip it. A GEMM called inside an
// OpenMP region may otherwise start a team of its own on every call, whose
// spinning threads fight the region's threads for the cores: measured here
// beside other jobs, the info_nce step ran 5-15x slower than with one thread.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace palfast::cpu {

// Within its scope, GEMMs on this thread run on this thread only.
class SerialBlas {
 public:
  SerialBlas() : prev_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  // 0 restores MKL's global setting, which is what a thread starts with.
  ~SerialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev_);
  }
  SerialBlas(const SerialBlas&) = delete;
  SerialBlas& operator=(const SerialBlas&) = delete;

 private:
  int prev_;
};

// Result slots per thread in run_ordered: a thread may run this many units
// ahead of the oldest unit still being computed (by a peer the OS paused)
// before it has to wait for that unit's slot. The default suits large slots
// (info_nce's backward: [2, kTile, D] each, which its memory bound counts);
// small slots can afford more.
constexpr int64_t kSlotsPerThread = 4;

// Units of the O(N·D) row loops (SpMM, row losses): a few µs of work each, so
// a paused thread holds back little and the atomic counter costs nothing.
constexpr int64_t kRowsPerUnit = 64;
// Units of the loops over feature columns (per-class sums).
constexpr int64_t kColsPerUnit = 16;

inline int64_t num_threads() { return std::max(1, at::get_num_threads()); }

// f(begin, end) over [0, n) in chunks of `chunk`, handed out dynamically.
// f must only write outputs owned by its indices.
template <typename F>
void parallel_for_dynamic(int64_t n, int64_t chunk, const F& f) {
  if (n <= 0) return;
  const int64_t chunks = (n + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(num_threads(), chunks), 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1))
      f(c * chunk, std::min(n, (c + 1) * chunk));
  });
}

// Number of slots for `units` units on the current threads, per_thread each.
inline int64_t ordered_slots(int64_t units, int64_t per_thread = kSlotsPerThread) {
  return std::max<int64_t>(1, std::min(units, per_thread * num_threads()));
}

// compute(unit, slot) writes unit's result into slot (in [0, slots), slots from
// ordered_slots), on any thread; apply(unit, slot) adds it into the outputs,
// one call at a time and in unit order 0, 1, 2, ... Slot of unit u is
// u % slots: it is free once unit u − slots has been applied.
template <typename Compute, typename Apply>
void run_ordered(int64_t units, int64_t slots, const Compute& compute, const Apply& apply) {
  if (units <= 0) return;
  std::atomic<int64_t> next{0};     // next unit to hand out
  std::atomic<int64_t> applied{0};  // units 0 .. applied-1 are in the outputs
  // filled[s] = the unit whose result slot s holds, once computed.
  std::unique_ptr<std::atomic<int64_t>[]> filled(new std::atomic<int64_t>[slots]);
  for (int64_t s = 0; s < slots; ++s) filled[s].store(-1);
  std::mutex applying;

  // Applies every computed unit that is next in order. Never blocks: if a peer
  // is applying, it will find the units computed before it looked, and a unit
  // it missed is applied by the next caller (at the latest, the final call).
  auto apply_ready = [&] {
    std::unique_lock<std::mutex> lock(applying, std::try_to_lock);
    if (!lock.owns_lock()) return;
    for (int64_t u = applied.load(); u < units && filled[u % slots].load() == u; ++u) {
      apply(u, u % slots);
      applied.store(u + 1);
    }
  };

  // A unit that throws is never filled: the others stop instead of waiting for
  // it, and at::parallel_for rethrows the exception.
  std::atomic<bool> failed{false};
  // The caller's thread-local state (autograd exclusions of the kernel being
  // below autograd, inference mode, ...) for the ATen ops the units call: an
  // OpenMP worker thread starts without it, and at::mm_out on a tensor that
  // requires grad would then refuse to run there.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, std::min(num_threads(), units), 1, [&](int64_t, int64_t) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    const SerialBlas serial_blas;
    for (int64_t u = next.fetch_add(1); u < units && !failed.load(); u = next.fetch_add(1)) {
      while (applied.load() <= u - slots) {  // slot still holds an unapplied unit
        if (failed.load()) return;
        apply_ready();
        std::this_thread::yield();
      }
      try {
        compute(u, u % slots);
      } catch (...) {
        failed.store(true);
        throw;
      }
      filled[u % slots].store(u);
      apply_ready();
    }
  });
  apply_ready();  // single-threaded now: applies whatever the threads left
}

}  // namespace palfast::cpu
