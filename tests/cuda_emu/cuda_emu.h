// A CPU emulator for the subset of CUDA that palfast's kernels use, so the real
// csrc/cuda/**/*.cu sources run in the test suite on machines without a GPU.
// Test-only: tests/cuda_emu/build.py compiles csrc/cuda/**/*.cu with g++ against
// this header (through the stand-in CUDA headers in include/); nothing here is
// part of the palfast package.
//
// Semantics kept from the GPU, because they are what kernels get wrong:
//   * a launch runs its blocks one after another, in a random order; the
//     threads of a block are fibers on one OS thread, so __shared__
//     (a function-local static here) is shared by the block's threads;
//   * the scheduler switches fibers only where threads wait for each other
//     (__syncthreads, __syncwarp, shuffles, wmma::mma_sync, ldmatrix and
//     mma.sync of csrc/cuda/mma.cuh) and picks the
//     next fiber at random (seeded): code that reads shared memory written by
//     another thread without a barrier in between sees stale data;
//   * __syncthreads is a real barrier (exited threads no longer count, as on
//     sm_70+); warp collectives wait for every lane of their mask, and a mask
//     naming an exited lane is reported as an error, as is a deadlock;
//   * __half / __nv_bfloat16 round to nearest even like __float2half_rn;
//   * WMMA m16n16k16 fragments hold the elements of the PTX ISA's
//     mma.m16n8k16 layouts (two n8 halves), one lane's share per thread, and
//     mma_sync multiplies with fp32 accumulation; fragment pointers must be
//     32-byte aligned and ldm a multiple of 16 bytes, as on the GPU;
//   * mma.sync m16n8k16 and ldmatrix .x4 (csrc/cuda/mma.cuh) likewise;
//     a cp.async destination holds poison (0xFF bytes) from the copy's start and
//     the data only once cp_async_wait covers its group, so reads before the
//     wait, or of a buffer being refilled, go wrong; a thread that exits with
//     copies never waited for is an error.
//   * dynamic shared memory (`extern __shared__`, rewritten by build.py) with
//     the GPU's limits: see "Shared memory" below.
// Not modelled: lanes of a warp in lock-step for ordinary loads and stores
// (fibers never interleave inside a plain read-modify-write, so a non-atomic
// `+=` from several threads is not caught), out-of-bounds accesses to static
// shared memory and global memory, and uninitialised static shared memory (it
// keeps the previous block's contents).
#pragma once

#include <math.h>  // the float overloads of expf/fma/sqrt... in the global namespace
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

// ------------------------------------------------------------ keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// One block runs at a time, so a static is exactly one block's shared memory.
#define __shared__ static

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;
struct __attribute__((aligned(16))) uint4 {
  unsigned int x, y, z, w;
};
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) {
  return uint4{x, y, z, w};
}
using cudaStream_t = struct CUstream_st*;
struct cudaDeviceProp {
  int major, minor;
};

// Integer max/min are global device functions in CUDA.
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }

namespace palfast_emu {

// An emulator error (deadlock, misuse of a collective, __trap): the launch
// stops and the host side throws.
[[noreturn]] inline void fail(const std::string& what);

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;  // ample for kernels compiled at -O1
constexpr int kTile = 16;                    // WMMA m16n16k16
constexpr int kTileElems = kTile * kTile;
constexpr int kFragElems = kTileElems / kWarpSize;  // elements of a fragment per lane
constexpr size_t kGuardBytes = 4096;         // one page below each fiber stack

// kBarrier: at __syncthreads; kWarp: in a warp collective; kStuck: after fail().
enum class State { kReady, kBarrier, kWarp, kStuck, kDone };

// Context switches: a few instructions on x86-64 (runtime.cpp), ucontext elsewhere
// (whose swapcontext makes a system call per switch: correct, ~10× slower).
#if defined(__x86_64__)
#define PALFAST_EMU_FAST_SWITCH 1
extern "C" void palfast_emu_switch(void** save_sp, void* load_sp);
struct Context {
  void* sp = nullptr;
};
inline void switch_to(Context& from, Context& to) { palfast_emu_switch(&from.sp, to.sp); }
inline void start_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  // The frame palfast_emu_switch pops: six callee-saved registers, then entry as
  // the return address, above it a null return address for entry itself (never
  // used: fibers end by switching away). Stack top 16-byte aligned, so at entry
  // rsp % 16 == 8 as after a call.
  auto* top = reinterpret_cast<void**>(reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15));
  top[-1] = nullptr;
  top[-2] = reinterpret_cast<void*>(entry);
  for (int i = 3; i <= 8; ++i) top[-i] = nullptr;
  c.sp = top - 8;
}
#else
struct Context {
  ucontext_t uc;
};
inline void switch_to(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void start_context(Context& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

// A cp.async copy in flight: 16 bytes to dst, the first src_bytes of them from src.
struct AsyncCopy {
  void* dst;
  const void* src;
  int src_bytes;
};

struct Fiber {
  Context ctx;
  char* stack = nullptr;
  uint3 tid;
  int lane = 0, warp = 0;
  State state = State::kDone;
  std::vector<AsyncCopy> uncommitted;             // cp.async since the last commit
  std::deque<std::vector<AsyncCopy>> committed;  // groups in flight, oldest first
};

// Scratch for warp collectives: shuffle slots and the three 16×16 operands of mma_sync.
struct Warp {
  unsigned arrived = 0;  // lanes waiting at the warp barrier
  unsigned exited = 0;
  uint64_t slot[kWarpSize];
  float a[kTileElems], b[kTileElems], c[kTileElems];
};

// The launch's dynamic shared memory: a mapping of `map_bytes`, then a
// PROT_NONE guard page; the buffer (`bytes` long) is placed when the first
// extern __shared__ declaration is reached, to end as near the guard as its
// alignment allows.
struct DynamicSmem {
  size_t bytes = 0;
  char* map = nullptr;
  size_t map_bytes = 0;
  char* base = nullptr;  // null until placed
  size_t align = 0;
  DynamicSmem() = default;
  DynamicSmem(const DynamicSmem&) = delete;
  DynamicSmem& operator=(const DynamicSmem&) = delete;
  ~DynamicSmem();
};

struct Launch {
  dim3 grid, block, block_idx;
  int nthreads = 0, live = 0, at_barrier = 0;
  const void* kernel = nullptr;
  DynamicSmem dyn;
  size_t dyn_limit = 0;  // the kernel's MaxDynamicSharedMemorySize at launch
  bool opted_in = false;  // set by cudaFuncSetAttribute
  std::vector<const void*> statics;  // static __shared__ arrays seen in this launch
  size_t static_bytes = 0;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<int> ready;
  std::function<void()>* body = nullptr;
  std::string error;
};

struct Runtime {
  Context host;
  Fiber* current = nullptr;
  Launch* launch = nullptr;
  std::mt19937_64 rng{0};
  std::vector<char*> stacks;
  long long switches = 0;
  long long ptx_mmas = 0;  // warp-level mma.sync m16n8k16 so far (tests check which path ran)
  long long ptx_tf32_mmas = 0;  // warp-level mma.sync m16n8k8 tf32 so far
  long long red_v2s = 0;   // red_add_v2 calls (per thread) so far
  long long atomics = 0;   // atomicAdd calls (per thread) so far
};

inline Runtime& rt() {
  static thread_local Runtime r;
  return r;
}
inline Fiber& self() { return *rt().current; }
inline Launch& cur() { return *rt().launch; }

// Back to the scheduler; returns when this fiber is picked again.
inline void yield() {
  Runtime& r = rt();
  ++r.switches;
  switch_to(r.current->ctx, r.host);
}

[[noreturn]] inline void fail(const std::string& what) {
  Launch& l = cur();
  if (l.error.empty()) l.error = what;
  self().state = State::kStuck;  // never resumed: the scheduler stops
  for (;;) yield();
}

inline void make_ready(Fiber& f) {
  f.state = State::kReady;
  cur().ready.push_back(static_cast<int>(&f - cur().fibers.data()));
}

inline void release_block_barrier() {
  Launch& l = cur();
  if (l.at_barrier == 0 || l.at_barrier < l.live) return;
  l.at_barrier = 0;
  for (Fiber& f : l.fibers)
    if (f.state == State::kBarrier) make_ready(f);
}

inline void syncthreads() {
  Launch& l = cur();
  self().state = State::kBarrier;
  ++l.at_barrier;
  release_block_barrier();
  yield();
}

// Warp barrier over the lanes in mask: returns once all of them arrived.
inline void warp_barrier(unsigned mask) {
  Fiber& f = self();
  Warp& w = cur().warps[f.warp];
  if (!(mask >> f.lane & 1u)) fail("warp collective: the calling lane is not in its own mask");
  if (mask & w.exited)
    fail("warp collective: mask names a lane that has exited (warp " + std::to_string(f.warp) + ")");
  w.arrived |= 1u << f.lane;
  f.state = State::kWarp;
  if ((w.arrived & mask) == mask) {
    w.arrived &= ~mask;
    const int base = f.warp * kWarpSize;
    for (int lane = 0; lane < kWarpSize; ++lane)
      if (mask >> lane & 1u) make_ready(cur().fibers[base + lane]);
  }
  yield();
}

template <typename T>
T shuffle(unsigned mask, T v, int src_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
  Fiber& f = self();
  Warp& w = cur().warps[f.warp];
  std::memcpy(&w.slot[f.lane], &v, sizeof(T));
  warp_barrier(mask);  // every lane has published its value
  T out = v;
  if (src_lane >= 0 && src_lane < kWarpSize) {
    if (!(mask >> src_lane & 1u)) fail("shuffle reads a lane outside the mask");
    std::memcpy(&out, &w.slot[src_lane], sizeof(T));
  }
  warp_barrier(mask);  // every lane has read before a slot is reused
  return out;
}

inline void fiber_entry() {
  Runtime& r = rt();
  (*r.launch->body)();
  Fiber& f = *r.current;
  Launch& l = *r.launch;
  f.state = State::kDone;
  --l.live;
  Warp& w = l.warps[f.warp];
  w.exited |= 1u << f.lane;
  bool copies_pending = !f.uncommitted.empty();
  for (const auto& group : f.committed) copies_pending |= !group.empty();
  if (copies_pending)
    fail("a thread exited with cp.async copies it never waited for (cp_async_wait)");
  if (w.arrived != 0) fail("a lane exited while others of its warp wait in a warp collective");
  release_block_barrier();
  yield();  // never resumed
}

// ------------------------------------------------------------ shared memory
// What a GPU allows a block, and what the emulator checks:
//   * static __shared__ arrays: at most kStaticSmemBytes in all (ptxas refuses
//     more); build.py makes each array report its size when a thread first
//     reaches its declaration in a launch, so the checks below see the static
//     bytes then, not at the launch itself;
//   * dynamic shared memory (the launch's third argument, read through
//     `extern __shared__ T name[];`): at most the kernel's
//     cudaFuncAttributeMaxDynamicSharedMemorySize, which is kStaticSmemBytes
//     less its static bytes until cudaFuncSetAttribute raises it. CUDA Runtime
//     API, cudaFuncAttributes::maxDynamicSharedSizeBytes: "Any launch must have
//     a dynamic shared memory size smaller than this value"; a larger launch
//     does not run and reports cudaErrorInvalidValue;
//   * a raised limit plus the static bytes may not pass the device's opt-in
//     maximum per block (CUDA Runtime API, cudaFuncSetAttribute: "The sum of
//     this value and the function attribute sharedSizeBytes cannot exceed the
//     device attribute cudaDevAttrMaxSharedMemoryPerBlockOptin"; otherwise it
//     returns cudaErrorInvalidValue).
// Each block gets its own dynamic buffer of exactly the bytes asked for, filled
// with kSmemPoison (NaN as fp32, bf16 and fp16) at the block's start, aligned to
// what its declaration asks (__align__(N), or the element type's alignment) and
// no more, so code that relies on a larger alignment than it declares fails.
// The buffer ends as near a PROT_NONE guard page as that alignment allows: an
// access beyond the slack (< 2·alignment bytes) is a segmentation fault that
// names the overrun, and a write into the slack, or in front of the buffer, is
// reported at the block's end. Reads of the slack see the poison.
constexpr size_t kStaticSmemBytes = 48 * 1024;  // 49152: CUDA C++ Programming Guide, technical
                                                // specifications: 48 KB of static shared memory
                                                // per block on every compute capability
// Maximum shared memory per block with the opt-in (cudaDevAttrMaxSharedMemoryPerBlockOptin),
// from the same table: 227 KB on compute capability 9.0 (H100, H200), 163 KB on 8.0 (A100).
constexpr size_t kSmemOptinSm90 = 227 * 1024;  // 232448
constexpr size_t kSmemOptinSm80 = 163 * 1024;  // 166912
constexpr unsigned char kSmemPoison = 0xFF;    // as cp.async's poison: NaN in every float type
constexpr size_t kMaxDynamicAlign = 4096;      // the largest alignment the placement handles
constexpr size_t kPageBytes = 4096;

// The opt-in maximum of the emulated device: an sm_90's unless a test picks sm_80
// (runtime.cpp, emu_set_smem_arch).
inline size_t& smem_optin() {
  static size_t bytes = kSmemOptinSm90;
  return bytes;
}

// cudaFuncAttributeMaxDynamicSharedMemorySize per kernel, as cudaFuncSetAttribute
// left it (process-wide, like the attribute of a loaded function).
struct KernelAttributes {
  std::mutex mu;
  std::map<const void*, size_t> max_dynamic;
};
inline KernelAttributes& kernel_attributes() {
  static KernelAttributes a;
  return a;
}

inline std::string smem_error(const Launch& l, const std::string& what) {
  return what + " (static " + std::to_string(l.static_bytes) + " bytes, dynamic " +
         std::to_string(l.dyn.bytes) + " bytes, this kernel's dynamic limit " +
         std::to_string(l.dyn_limit) + " bytes" + (l.opted_in ? " set by cudaFuncSetAttribute" : "") +
         ", the device's opt-in maximum " + std::to_string(smem_optin()) + " bytes)";
}

// The limits that involve the static bytes; "" when they hold.
inline std::string check_smem_limits(const Launch& l) {
  if (l.static_bytes > kStaticSmemBytes)
    return smem_error(l, "static shared memory above 48 KB (ptxas refuses the kernel)");
  if (!l.opted_in && l.static_bytes + l.dyn.bytes > kStaticSmemBytes)
    return smem_error(l, "static plus dynamic shared memory above 48 KB without "
                         "cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, "
                         "bytes) (cudaErrorInvalidValue at launch on a GPU)");
  if (l.opted_in && l.static_bytes + l.dyn_limit > smem_optin())
    return smem_error(l, "static shared memory plus the MaxDynamicSharedMemorySize set by "
                         "cudaFuncSetAttribute above the device's opt-in maximum (that "
                         "cudaFuncSetAttribute returns cudaErrorInvalidValue on a GPU)");
  return "";
}

// Called (through build.py's rewrite) after each static __shared__ declaration.
inline bool note_static_shared(const void* array, size_t bytes) {
  Runtime& r = rt();
  if (r.launch == nullptr || r.current == nullptr) return true;  // namespace scope: no launch
  Launch& l = *r.launch;
  if (std::find(l.statics.begin(), l.statics.end(), array) != l.statics.end()) return true;
  l.statics.push_back(array);
  l.static_bytes += bytes;
  const std::string error = check_smem_limits(l);
  if (!error.empty()) fail(error);
  return true;
}

inline char* guard_page(const DynamicSmem& d) { return d.map + d.map_bytes; }

inline DynamicSmem::~DynamicSmem() {
  if (map != nullptr) munmap(map, map_bytes + kPageBytes);
}

// SIGSEGV in the guard page of a running launch's dynamic shared memory: says so,
// then lets the previous handler (Python's faulthandler, or the default) have it.
inline struct sigaction& previous_segv() {
  static struct sigaction old {};
  return old;
}
inline void write_stderr(const char* s) { (void)!write(2, s, strlen(s)); }
inline void on_segv(int sig, siginfo_t* info, void* ctx) {
  Runtime& r = rt();
  const char* addr = static_cast<const char*>(info->si_addr);
  const DynamicSmem* d = r.launch ? &r.launch->dyn : nullptr;
  if (d && d->base && addr >= guard_page(*d) && addr < guard_page(*d) + kPageBytes) {
    const std::string msg = "cuda_emu: a thread accessed dynamic shared memory " +
                            std::to_string(addr - (d->base + d->bytes)) +
                            " bytes past the end of the " + std::to_string(d->bytes) +
                            " bytes its launch asked for (out of bounds: undefined on the GPU)\n";
    write_stderr(msg.c_str());
  }
  sigaction(SIGSEGV, &previous_segv(), nullptr);  // the fault repeats under the previous handler
  (void)sig;
  (void)ctx;
}
inline void install_segv_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa {};
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_RESETHAND;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &previous_segv());
  });
}

inline size_t round_up(size_t x, size_t to) { return (x + to - 1) / to * to; }

// The launch-time checks, and the launch's dynamic buffer; throws where the GPU
// refuses the launch.
inline void begin_dynamic_smem(Launch& l, size_t bytes) {
  {
    KernelAttributes& a = kernel_attributes();
    std::lock_guard<std::mutex> lock(a.mu);
    const auto it = a.max_dynamic.find(l.kernel);
    l.opted_in = it != a.max_dynamic.end();
    l.dyn_limit = l.opted_in ? it->second : kStaticSmemBytes;
  }
  l.dyn.bytes = bytes;
  if (bytes > l.dyn_limit)
    throw std::runtime_error(
        "cuda_emu: launch refused (cudaErrorInvalidValue on a GPU): " +
        smem_error(l, "dynamic shared memory above the kernel's limit; raise the limit with "
                      "cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, "
                      "bytes) before the launch"));
  // Room for the buffer at any alignment up to kMaxDynamicAlign, then the guard page.
  l.dyn.map_bytes = round_up(bytes + 2 * kMaxDynamicAlign, kPageBytes);
  void* p = mmap(nullptr, l.dyn.map_bytes + kPageBytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("cuda_emu: cannot map dynamic shared memory");
  l.dyn.map = static_cast<char*>(p);
  mprotect(guard_page(l.dyn), kPageBytes, PROT_NONE);
  install_segv_handler();
}

inline void poison_dynamic_smem(Launch& l) {
  if (l.dyn.map != nullptr) std::memset(l.dyn.map, kSmemPoison, l.dyn.map_bytes);
}

// At a block's end: the bytes around the buffer must still hold the poison.
inline void check_dynamic_smem(Launch& l) {
  const DynamicSmem& d = l.dyn;
  if (d.base == nullptr) return;
  const char* end = d.base + d.bytes;
  const auto written = [](const char* from, const char* to) {
    for (const char* q = from; q < to; ++q)
      if (static_cast<unsigned char>(*q) != kSmemPoison) return q;
    return static_cast<const char*>(nullptr);
  };
  if (const char* q = written(end, guard_page(d)))
    l.error = "a thread wrote dynamic shared memory " + std::to_string(q - end) +
              " bytes past the end of the " + std::to_string(d.bytes) +
              " bytes its launch asked for (out of bounds: undefined on the GPU)";
  else if (const char* q = written(d.map, d.base))
    l.error = "a thread wrote dynamic shared memory " + std::to_string(d.base - q) +
              " bytes before its start (out of bounds: undefined on the GPU)";
}

// The launch's dynamic shared memory, for `extern __shared__ __align__(align) T
// name[];` (build.py). The first declaration reached places the buffer: aligned
// to exactly what it asks (an address that is a multiple of the alignment but not
// of twice it), ending as near the guard page as that allows. All declarations
// alias it, as on the GPU.
template <typename T>
T (&dynamic_shared(size_t declared))[] {
  Launch& l = cur();
  DynamicSmem& d = l.dyn;
  const size_t align = std::max(declared, alignof(T));
  if (align > kMaxDynamicAlign || (align & (align - 1)) != 0)
    fail("extern __shared__: alignment " + std::to_string(align) +
         " is not a power of two up to " + std::to_string(kMaxDynamicAlign));
  if (d.base == nullptr) {
    auto at = reinterpret_cast<uintptr_t>(guard_page(d)) - d.bytes;
    at -= at % align;
    if (at % (2 * align) == 0) at -= align;  // aligned to `align`, not to more
    d.base = reinterpret_cast<char*>(at);
    d.align = align;
  } else if (reinterpret_cast<uintptr_t>(d.base) % align != 0) {
    fail("extern __shared__: this declaration asks for alignment " + std::to_string(align) +
         " but an earlier one placed the buffer at alignment " + std::to_string(d.align) +
         " (declare the largest alignment on every extern __shared__ of the kernel)");
  }
  return *reinterpret_cast<T(*)[]>(d.base);
}

inline char* stack_for(int t) {
  Runtime& r = rt();
  while (static_cast<int>(r.stacks.size()) <= t) {
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("cuda_emu: cannot map a fiber stack");
    mprotect(p, kGuardBytes, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
    r.stacks.push_back(static_cast<char*>(p));
  }
  return r.stacks[t];
}

// Runs one block to completion; returns an error message or "".
inline std::string run_block(Launch& l) {
  Runtime& r = rt();
  poison_dynamic_smem(l);  // each block starts with its own, uninitialised buffer
  l.live = l.nthreads;
  l.at_barrier = 0;
  for (Warp& w : l.warps) w.arrived = w.exited = 0;
  l.ready.clear();
  for (int t = 0; t < l.nthreads; ++t) {
    Fiber& f = l.fibers[t];
    f.tid = uint3(t % l.block.x, t / l.block.x % l.block.y, t / (l.block.x * l.block.y));
    f.lane = t % kWarpSize;
    f.warp = t / kWarpSize;
    f.stack = stack_for(t);
    f.uncommitted.clear();
    f.committed.clear();
    start_context(f.ctx, f.stack, kStackBytes, fiber_entry);
    f.state = State::kReady;
    l.ready.push_back(t);
  }
  // A partial last warp: its missing lanes count as exited.
  if (l.nthreads % kWarpSize != 0)
    l.warps.back().exited = ~0u << (l.nthreads % kWarpSize);
  while (l.error.empty()) {
    if (l.ready.empty()) {
      if (l.live == 0) break;
      l.error = "deadlock: " + std::to_string(l.live) +
                " threads wait at a barrier that the others never reach";
      break;
    }
    const size_t pick = r.rng() % l.ready.size();
    const int t = l.ready[pick];
    l.ready[pick] = l.ready.back();
    l.ready.pop_back();
    r.current = &l.fibers[t];
    switch_to(r.host, r.current->ctx);
  }
  r.current = nullptr;
  if (l.error.empty()) check_dynamic_smem(l);
  return l.error;
}

inline void set_seed(uint64_t seed) { rt().rng.seed(seed); }

// kernel<<<grid, block, smem>>>(args...): blocks in a random order, each a set of
// fibers, each block with its own `smem` bytes of dynamic shared memory.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A&&... args) {
  const long long nthreads = static_cast<long long>(block.x) * block.y * block.z;
  if (nthreads < 1 || nthreads > kMaxThreads)
    throw std::runtime_error("cuda_emu: invalid block size " + std::to_string(nthreads));
  if (grid.x == 0 || grid.y == 0 || grid.z == 0)
    throw std::runtime_error("cuda_emu: empty grid (CUDA reports invalid configuration)");
  const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);  // copied once, like CUDA
  std::function<void()> body = [&] { std::apply(kernel, params); };
  Runtime& r = rt();
  Launch l;
  l.kernel = reinterpret_cast<const void*>(kernel);
  begin_dynamic_smem(l, smem);  // throws where the GPU refuses the launch
  l.grid = grid;
  l.block = block;
  l.nthreads = static_cast<int>(nthreads);
  l.fibers.resize(l.nthreads);
  l.warps.resize((l.nthreads + kWarpSize - 1) / kWarpSize);
  l.body = &body;
  std::vector<dim3> order;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) order.emplace_back(x, y, z);
  std::shuffle(order.begin(), order.end(), r.rng);
  Launch* outer = r.launch;
  r.launch = &l;
  std::string error;
  for (const dim3& b : order) {
    l.block_idx = b;
    error = run_block(l);
    if (!error.empty()) break;
  }
  r.launch = outer;
  if (!error.empty()) throw std::runtime_error("cuda_emu: kernel failed: " + error);
}

inline const uint3& thread_idx() { return self().tid; }

}  // namespace palfast_emu

#define threadIdx (::palfast_emu::thread_idx())
#define blockIdx (::palfast_emu::cur().block_idx)
#define blockDim (::palfast_emu::cur().block)
#define gridDim (::palfast_emu::cur().grid)

inline void __syncthreads() { palfast_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = palfast_emu::kFullMask) {
  palfast_emu::warp_barrier(mask);
}
inline void __trap() { palfast_emu::fail("__trap()"); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = palfast_emu::kWarpSize) {
  const int lane = palfast_emu::self().lane;
  const int src = lane ^ lane_mask;
  return palfast_emu::shuffle(mask, v, (src / width == lane / width) ? src : lane);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = palfast_emu::kWarpSize) {
  const int lane = palfast_emu::self().lane;
  const int src = lane + static_cast<int>(delta);
  return palfast_emu::shuffle(mask, v, (src / width == lane / width) ? src : lane);
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = palfast_emu::kWarpSize) {
  const int lane = palfast_emu::self().lane;
  return palfast_emu::shuffle(mask, v, lane / width * width + src_lane % width);
}

// Fibers never interleave inside a call, so plain arithmetic is atomic here;
// the order of the adds still varies with the scheduler seed, as on the GPU.
template <typename T>
T atomicAdd(T* address, T v) {
  ++palfast_emu::rt().atomics;  // counted, so that tests see which path ran
  const T old = *address;
  *address = old + v;
  return old;
}

// ------------------------------------------------------------ 16-bit floats
namespace palfast_emu {

inline uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
inline float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// float -> IEEE binary16, round to nearest even (overflow to inf, NaN kept quiet).
inline uint16_t half_from_float(float x) {
  const uint32_t f = float_bits(x);
  const uint16_t sign = static_cast<uint16_t>((f >> 16) & 0x8000u);
  const uint32_t a = f & 0x7fffffffu;
  if (a >= 0x7f800000u) return sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u);
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // ≥ 65520 rounds to inf
  if (a < 0x38800000u) {  // below 2^-14: a subnormal step is 2^-24, and x·2^24 is exact
    return sign | static_cast<uint16_t>(nearbyintf(bits_float(a) * 16777216.0f));
  }
  // Rebias the exponent (127 -> 15) and round the 23-bit mantissa to 10 bits.
  return sign | static_cast<uint16_t>((a - 0x38000000u + 0xfffu + ((a >> 13) & 1u)) >> 13);
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0) return (sign ? -1.0f : 1.0f) * static_cast<float>(man) * 0x1p-24f;
  if (exp == 31) return bits_float(sign | 0x7f800000u | (man << 13));
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}

inline uint16_t bf16_from_float(float x) {
  const uint32_t f = float_bits(x);
  if ((f & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((f >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((f + 0x7fffu + ((f >> 16) & 1u)) >> 16);
}
inline float bf16_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

}  // namespace palfast_emu

struct __half {
  uint16_t bits;
  __half() = default;
  __half(float x) : bits(palfast_emu::half_from_float(x)) {}
  operator float() const { return palfast_emu::half_to_float(bits); }
};
struct __nv_bfloat16 {
  uint16_t bits;
  __nv_bfloat16() = default;
  __nv_bfloat16(float x) : bits(palfast_emu::bf16_from_float(x)) {}
  operator float() const { return palfast_emu::bf16_to_float(bits); }
};
inline __half __float2half_rn(float x) { return __half(x); }
inline float __half2float(__half x) { return float(x); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return __nv_bfloat16(x); }
inline float __bfloat162float(__nv_bfloat16 x) { return float(x); }

// ------------------------------------------------------------ mma.sync, ldmatrix, cp.async
// The emulated side of csrc/cuda/mma.cuh, with the PTX ISA's per-lane layouts
// (written out there); g = lane / 4, t = lane % 4.
namespace palfast_emu {

constexpr uintptr_t kLdmatrixRowAlign = 16;  // an 8-element row of 16-bit values
constexpr int kCpAsyncBytes = 16;

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: every lane publishes its row
// address, then reads its elements of the four 8×8 matrices from the rows of
// the lanes that gave them (lane 8m + r gives row r of matrix m).
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  Fiber& f = self();
  Warp& w = cur().warps[f.warp];
  if (reinterpret_cast<uintptr_t>(row) % kLdmatrixRowAlign != 0)
    fail("ldmatrix: row address not 16-byte aligned (lane " + std::to_string(f.lane) + ")");
  w.slot[f.lane] = reinterpret_cast<uintptr_t>(row);
  warp_barrier(kFullMask);  // every lane has published its row
  const int g = f.lane >> 2, t = f.lane & 3;
  auto at = [&](int lane, int col) {
    return reinterpret_cast<const uint16_t*>(static_cast<uintptr_t>(w.slot[lane]))[col];
  };
  for (int m = 0; m < 4; ++m) {
    // Not transposed: elements (g, 2t), (g, 2t+1); transposed: (2t, g), (2t+1, g).
    const uint16_t lo = trans ? at(8 * m + 2 * t, g) : at(8 * m + g, 2 * t);
    const uint16_t hi = trans ? at(8 * m + 2 * t + 1, g) : at(8 * m + g, 2 * t + 1);
    r[m] = static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16;
  }
  warp_barrier(kFullMask);  // every lane has read before a slot is reused
}

// The element in the low (hi = 0) or high half of a register of 16-bit T values.
template <typename T>
float unpack16(uint32_t reg, int hi) {
  const auto bits = static_cast<uint16_t>(reg >> (16 * hi));
  return std::is_same_v<T, __half> ? half_to_float(bits) : bf16_to_float(bits);
}

// The second half of an emulated mma.sync m16n8kK, once every lane has put its A
// (16×K at w.a) and B (K×8 at w.b) elements in the warp's scratch: this lane's
// four elements of D = A·B + acc, c[e] = (g + 8·(e / 2), 2t + e % 2), summed in fp32.
template <int kK>
void mma_from_scratch(float (&acc)[4], Warp& w, int g, int t) {
  constexpr int kN = 8;
  warp_barrier(kFullMask);  // A and B complete
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    float sum = acc[e];
    for (int k = 0; k < kK; ++k) sum += w.a[row * kK + k] * w.b[k * kN + col];
    out[e] = sum;
  }
  warp_barrier(kFullMask);  // all have read before the scratch is reused
  for (int e = 0; e < 4; ++e) acc[e] = out[e];
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.f32, D = C = acc: the lanes
// publish A (16×16) and B (16×8) in the warp's scratch, then each computes its
// own four elements of D in fp32 (16-bit products are exact in fp32).
template <typename T>
void mma_m16n8k16(float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  constexpr int kM = 16, kN = 8, kK = 16;
  Fiber& f = self();
  Warp& w = cur().warps[f.warp];
  const int g = f.lane >> 2, t = f.lane & 3;
  for (int i = 0; i < 4; ++i)
    for (int h = 0; h < 2; ++h)
      w.a[(g + 8 * (i & 1)) * kK + 2 * t + h + 8 * (i >> 1)] = unpack16<T>(a[i], h);
  for (int i = 0; i < 2; ++i)
    for (int h = 0; h < 2; ++h) w.b[(2 * t + h + 8 * i) * kN + g] = unpack16<T>(b[i], h);
  if (f.lane == 0) ++rt().ptx_mmas;
  static_assert(kM * kK <= kTileElems && kK * kN <= kTileElems, "the warp's scratch holds A and B");
  mma_from_scratch<kK>(acc, w, g, t);
}

// cvt.rna.tf32.f32: x to nearest tf32 (10 mantissa bits), ties away from zero,
// as an fp32 pattern with the low 13 bits zero. Adding half a unit of the kept
// last bit to the magnitude's pattern and truncating rounds ties away (the
// pattern is sign-magnitude) and carries into the exponent where it must, up to
// inf past the largest tf32. Inf and NaN are returned unchanged.
constexpr uint32_t kTf32DroppedBits = 13, kTf32Half = 1u << (kTf32DroppedBits - 1);
constexpr uint32_t kTf32Keep = ~((1u << kTf32DroppedBits) - 1);

inline uint32_t tf32_rna_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7F800000u) == 0x7F800000u) return u;  // inf, NaN
  return (u + kTf32Half) & kTf32Keep;
}

inline float tf32_operand(uint32_t reg) {  // only the tf32 bits of an operand count
  const uint32_t u = reg & kTf32Keep;
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, D = C = acc: as
// mma_m16n8k16 with the tf32 layouts of csrc/cuda/mma.cuh (one element a
// register); tf32 products are exact in fp32. Counted in ptx_tf32_mmas (the
// 16-bit ones are ptx_mmas).
inline void mma_m16n8k8_tf32(float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  constexpr int kN = 8, kK = 8;
  Fiber& f = self();
  Warp& w = cur().warps[f.warp];
  const int g = f.lane >> 2, t = f.lane & 3;
  for (int i = 0; i < 4; ++i) w.a[(g + 8 * (i & 1)) * kK + t + 4 * (i >> 1)] = tf32_operand(a[i]);
  for (int i = 0; i < 2; ++i) w.b[(t + 4 * i) * kN + g] = tf32_operand(b[i]);
  if (f.lane == 0) ++rt().ptx_tf32_mmas;
  mma_from_scratch<kK>(acc, w, g, t);
}

// cp.async.cg.shared.global [dst], [src], 16, src_bytes. On the GPU dst is
// undefined from the copy's start until its wait: here it holds kCpAsyncPoison
// bytes (NaN as fp32, bf16 and fp16) from the call, and the data only once
// cp_async_wait covers its group. So a read before the wait sees poison, not the
// data, and so does a read of a buffer that another thread has already started
// refilling (a missing barrier before a prefetch).
constexpr unsigned char kCpAsyncPoison = 0xFF;

inline void cp_async(void* dst, const void* src, int src_bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % kCpAsyncBytes != 0 ||
      reinterpret_cast<uintptr_t>(src) % kCpAsyncBytes != 0)
    fail("cp.async: 16-byte copies need 16-byte aligned addresses");
  if (src_bytes < 0 || src_bytes > kCpAsyncBytes)
    fail("cp.async: src_bytes " + std::to_string(src_bytes) + " is not in [0, 16]");
  std::memset(dst, kCpAsyncPoison, kCpAsyncBytes);
  self().uncommitted.push_back({dst, src, src_bytes});
}

inline void cp_async_commit() {
  Fiber& f = self();
  f.committed.push_back(std::move(f.uncommitted));
  f.uncommitted.clear();
}

// cp.async.wait_group pending: completes this thread's oldest groups until at
// most `pending` remain (copies not yet committed are not waited for).
inline void cp_async_wait(int pending) {
  Fiber& f = self();
  while (static_cast<int>(f.committed.size()) > pending) {
    for (const AsyncCopy& c : f.committed.front()) {
      std::memcpy(c.dst, c.src, c.src_bytes);  // src_bytes = 0: src is not read
      std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, kCpAsyncBytes - c.src_bytes);
    }
    f.committed.pop_front();
  }
}

// red.global.v2.f32.add (csrc/cuda/mma.cuh, red_add_v2): two adds, one request;
// its address must be 8-byte aligned, as on the GPU (a misaligned vector red
// faults there). Counted, so that tests see which path ran.
constexpr uintptr_t kRedV2Align = 2 * sizeof(float);

inline void red_add_v2(float* dst, float v0, float v1) {
  if (reinterpret_cast<uintptr_t>(dst) % kRedV2Align != 0)
    fail("red.global.v2.f32: address not 8-byte aligned");
  dst[0] += v0;  // fibers never interleave inside a call: atomic here
  dst[1] += v1;
  ++rt().red_v2s;
}

}  // namespace palfast_emu

// ------------------------------------------------------------ WMMA
namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "cuda_emu: only m16n16k16 is emulated");
  static constexpr int num_elements = palfast_emu::kFragElems;
  T x[num_elements];
};

}  // namespace nvcuda::wmma

namespace palfast_emu {

// Element e of a lane's fragment -> (row, column) of the 16×16 tile, from the
// PTX ISA's mma.m16n8k16 fragment figures (g = lane / 4, t = lane % 4; the
// second n8 half of B and C is e ≥ 4).
struct Pos {
  int row, col;
};
inline Pos a_pos(int lane, int e) {  // A: M×K
  const int g = lane >> 2, t = lane & 3;
  return {g + 8 * ((e >> 1) & 1), 2 * t + (e & 1) + 8 * (e >> 2)};
}
inline Pos b_pos(int lane, int e) {  // B: K×N
  const int g = lane >> 2, t = lane & 3, j = e & 3;
  return {2 * t + (j & 1) + 8 * (j >> 1), g + 8 * (e >> 2)};
}
inline Pos c_pos(int lane, int e) {  // C, D: M×N
  const int g = lane >> 2, t = lane & 3, j = e & 3;
  return {g + 8 * (j >> 1), 2 * t + (j & 1) + 8 * (e >> 2)};
}

inline void check_wmma_ptr(const void* p, unsigned ldm, size_t elem_bytes, const char* what) {
  constexpr uintptr_t kAlign = 32;  // 256 bits
  constexpr size_t kLdmBytes = 16;  // ldm: a multiple of 8 16-bit or 4 32-bit elements
  if (reinterpret_cast<uintptr_t>(p) % kAlign != 0)
    fail(std::string(what) + ": pointer not 32-byte aligned");
  if (ldm * elem_bytes % kLdmBytes != 0)
    fail(std::string(what) + ": ldm " + std::to_string(ldm) + " is not a multiple of 16 bytes");
}

template <typename Use>
Pos frag_pos(int lane, int e) {
  if constexpr (std::is_same_v<Use, nvcuda::wmma::matrix_a>) return a_pos(lane, e);
  else if constexpr (std::is_same_v<Use, nvcuda::wmma::matrix_b>) return b_pos(lane, e);
  else return c_pos(lane, e);
}

}  // namespace palfast_emu

namespace nvcuda::wmma {

template <typename Use, typename T, typename L, typename V>
void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, const V& v) {
  for (T& x : f.x) x = T(v);
}

// Operand loads: each lane reads only its own elements; Layout is the memory
// order of the 16×16 tile (element (r, c) at p[r·ldm + c] or p[c·ldm + r]).
template <typename Use, typename T, typename L>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_void_v<L>, "operand fragments have a layout");
  palfast_emu::check_wmma_ptr(p, ldm, sizeof(T), "wmma::load_matrix_sync");
  const int lane = palfast_emu::self().lane;
  for (int e = 0; e < palfast_emu::kFragElems; ++e) {
    const palfast_emu::Pos q = palfast_emu::frag_pos<Use>(lane, e);
    f.x[e] = std::is_same_v<L, row_major> ? p[q.row * ldm + q.col] : p[q.col * ldm + q.row];
  }
}

template <typename T>
void load_matrix_sync(fragment<accumulator, 16, 16, 16, T, void>& f, const T* p, unsigned ldm,
                      layout_t layout) {
  palfast_emu::check_wmma_ptr(p, ldm, sizeof(T), "wmma::load_matrix_sync");
  const int lane = palfast_emu::self().lane;
  for (int e = 0; e < palfast_emu::kFragElems; ++e) {
    const palfast_emu::Pos q = palfast_emu::c_pos(lane, e);
    f.x[e] = layout == mem_row_major ? p[q.row * ldm + q.col] : p[q.col * ldm + q.row];
  }
}

template <typename T>
void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T, void>& f, unsigned ldm,
                       layout_t layout) {
  palfast_emu::check_wmma_ptr(p, ldm, sizeof(T), "wmma::store_matrix_sync");
  const int lane = palfast_emu::self().lane;
  for (int e = 0; e < palfast_emu::kFragElems; ++e) {
    const palfast_emu::Pos q = palfast_emu::c_pos(lane, e);
    (layout == mem_row_major ? p[q.row * ldm + q.col] : p[q.col * ldm + q.row]) = f.x[e];
  }
}

// D = A·B + C over the whole warp: the lanes publish their elements, then each
// computes its own elements of D in fp32 (16-bit products are exact in fp32).
template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float, void>& d,
              const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b,
              const fragment<accumulator, 16, 16, 16, float, void>& c) {
  using palfast_emu::kTile;
  palfast_emu::Fiber& f = palfast_emu::self();
  palfast_emu::Warp& w = palfast_emu::cur().warps[f.warp];
  for (int e = 0; e < palfast_emu::kFragElems; ++e) {
    const palfast_emu::Pos pa = palfast_emu::a_pos(f.lane, e);
    const palfast_emu::Pos pb = palfast_emu::b_pos(f.lane, e);
    const palfast_emu::Pos pc = palfast_emu::c_pos(f.lane, e);
    w.a[pa.row * kTile + pa.col] = float(a.x[e]);
    w.b[pb.row * kTile + pb.col] = float(b.x[e]);
    w.c[pc.row * kTile + pc.col] = c.x[e];
  }
  palfast_emu::warp_barrier(palfast_emu::kFullMask);
  float out[palfast_emu::kFragElems];
  for (int e = 0; e < palfast_emu::kFragElems; ++e) {
    const palfast_emu::Pos q = palfast_emu::c_pos(f.lane, e);
    float acc = w.c[q.row * kTile + q.col];
    for (int k = 0; k < kTile; ++k) acc += w.a[q.row * kTile + k] * w.b[k * kTile + q.col];
    out[e] = acc;
  }
  palfast_emu::warp_barrier(palfast_emu::kFullMask);  // all have read before the scratch is reused
  for (int e = 0; e < palfast_emu::kFragElems; ++e) d.x[e] = out[e];
}

}  // namespace nvcuda::wmma

// ------------------------------------------------------------ host API stand-ins
namespace palfast_emu {
int compute_major();  // runtime.cpp
}  // namespace palfast_emu
namespace at::cuda {
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
// The emulated device: an sm_90 (H100/H200), so every kernel path is taken, unless
// a test sets another major version (emu_set_compute_major, runtime.cpp).
inline const cudaDeviceProp* getCurrentDeviceProperties() {
  static cudaDeviceProp prop{9, 0};
  prop.major = palfast_emu::compute_major();
  return &prop;
}
}  // namespace at::cuda
namespace c10::cuda {
struct CUDAGuard {
  template <typename D>
  explicit CUDAGuard(const D&) {}
};
}  // namespace c10::cuda
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes):
// the kernel's dynamic shared memory limit for later launches (cuda_emu.h,
// "Shared memory"). As on the GPU, a value that is negative or above the device's
// opt-in maximum returns cudaErrorInvalidValue; one that passes it only with the
// kernel's static bytes added is refused at the kernel's first launch, when the
// emulator learns those bytes.
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute {  // the values of CUDA's driver_types.h
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};
template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > palfast_emu::smem_optin())
    return cudaErrorInvalidValue;
  palfast_emu::KernelAttributes& a = palfast_emu::kernel_attributes();
  std::lock_guard<std::mutex> lock(a.mu);
  a.max_dynamic[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
  return cudaSuccess;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "invalid argument";
}
