// Helpers shared by the CUDA op files: widening 16-bit loads, warp sums, grid
// sizes and the kernel launch.
//
// Kernels are launched through launch() rather than with <<<>>> at the call
// site: <<<>>> is not C++, and the CPU emulator of the test suite
// (tests/cuda_emu) compiles these same files with a host compiler, where
// launch() runs the kernel's blocks as fibers. This is the only place that
// knows about the emulator (PALFAST_EMU).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>

#ifdef PALFAST_EMU
namespace palfast_emu {
int sm_count();  // tests/cuda_emu/runtime.cpp: settable, so tests reach every grid shape
}
#endif

namespace palfast::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xffffffffu;  // shuffle mask: every lane of the warp

// Row kernels (one warp per row of an [N, D] array) and elementwise kernels:
// 8 warps, 256 threads a block — enough warps in flight to hide memory latency,
// and few enough that a partial last block idles little.
constexpr int kRowWarps = 8;
constexpr int kRowThreads = kRowWarps * kWarpSize;

// The largest grid of a grid-stride kernel: 2^20 blocks is ample to fill any GPU
// (a H200 runs 132 SMs × 8 such blocks at once), and the loop covers the rest.
constexpr int64_t kMaxGridStrideBlocks = int64_t(1) << 20;
// CUDA's limit on gridDim.y and gridDim.z (gridDim.x goes to 2^31 − 1).
constexpr int64_t kMaxGridY = 65535;

// A loaded element in its accumulation type (16-bit types accumulate in fp32).
__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ double widen(double x) { return x; }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }

// The sum of v over the warp, in every lane (the same bits in every lane).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullWarp, v, off);
  return v;
}

// The maximum of v over the warp, in every lane (NaN-ignoring, as fmax).
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) v = fmax(v, __shfl_xor_sync(kFullWarp, v, off));
  return v;
}

// f(i, lane) for every row i < n, one warp per row, in a grid-stride loop over a
// grid of kRowThreads-thread blocks (grid_stride(n, kRowWarps)).
template <typename F>
__device__ __forceinline__ void for_each_row(int64_t n, F&& f) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kRowWarps;
  for (int64_t i = blockIdx.x * int64_t(kRowWarps) + threadIdx.x / kWarpSize; i < n; i += warps)
    f(i, lane);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid of a kernel that maps block b to tile b (no grid-stride loop): every
// tile needs its block, so too many tiles is an error, not a clamp.
inline unsigned int grid_exact(const char* op, int64_t blocks) {
  TORCH_CHECK(blocks >= 1 && blocks <= std::numeric_limits<int32_t>::max(), op,
              ": too many rows for one CUDA grid (", blocks, " blocks)");
  return static_cast<unsigned int>(blocks);
}

// Grid of a grid-stride kernel over `work` items, `per_block` items a block per
// pass: capped, since the loop covers whatever the grid does not.
inline unsigned int grid_stride(int64_t work, int64_t per_block) {
  return static_cast<unsigned int>(
      std::clamp<int64_t>(ceil_div(work, per_block), 1, kMaxGridStrideBlocks));
}

// kernel<<<grid, block, 0, stream>>>(args...) and the launch check.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, cudaStream_t stream, A&&... args) {
#ifdef PALFAST_EMU
  (void)stream;
  palfast_emu::launch(kernel, grid, block, 0, std::forward<A>(args)...);
#else
  kernel<<<grid, block, 0, stream>>>(std::forward<A>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// The streaming multiprocessors of the current GPU, for grids that must fill it.
inline int sm_count() {
#ifdef PALFAST_EMU
  return ::palfast_emu::sm_count();
#else
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
#endif
}

// Float atomics add in an order that varies from run to run: ops that use
// them must say so, so that torch.use_deterministic_algorithms(True) raises.
inline void alert_atomic_sums(const char* op) {
  at::globalContext().alertNotDeterministic(op);
}

}  // namespace palfast::cuda
