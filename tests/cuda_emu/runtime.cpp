// Test hooks of the emulator, next to the emulated palfast ops in palfast_emu.
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "cuda_emu.h"

#ifdef PALFAST_EMU_FAST_SWITCH
// palfast_emu_switch(save_sp, load_sp): pushes the System V callee-saved
// registers, saves rsp, switches to the other stack and pops its registers.
// (The kernels leave MXCSR and the x87 control word alone, so they are not saved.)
asm(R"(
  .text
  .globl palfast_emu_switch
  .type palfast_emu_switch, @function
palfast_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size palfast_emu_switch, .-palfast_emu_switch
)");
#endif

namespace palfast_emu {
namespace {
constexpr int kH200Sms = 132;  // the default: an H200's streaming multiprocessors
int emulated_sms = kH200Sms;
constexpr int kSm90Major = 9;  // the default: an H100/H200's compute capability 9.0
int emulated_major = kSm90Major;
}  // namespace
// The SM count the kernels' grids are sized for (csrc/cuda/common.cuh, sm_count).
int sm_count() { return emulated_sms; }
// The emulated GPU's compute capability major version (getCurrentDeviceProperties).
int compute_major() { return emulated_major; }
}  // namespace palfast_emu

namespace {

// Sets the emulated SM count (0: back to the default); small counts give small
// grids of large work items, as on a GPU with few SMs.
void set_sm_count(int64_t sms) {
  palfast_emu::emulated_sms = sms > 0 ? static_cast<int>(sms) : palfast_emu::kH200Sms;
}

// Sets the emulated compute capability's major version (0: back to 9), so tests
// reach the host's choices for older GPUs (float32 without tf32 mma before 8).
void set_compute_major(int64_t major) {
  palfast_emu::emulated_major = major > 0 ? static_cast<int>(major) : palfast_emu::kSm90Major;
}

// Seeds the scheduler: the block order and the order in which threads run.
void set_seed(int64_t seed) { palfast_emu::set_seed(static_cast<uint64_t>(seed)); }

// Fiber switches so far on this thread (tests check the emulator did run threads).
int64_t switches() { return palfast_emu::rt().switches; }

// ---- self-tests: the emulator must show the GPU behaviour the kernels rely on.
constexpr int kBlock = 128;

// Each thread publishes its id in shared memory and reads its neighbour's,
// with or without the barrier in between. Counts wrong reads.
__global__ void neighbour_kernel(bool barrier, int* wrong) {
  __shared__ int ids[kBlock];
  ids[threadIdx.x] = -1;
  __syncthreads();
  ids[threadIdx.x] = threadIdx.x;
  if (barrier) __syncthreads();
  const int next = (threadIdx.x + 1) % kBlock;
  if (ids[next] != next) atomicAdd(wrong, 1);
}

int64_t neighbour_reads_wrong(bool barrier) {
  int wrong = 0;
  palfast_emu::launch(neighbour_kernel, dim3(1), dim3(kBlock), 0, barrier, &wrong);
  return wrong;
}

// A full-mask shuffle in a warp whose upper half has returned: an error on the GPU.
__global__ void half_warp_shuffle_kernel(float* out) {
  if (threadIdx.x >= palfast_emu::kWarpSize / 2) return;
  out[threadIdx.x] = __shfl_xor_sync(palfast_emu::kFullMask, 1.0f, 1);
}

void half_warp_shuffle() {
  float out[palfast_emu::kWarpSize] = {};
  palfast_emu::launch(half_warp_shuffle_kernel, dim3(1), dim3(palfast_emu::kWarpSize), 0, out);
}

// D = A·Bᵀ + C for one 16×16×16 WMMA tile (B given row-major [N, K], read as
// col-major K×N) against a plain loop: the fragment layouts must agree.
__global__ void mma_kernel(const __half* a, const __half* b, float* d) {
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 0.5f);
  wmma::load_matrix_sync(fa, a, palfast_emu::kTile);
  wmma::load_matrix_sync(fb, b, palfast_emu::kTile);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(d, fc, palfast_emu::kTile, wmma::mem_row_major);
}

double mma_max_error() {
  constexpr int kT = palfast_emu::kTile;
  alignas(32) __half a[kT * kT], b[kT * kT];
  alignas(32) float d[kT * kT];
  for (int i = 0; i < kT * kT; ++i) {  // small integers: every product and sum is exact
    a[i] = __half(float(i % 7 - 3));
    b[i] = __half(float(i % 5 - 2));
  }
  palfast_emu::launch(mma_kernel, dim3(1), dim3(palfast_emu::kWarpSize), 0, a, b, d);
  double err = 0;
  for (int r = 0; r < kT; ++r) {
    for (int c = 0; c < kT; ++c) {
      float want = 0.5f;
      for (int k = 0; k < kT; ++k) want += float(a[r * kT + k]) * float(b[c * kT + k]);
      err = std::max(err, double(std::abs(want - d[r * kT + c])));
    }
  }
  return err;
}

// Bits of float -> half and float -> bfloat16 (round to nearest even).
int64_t half_bits(double x) { return __half(float(x)).bits; }
int64_t bfloat16_bits(double x) { return __nv_bfloat16(float(x)).bits; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(palfast_emu, m) {
  m.def("emu_set_seed(int seed) -> ()", &set_seed);
  m.def("emu_switches() -> int", &switches);
  m.def("emu_set_sm_count(int sms) -> ()", &set_sm_count);
  m.def("emu_set_compute_major(int major) -> ()", &set_compute_major);
  m.def("emu_selftest_neighbour_reads_wrong(bool barrier) -> int", &neighbour_reads_wrong);
  m.def("emu_selftest_half_warp_shuffle() -> ()", &half_warp_shuffle);
  m.def("emu_selftest_mma_max_error() -> float", &mma_max_error);
  m.def("emu_selftest_half_bits(float x) -> int", &half_bits);
  m.def("emu_selftest_bfloat16_bits(float x) -> int", &bfloat16_bits);
}
