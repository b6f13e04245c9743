// Warp-level tensor-core and copy primitives of sm_80+ as small device functions:
// ldmatrix (shared memory -> mma fragments), mma.sync m16n8k16 (16-bit) and
// m16n8k8 (tf32, with cvt.rna.tf32.f32) with fp32 accumulation, and cp.async (global -> shared memory without registers).
// Each is one PTX instruction on the GPU; under PALFAST_EMU (the CPU emulator of
// the test suite, tests/cuda_emu/cuda_emu.h) the same call runs the emulator's
// model of it, with the PTX ISA's per-lane fragment layouts, so kernels written
// with these run in tests/test_cuda_emu_*.py unchanged.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with
// g = lane / 4 and t = lane % 4; a 32-bit register holds two 16-bit elements,
// the lower column (or, for B, the lower k) in its low half:
//   A (16×16, row):  a[0] = (g, 2t..2t+1),   a[1] = (g+8, 2t..),
//                    a[2] = (g, 2t+8..),     a[3] = (g+8, 2t+8..)
//   B (16×8, "col", i.e. element (k, n) stored at n·ld + k):
//                    b[0] = (k 2t..2t+1, n g), b[1] = (k 2t+8.., n g)
//   C, D (16×8 fp32): c[0..1] = (g, 2t..2t+1), c[2..3] = (g+8, 2t..2t+1)
// ldmatrix .x4 loads four 8×8 16-bit matrices: lane l gives the address of row
// l % 8 of matrix l / 8 (16 bytes, 16-byte aligned) and receives, in r[m],
// elements (g, 2t..2t+1) of matrix m; .trans gives (2t..2t+1, g) instead.
// So A is one .x4 of (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15),
// (rows 8-15, k 8-15); B of two n8 tiles of a row-major [n][k] tile is one .x4
// of (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

// These instructions need sm_80 (cp.async, bf16 mma); the host refuses older
// GPUs for 16-bit info_nce (check_tensor_cores), so their path only traps.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define PALFAST_SM80_OK 0
#else
#define PALFAST_SM80_OK 1
#endif

namespace palfast::cuda::ptx {

// A shared-memory address as ldmatrix takes it: the 32-bit shared-window
// address on the GPU (computed once, then offset in bytes, so a loop of loads
// needs no address conversion each), the pointer's value in the emulator.
#if defined(PALFAST_EMU)
using SmemAddr = uintptr_t;
#else
using SmemAddr = uint32_t;
#endif

__device__ __forceinline__ SmemAddr smem_addr(const void* p) {
#if defined(PALFAST_EMU)
  return reinterpret_cast<uintptr_t>(p);
#elif defined(__CUDA_ARCH__)
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#else
  (void)p;
  return 0;
#endif
}

// r[m] ← this lane's share of 8×8 matrix m; `row` is this lane's row address
// (row l % 8 of matrix l / 8); Trans: each matrix transposed (the B operand of a
// row-major [k][n] tile). Warp-collective: all 32 lanes must call it.
template <bool Trans = false>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], SmemAddr row) {
#if defined(PALFAST_EMU)
  palfast_emu::ldmatrix_x4(r, reinterpret_cast<const void*>(row), Trans);
#elif PALFAST_SM80_OK
  // "memory": the asm reads shared memory through a 32-bit address that the compiler
  // cannot see as a pointer, so without it this thread's plain stores to the tile
  // (fa2_sym_grad_kernel stages M in shared memory by plain stores) could be moved
  // after the load. Other threads' stores still need a barrier (__syncthreads)
  // between them and this load, as every caller has; the barrier alone also orders
  // them in the compiler, so the clobber guards a future caller without one.
  if constexpr (Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(row)
                 : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(row)
                 : "memory");
  }
#else
  __trap();
#endif
}

// One mma.sync of the named shape and types (a string literal) on acc, a and b,
// D = C = acc: every variant below takes four fp32 accumulators, four A and two
// B registers.
#define PALFAST_MMA_SYNC(instr)                                                  \
  asm volatile(instr " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n" \
               : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])          \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))

// acc ← A·B + acc for one 16×8×16 tile, T = __nv_bfloat16 or __half, fp32
// accumulation. Warp-collective.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&acc)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>,
                "mma_m16n8k16: 16-bit operands only");
#if defined(PALFAST_EMU)
  palfast_emu::mma_m16n8k16<T>(acc, a, b);
#elif PALFAST_SM80_OK
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    PALFAST_MMA_SYNC("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32");
  } else {
    PALFAST_MMA_SYNC("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32");
  }
#else
  __trap();
#endif
}

// x rounded to tf32 (cvt.rna.tf32.f32: to nearest, ties away from zero, keeping
// 10 of fp32's 23 mantissa bits), as the 32-bit pattern that tf32 mma operands
// take: an fp32 whose low 13 bits are zero. Inf and NaN stay what they are.
__device__ __forceinline__ uint32_t cvt_rna_tf32(float x) {
#if defined(PALFAST_EMU)
  return palfast_emu::tf32_rna_bits(x);
#elif PALFAST_SM80_OK
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
#else
  (void)x;
  __trap();
  return 0;
#endif
}

// acc ← A·B + acc for one 16×8×8 tile of tf32 operands (registers holding fp32
// patterns, as cvt_rna_tf32 gives them; the GPU reads only their tf32 bits), fp32
// accumulation. Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k8",
// .tf32), one element a register, g = lane / 4, t = lane % 4:
//   A (16×8, row):  a[0] = (g, t), a[1] = (g+8, t), a[2] = (g, t+4), a[3] = (g+8, t+4)
//   B (8×8, col):   b[0] = (k t, n g), b[1] = (k t+4, n g)
//   C, D (16×8 fp32): as for m16n8k16.
// Warp-collective.
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&acc)[4], const uint32_t (&a)[4],
                                                 const uint32_t (&b)[2]) {
#if defined(PALFAST_EMU)
  palfast_emu::mma_m16n8k8_tf32(acc, a, b);
#elif PALFAST_SM80_OK
  PALFAST_MMA_SYNC("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32");
#else
  __trap();
#endif
}

// Starts copying 16 bytes from global src to shared dst (both 16-byte aligned),
// of which only the first src_bytes (0..16) are read and the rest are zeros:
// src_bytes = 0 zero-fills dst without reading src (which must still be a valid
// address). The data are in dst only after cp_async_wait has covered the
// copy's group, and visible to other threads only after a barrier on top.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
#if defined(PALFAST_EMU)
  palfast_emu::cp_async(dst, src, src_bytes);
#elif PALFAST_SM80_OK
  // .cg: cached in L2 only, as the tile is read once per block from shared memory.
  // "memory": the copy will write dst, so this thread's plain loads of the old
  // contents of dst must stay before it (a buffer refilled while it was still being
  // read). The new contents are read only after cp_async_wait (itself a "memory"
  // asm) and, for other threads' copies, a __syncthreads.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
               "l"(src), "r"(src_bytes)
               : "memory");
#else
  __trap();
#endif
}

// Closes this thread's cp.async copies issued since the last commit into a group.
__device__ __forceinline__ void cp_async_commit() {
#if defined(PALFAST_EMU)
  palfast_emu::cp_async_commit();
#elif PALFAST_SM80_OK
  // "memory", as on the copies: this thread's plain shared-memory accesses stay on
  // their side of the group's boundary (one commit a tile, so it costs nothing).
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most `Pending` of this thread's committed groups are still in
// flight (the newest ones): Pending = 1 lets the next tile's copies run on while
// the current one is used.
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(PALFAST_EMU)
  palfast_emu::cp_async_wait(Pending);
#elif PALFAST_SM80_OK
  // "memory": loads of the landed data must not move above the wait.
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
#endif
}

// Two fp32 values rounded to T (RNE) in one register, lo in the low half: the
// register layout of mma operands, e.g. an fp32 accumulator pair reused as A
// (FlashAttention-2 keeps P in registers this way).
template <typename T>
__device__ __forceinline__ uint32_t pack16x2(float lo, float hi) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>,
                "pack16x2: 16-bit operands only");
  T l, h;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    l = __float2bfloat16_rn(lo);
    h = __float2bfloat16_rn(hi);
  } else {
    l = __float2half_rn(lo);
    h = __float2half_rn(hi);
  }
  uint16_t lb, hb;
  static_assert(sizeof(T) == sizeof(uint16_t));
  memcpy(&lb, &l, sizeof lb);
  memcpy(&hb, &h, sizeof hb);
  return static_cast<uint32_t>(lb) | static_cast<uint32_t>(hb) << 16;
}

// dst[0] += v0 and dst[1] += v1 in global memory, unordered like atomicAdd and
// returning nothing. dst must be 8-byte aligned. sm_90 has a vector form,
// red.global.v2.f32.add (PTX ISA: vector red of .f32 needs sm_90): one request
// for both; older GPUs (sm_80) take two scalar atomic adds.
__device__ __forceinline__ void red_add_v2(float* dst, float v0, float v1) {
#if defined(PALFAST_EMU)
  palfast_emu::red_add_v2(dst, v0, v1);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.v2.f32.add [%0], {%1, %2};\n" ::"l"(dst), "f"(v0), "f"(v1) : "memory");
#else
  atomicAdd(dst, v0);
  atomicAdd(dst + 1, v1);
#endif
}

}  // namespace palfast::cuda::ptx
