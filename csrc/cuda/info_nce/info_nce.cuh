// Shared by info_nce_forward.cu and info_nce_backward.cu (this folder), and
// included by them only (its definitions are file-local: an anonymous namespace).
//
// palfast::info_nce on CUDA, flash-style tiles that never form an N×N matrix:
// u = z / max(‖z‖, kNormFloor) (or z), s_ik = <u_i, u_k>/τ, lse_i = log Σ_{k≠i} e^{s_ik},
// loss_i = lse_i − <u_i, (G u)_i>/(τ W_i), as csrc/cpu/info_nce.cpp (the model); the
// backward recomputes S from the saved lse. This file has what both directions use:
// the tile policies per dtype, the fixed-shift and online softmax (use_fixed_shift),
// row norms and the host glue. The FA2-style tile helpers are in info_nce_fa2.cuh.
// The design (paths, kernels, tile GEMMs, memory) is written out in info_nce.md,
// "Design"; the counts and predicted times per step follow it there.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

#include "../../info_nce.h"
#include "../graph_spmm_cuda.cuh"
#include "../mma.cuh"

namespace palfast::cuda {
namespace {


namespace wmma = nvcuda::wmma;

// Tile kernels: 4 warps, the 2×2 warp grid of the tensor-core tiles (each warp
// 32×32 of S) and 8 S entries per thread per 64×64 tile in the SIMT tiles.
constexpr int kTileThreads = 128;
constexpr int kWarps = kTileThreads / kWarpSize;
constexpr const char* kForwardOp = kInfoNceOp;
constexpr const char* kBackwardOp = kInfoNceBackwardOp;

// ------------------------------------------------------------------ scalars
// narrow<T>(x): round an accumulator value to the storage type T.
template <typename T>
struct Narrow;
template <>
struct Narrow<float> {
  static __device__ __forceinline__ float from(float x) { return x; }
};
template <>
struct Narrow<double> {
  static __device__ __forceinline__ double from(double x) { return x; }
};
template <>
struct Narrow<__half> {
  static __device__ __forceinline__ __half from(float x) { return __float2half_rn(x); }
};
template <>
struct Narrow<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};
template <typename T, typename A>
__device__ __forceinline__ T narrow(A x) {
  return Narrow<T>::from(x);
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float exp2_acc(float x) { return exp2f(x); }
__device__ __forceinline__ double exp2_acc(double x) { return exp2(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// Running log-sum-exp (m, s) means Σ exp(.) = s·exp(m). Adds one term x.
// x = NaN makes s NaN for good (NaN > m is false, exp(NaN) = NaN).
template <typename T>
__device__ __forceinline__ void lse_add(T& m, T& s, T x) {
  if (x > m) {
    s = s * exp_acc(m - x) + T(1);  // m = −inf: s is 0, exp(−inf) = 0
    m = x;
  } else {
    s += exp_acc(x - m);
  }
}

// Merges (m2, s2) into (m, s). m2 = −inf means "no term" (s2 is 0, or NaN
// if a NaN was seen there: adding s2 keeps that NaN).
template <typename T>
__device__ __forceinline__ void lse_merge(T& m, T& s, T m2, T s2) {
  if (m2 == neg_inf<T>()) {
    s += s2;
  } else if (m2 > m) {
    s = s * exp_acc(m - m2) + s2;
    m = m2;
  } else {
    s += s2 * exp_acc(m2 - m);
  }
}

// ------------------------------------------------------- fixed-shift softmax
// With normalize=True the cosines c_ik = <u_i, u_k> lie in [−1, 1], so s_ik ≤ 1/τ
// and e_ik = exp(s_ik − 1/τ) = exp2((c_ik − 1)·log2(e)/τ) needs no running max:
// lse_i = 1/τ + ln Σ_i with Σ_i = Σ_{k≠i} e_ik, and the backward's
//   M_ik = g_i e_ik/Σ_i + g_k e_ik/Σ_k = e_ik (a_i + a_k),  a_i = g_i exp(1/τ − lse_i),
// one exp per element (e_ik = e_ki). Every term is ≥ 2^−E, E = 2·log2(e)/τ. The
// fixed shift is taken only while E ≤ kFixedShiftMaxExp2<Acc>; below that τ (and
// with normalize=False, where s is unbounded) the online (max, sum) path runs.
constexpr double kLog2e = 1.4426950408889634;  // log2(e): exp(x) = exp2(x·log2(e))
// fp32 (also the accumulator of 16-bit z): E ≤ 112, i.e. τ ≥ 2·log2(e)/112 ≈ 0.0258
// (about 1/39), because
//  * every e_ik is then a normal float (≥ 2^−126) with full relative precision, so
//    Σ_i (≥ its largest term) loses none of its mass to underflow; rounded 16-bit
//    operands have |c| ≤ 1 + 2^−7, which stretches E by a factor 1 + 2^−8: by
//    less than 0.5 at E = 112, inside the margin up to 113 below;
//  * a_i = g_i·2^m/Σ_i with |g_i|·2^m < 2^(kMScaleLog2 + 1) = 2^13 (the power-of-two
//    scale of g below) and Σ_i ≥ 2^−113 stays below 2^126, and a_i + a_k below fp32's
//    largest finite 2^128.
// fp64 has 2^−1022 .. 2^1024 and g scaled below 2: the same argument gives E ≤ 1000
// (τ ≥ 0.0029).
template <typename Acc>
constexpr double kFixedShiftMaxExp2 = 112;
template <>
constexpr double kFixedShiftMaxExp2<double> = 1000;

template <typename Acc>
bool use_fixed_shift(bool normalize, double temperature) {
  return normalize && 2 * kLog2e / temperature <= kFixedShiftMaxExp2<Acc>;
}

constexpr size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// Copies rows [r0, r0+R) × columns [c0, c0+C) of x [n, d] (row-major) into
// dst[R][LD], with zeros outside x, so partial tiles need no other masking.
template <int R, int C, int LD, typename T>
__device__ __forceinline__ void load_tile(T* dst, const T* x, int64_t n, int64_t d, int64_t r0,
                                          int64_t c0) {
  // 16-byte vectors when every row of x starts 16-byte aligned (d a multiple of
  // the vector width): then a vector lies wholly inside or outside column d.
  constexpr int kVec = 16 / sizeof(T);
  if constexpr (kVec > 1 && LD % kVec == 0 && C % kVec == 0) {
    if (d % kVec == 0) {
      constexpr int kPerRow = C / kVec;
      for (int e = threadIdx.x; e < R * kPerRow; e += kTileThreads) {
        const int r = e / kPerRow, c = (e % kPerRow) * kVec;
        const int64_t gr = r0 + r, gc = c0 + c;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (gr < n && gc < d) v = *reinterpret_cast<const uint4*>(x + gr * d + gc);
        *reinterpret_cast<uint4*>(dst + r * LD + c) = v;
      }
      return;
    }
  }
  const T zero = narrow<T>(0.0f);
  for (int e = threadIdx.x; e < R * C; e += kTileThreads) {
    const int r = e / C, c = e % C;
    const int64_t gr = r0 + r, gc = c0 + c;
    dst[r * LD + c] = (gr < n && gc < d) ? x[gr * d + gc] : zero;
  }
}

// ------------------------------------------------------------- tile policies
// A tile policy provides the two GEMMs of a block; the kernels do the rest.
//   dots(x, n, d, i0, k0, stage, s): s[r][c] = <x_{i0+r}, x_{k0+c}> (raw dots)
//       for the BM×BN tile; uses `stage`, all threads call it, it starts and
//       ends with the staging buffer free (last action is a __syncthreads, then
//       each thread stores its part of s without a barrier).
//   load_v(stage, x, n, d, k0, j0): stage ← x[k0:k0+BN, j0:j0+DVS], one chunk of
//       the DV = kChunks·DVS gradient columns a block owns (the chunks share one
//       staging buffer, so D ≤ DV needs no second pass over S).
//   store_m(s, m, r, c, value): record M_rc for the second GEMM.
//   Accum: the [BM, DV] gradient accumulator; add<c>() does O[:, chunk c] += M V,
//       add_t<c>() O[:, chunk c] += Mᵀ V (square tiles: the symmetric backward's
//       column side), store<kAtomic>() writes (or atomically adds) O·out_scale.
//   add_atomic(...): out[i0:, j0:j0+DVS] += (M V)·out_scale by atomicAdd (the
//       symmetric backward's row side), V being one chunk.

// *p = v, or *p += v by a float atomicAdd.
template <bool kAtomic, typename Acc>
__device__ __forceinline__ void store_value(Acc* p, Acc v) {
  if constexpr (kAtomic) {
    atomicAdd(p, v);
  } else {
    *p = v;
  }
}

// out[0] += v0, out[1] += v1 for column c of a row of d columns (c even): one
// vector red where both columns exist and d is even (8-byte aligned pairs),
// scalar atomics for the last column of an odd d.
__device__ __forceinline__ void add_pair(float* out, int64_t c, int64_t d, float v0, float v1) {
  if (c + 1 < d && d % 2 == 0) {
    ptx::red_add_v2(out, v0, v1);
  } else {
    if (c < d) atomicAdd(out, v0);
    if (c + 1 < d) atomicAdd(out + 1, v1);
  }
}

// f(std::integral_constant<int, c>{}) for c = 0, 1, ..., N − 1: the chunk index is a
// compile-time constant, so accumulator registers are indexed statically.
template <int N, typename F>
__device__ __forceinline__ void for_each_chunk(F&& f) {
  [&]<int... C>(std::integer_sequence<int, C...>) {
    (f(std::integral_constant<int, C>{}), ...);
  }(std::make_integer_sequence<int, N>{});
}

// SIMT fp32/fp64. Thread t owns rows ty + 8·i and columns tx + 16·j of each
// tile (tx = t % 16, ty = t / 16): shared-memory reads are broadcasts (rows)
// or consecutive (columns), row strides are odd so column reads do not conflict.
// DV = kChunks·DVS gradient columns per block: the accumulator holds all DV in
// registers while V is staged DVS columns at a time, so the block computes S once
// for all DV columns (fp32: DV = 128, the common D, in two chunks of 64).
template <typename T, int BM_, int BN_, int BK_, int DV_, int DVS_>
struct SimtTile {
  using In = T;
  using Acc = T;
  static constexpr int BM = BM_, BN = BN_, BK = BK_, DV = DV_, DVS = DVS_;
  static constexpr int kChunks = DV / DVS;
  static constexpr int kLdStage = BK + 1;
  static constexpr int kLdS = BN + 1;
  static constexpr int kLdV = DVS + 1;
  static constexpr int kRM = BM / 8, kRN = BN / 16, kRV = DV / 16, kRVS = DVS / 16;
  static constexpr size_t kStageBytes =
      std::max<size_t>((BM + BN) * kLdStage, BN * kLdV) * sizeof(T);
  static constexpr size_t kMBytes = 0;  // M overwrites S in place
  // g is scaled into [1, 2) (power of two, exact): fp32/fp64 M needs no headroom,
  // but the fixed shift's a_i = g_i/Σ_i must stay finite (use_fixed_shift).
  static constexpr int kMScaleLog2 = 0;
  static_assert(kTileThreads == 128 && BM % 8 == 0 && BN % 32 == 0 && DVS % 16 == 0 &&
                DV % DVS == 0);

  static __device__ __forceinline__ void dots(const T* x, int64_t n, int64_t d, int64_t i0,
                                              int64_t k0, unsigned char* stage, Acc* s) {
    T* a = reinterpret_cast<T*>(stage);
    T* b = a + BM * kLdStage;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    Acc acc[kRM][kRN];
#pragma unroll
    for (int i = 0; i < kRM; ++i)
#pragma unroll
      for (int j = 0; j < kRN; ++j) acc[i][j] = Acc(0);
    for (int64_t d0 = 0; d0 < d; d0 += BK) {
      load_tile<BM, BK, kLdStage>(a, x, n, d, i0, d0);
      load_tile<BN, BK, kLdStage>(b, x, n, d, k0, d0);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        T av[kRM], bv[kRN];
#pragma unroll
        for (int i = 0; i < kRM; ++i) av[i] = a[(ty + 8 * i) * kLdStage + kk];
#pragma unroll
        for (int j = 0; j < kRN; ++j) bv[j] = b[(tx + 16 * j) * kLdStage + kk];
#pragma unroll
        for (int i = 0; i < kRM; ++i)
#pragma unroll
          for (int j = 0; j < kRN; ++j) acc[i][j] = fma(av[i], bv[j], acc[i][j]);
      }
      __syncthreads();  // the next chunk (or load_v) overwrites the staging buffer
    }
#pragma unroll
    for (int i = 0; i < kRM; ++i)
#pragma unroll
      for (int j = 0; j < kRN; ++j) s[(ty + 8 * i) * kLdS + tx + 16 * j] = acc[i][j];
  }

  static __device__ __forceinline__ void load_v(unsigned char* stage, const T* x, int64_t n,
                                                int64_t d, int64_t k0, int64_t j0) {
    load_tile<BN, DVS, kLdV>(reinterpret_cast<T*>(stage), x, n, d, k0, j0);
  }

  static __device__ __forceinline__ void store_m(Acc* s, unsigned char*, int r, int c, Acc v) {
    s[r * kLdS + c] = v;  // the same thread read s[r][c] just before
  }

  // o[i][kFirst + j] += Σ_c M[ty + 8i][c] V[c][tx + 16j] for j < kRVS, with M in s
  // [BM][kLdS] and V in stage [BN][kLdV]; kTrans: Mᵀ instead of M (square tiles).
  template <bool kTrans, int kFirst, int kCols>
  static __device__ __forceinline__ void mv(Acc (&o)[kRM][kCols], const Acc* s,
                                            const unsigned char* stage) {
    static_assert(!kTrans || BM == BN, "Mᵀ V needs square tiles");
    static_assert(kFirst + kRVS <= kCols);
    const T* v = reinterpret_cast<const T*>(stage);
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll 4
    for (int c = 0; c < BN; ++c) {
      Acc mv[kRM], vv[kRVS];
#pragma unroll
      for (int i = 0; i < kRM; ++i) mv[i] = kTrans ? s[c * kLdS + ty + 8 * i] : s[(ty + 8 * i) * kLdS + c];
#pragma unroll
      for (int j = 0; j < kRVS; ++j) vv[j] = v[c * kLdV + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < kRM; ++i)
#pragma unroll
        for (int j = 0; j < kRVS; ++j) o[i][kFirst + j] = fma(mv[i], vv[j], o[i][kFirst + j]);
    }
  }

  // out[i0 + r][j0 + c] += (M V)[r][c]·out_scale by atomicAdd, V one chunk in stage.
  static __device__ __forceinline__ void add_atomic(const Acc* s, const unsigned char*,
                                                    const unsigned char* stage, Acc* out,
                                                    int64_t n, int64_t d, int64_t i0, int64_t j0,
                                                    Acc out_scale, Acc*) {
    Acc t[kRM][kRVS];
#pragma unroll
    for (int i = 0; i < kRM; ++i)
#pragma unroll
      for (int j = 0; j < kRVS; ++j) t[i][j] = Acc(0);
    mv<false, 0>(t, s, stage);
    write<true>(t, out, n, d, i0, j0, out_scale);
  }

  // out[i0 + ty + 8i][j0 + tx + 16j] (+)= o[i][j]·out_scale inside [n, d].
  template <bool kAtomic, int kCols>
  static __device__ __forceinline__ void write(const Acc (&o)[kRM][kCols], Acc* out, int64_t n,
                                               int64_t d, int64_t i0, int64_t j0, Acc out_scale) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < kRM; ++i) {
      const int64_t gi = i0 + ty + 8 * i;
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const int64_t gj = j0 + tx + 16 * j;
        if (gi < n && gj < d) store_value<kAtomic>(out + gi * d + gj, o[i][j] * out_scale);
      }
    }
  }

  struct Accum {
    Acc o[kRM][kRV];  // chunk c holds columns c·DVS + tx + 16·j, j < kRVS

    __device__ __forceinline__ void zero() {
#pragma unroll
      for (int i = 0; i < kRM; ++i)
#pragma unroll
        for (int j = 0; j < kRV; ++j) o[i][j] = Acc(0);
    }

    // O[:, chunk kChunk] += M V with M in s [BM][kLdS] and V in stage [BN][kLdV].
    template <int kChunk>
    __device__ __forceinline__ void add(const Acc* s, const unsigned char*,
                                        const unsigned char* stage) {
      mv<false, kChunk * kRVS>(o, s, stage);
    }

    // O[:, chunk kChunk] += Mᵀ V (rows of O are columns of M).
    template <int kChunk>
    __device__ __forceinline__ void add_t(const Acc* s, const unsigned char*,
                                          const unsigned char* stage) {
      mv<true, kChunk * kRVS>(o, s, stage);
    }

    template <bool kAtomic>
    __device__ __forceinline__ void store(Acc* out, int64_t n, int64_t d, int64_t i0, int64_t j0,
                                          Acc out_scale, Acc*) const {
      write<kAtomic>(o, out, n, d, i0, j0, out_scale);
    }
  };
};

// float32 on tensor cores: FloatTile's blocking with all three tile products by
// mma.sync m16n8k8 tf32 instead of SIMT FMAs: S = U_I U_Kᵀ (dots), and the
// backward's M·V and Mᵀ·V (Accum, add_atomic; V = U_K or U_I). Each warp of the
// 2×2 grid computes 32×32 of the 64×64 S tile and, per staged chunk of DVS = 64
// gradient columns, 32 rows × 32 columns of M·V (2 m16 × 4 n8 tiles each), reading
// its fragments from shared memory by plain 32-bit loads and rounding them with
// cvt.rna.tf32.f32. Row strides are chosen for the fragment loads (lanes g =
// lane / 4, t = lane % 4; a load instruction is conflict-free when its 32 lanes
// hit 32 distinct banks):
//  * staging, BK + 4 = 20 floats (SimtTile's BK + 1 would put lanes g and g + 2 on
//    one bank): dots reads row g, column t of 8 rows × 4 columns, banks 20g + t
//    mod 32, all 32 distinct;
//  * S (M in place), BN + 4 = 68 floats: M as A reads row g, column t, banks
//    68g + t = 4g + t mod 32, all distinct; Mᵀ as A (add_t) reads row t, column g,
//    banks 4t + g, two lanes a bank (2-way: a stride ≡ 8 mod 16 would free Mᵀ
//    and make M 2-way instead, and the row-block kernel reads M only); dots' C
//    stores (row g, column 2t + e) hit 4g + 2t + e, 2-way, once per tile;
//  * V, DVS + 8 = 72 floats: B reads row t (k), column g (n), banks 72t + g =
//    8t + g mod 32, all distinct (rows of 16-byte multiples: load_v copies by
//    uint4 where D is a multiple of 4).
// kSplit = false: plain TF32, one mma per product (TF32 matmuls allowed: float_math
// below); each operand is rounded to tf32 (unit roundoff 2^-11), the products of
// tf32 values are exact and summed in fp32. In the backward M is rounded to tf32
// too: one relative rounding of each M_ik, whose terms the gradient's rounding
// rule already counts (palfast/testing.py, TF32_EPS).
// kSplit = true: 3×TF32, x = x_hi + x_lo with x_hi = tf32(x), x_lo = tf32(x − x_hi),
// a·b ≈ a_hi·b_hi + a_hi·b_lo + a_lo·b_hi (a_lo·b_lo, of relative size 2^-22, is
// dropped): three mmas per product, about fp32's accuracy; M is split as well.
template <bool kSplit>
struct Tf32Tile : SimtTile<float, 64, 64, 16, 128, 64> {
  static constexpr int kLdStage = BK + 4;
  static constexpr int kLdS = BN + 4;
  static constexpr int kLdV = DVS + 8;
  static constexpr size_t kStageBytes =
      std::max<size_t>((BM + BN) * kLdStage, BN * kLdV) * sizeof(float);
  static constexpr int kK8 = 8, kWarpRows = 32, kWarpCols = 32, kWarpVCols = DVS / 2;
  static constexpr int kMT = kWarpRows / 16, kNT = kWarpCols / 8;
  static_assert(BM == 2 * kWarpRows && BN == 2 * kWarpCols && kWarpVCols == kWarpCols &&
                    BK % kK8 == 0 && BN % kK8 == 0 && kWarps == 4,
                "2×2 warps of 32×32 (S) and of 32 rows × 32 columns of a V chunk (M·V)");
  static_assert(kLdS % 8 == 4 && kLdV % 16 == 8 && kLdStage % 8 == 4,
                "the strides of the bank counts above");

  // k-steps of mv unrolled: two overlap one step's fragment loads with the other's
  // mmas; 3×TF32 holds twice the fragments, and sym_grad_kernel (64 column-side
  // accumulators, 255 registers) then spills on sm_80 unless the loop runs one at a time.
  static constexpr int kMvUnroll = kSplit ? 1 : 2;
  // write_frags' atomic adds by red_add_v2, two columns a request, from sm_90 (the
  // emulator included); before it red_add_v2 is two scalar atomics anyway, and the
  // scalar loop keeps the 3×TF32 sym_grad_kernel from spilling on sm_80 (16 bytes).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  static constexpr bool kVectorRed = false;
#else
  static constexpr bool kVectorRed = true;
#endif
  using FragA = uint32_t[kMT][4];  // tf32 A fragments (hi or lo) of the warp's m16 tiles
  using FragB = uint32_t[kNT][2];  // tf32 B fragments of its n8 tiles
  using FragC = float[kMT][kNT][4];

  // hi (and, kSplit, lo) tf32 parts of x.
  static __device__ __forceinline__ void split(float x, uint32_t& hi, uint32_t& lo) {
    hi = ptx::cvt_rna_tf32(x);
    if constexpr (kSplit) {
      float h;
      memcpy(&h, &hi, sizeof h);
      lo = ptx::cvt_rna_tf32(x - h);
    }
  }

  // A fragments of one k-step: the m16 tiles at rows r0 + 16i, columns k0..k0+7,
  // element (row, k) being at(row, k).
  template <typename F>
  static __device__ __forceinline__ void load_a(FragA& hi, FragA& lo, int r0, int k0, F at) {
    const int lane = threadIdx.x % kWarpSize, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int i = 0; i < kMT; ++i)
#pragma unroll
      for (int r = 0; r < 4; ++r)  // a[r] = (g + 8·(r % 2), t + 4·(r / 2))
        split(at(r0 + 16 * i + g + 8 * (r & 1), k0 + t + 4 * (r >> 1)), hi[i][r], lo[i][r]);
  }

  // B fragments of one k-step: the n8 tiles at columns c0 + 8j, k = k0..k0+7,
  // element (k, col) being at(k, col).
  template <typename F>
  static __device__ __forceinline__ void load_b(FragB& hi, FragB& lo, int c0, int k0, F at) {
    const int lane = threadIdx.x % kWarpSize, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int r = 0; r < 2; ++r)  // b[r] = (k t + 4·r, n g)
        split(at(k0 + t + 4 * r, c0 + 8 * j + g), hi[j][r], lo[j][r]);
  }

  // acc += A·B over one k-step for every m16 × n8 tile of the warp.
  static __device__ __forceinline__ void mma_step(FragC& acc, const FragA& ah, const FragA& al,
                                                  const FragB& bh, const FragB& bl) {
#pragma unroll
    for (int i = 0; i < kMT; ++i)
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        if constexpr (kSplit) {  // the small terms first
          ptx::mma_m16n8k8_tf32(acc[i][j], al[i], bh[j]);
          ptx::mma_m16n8k8_tf32(acc[i][j], ah[i], bl[j]);
        }
        ptx::mma_m16n8k8_tf32(acc[i][j], ah[i], bh[j]);
      }
  }

  static __device__ __forceinline__ void zero(FragC& acc) {
#pragma unroll
    for (int i = 0; i < kMT; ++i)
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
  }

  static __device__ __forceinline__ void dots(const float* x, int64_t n, int64_t d, int64_t i0,
                                              int64_t k0, unsigned char* stage, float* s) {
    float* a = reinterpret_cast<float*>(stage);
    float* b = a + BM * kLdStage;
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int wm = warp / 2, wn = warp % 2, g = lane / 4, t = lane % 4;
    FragC acc;
    zero(acc);
    for (int64_t d0 = 0; d0 < d; d0 += BK) {
      load_tile<BM, BK, kLdStage>(a, x, n, d, i0, d0);
      load_tile<BN, BK, kLdStage>(b, x, n, d, k0, d0);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; kk += kK8) {
        FragA ah, al;
        FragB bh, bl;
        load_a(ah, al, wm * kWarpRows, kk, [&](int row, int k) { return a[row * kLdStage + k]; });
        // B = U_Kᵀ: element (k, col) is U_K[col][k]
        load_b(bh, bl, wn * kWarpCols, kk, [&](int k, int col) { return b[col * kLdStage + k]; });
        mma_step(acc, ah, al, bh, bl);
      }
      __syncthreads();  // the next chunk (or load_v) overwrites the staging buffer
    }
#pragma unroll
    for (int i = 0; i < kMT; ++i)
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {  // c[e] = (g + 8·(e / 2), 2t + e % 2)
          const int row = wm * kWarpRows + 16 * i + g + 8 * (e >> 1);
          const int col = wn * kWarpCols + 8 * j + 2 * t + (e & 1);
          s[row * kLdS + col] = acc[i][j][e];
        }
  }

  // SimtTile's, with this tile's strides.
  static __device__ __forceinline__ void load_v(unsigned char* stage, const float* x, int64_t n,
                                                int64_t d, int64_t k0, int64_t j0) {
    load_tile<BN, DVS, kLdV>(reinterpret_cast<float*>(stage), x, n, d, k0, j0);
  }

  static __device__ __forceinline__ void store_m(float* s, unsigned char*, int r, int c, float v) {
    s[r * kLdS + c] = v;  // the same thread read s[r][c] just before
  }

  // o += M V (kTrans: Mᵀ V, square tiles) for this warp's rows wm·32 + 16i and the
  // chunk's columns wn·32 + 8j, with M in s [BM][kLdS] and V in stage [BN][kLdV].
  template <bool kTrans>
  static __device__ __forceinline__ void mv(FragC& o, const float* s, const unsigned char* stage) {
    static_assert(!kTrans || BM == BN, "Mᵀ V needs square tiles");
    const float* v = reinterpret_cast<const float*>(stage);
    const int warp = threadIdx.x / kWarpSize, wm = warp / 2, wn = warp % 2;
#pragma unroll kMvUnroll
    for (int kk = 0; kk < BN; kk += kK8) {
      FragA ah, al;
      FragB bh, bl;
      load_a(ah, al, wm * kWarpRows, kk, [&](int row, int k) {
        return kTrans ? s[k * kLdS + row] : s[row * kLdS + k];
      });
      load_b(bh, bl, wn * kWarpVCols, kk, [&](int k, int col) { return v[k * kLdV + col]; });
      mma_step(o, ah, al, bh, bl);
    }
  }

  // out[i0 + r][j0 + c] (+)= o's element (r, c)·out_scale inside [n, d], o holding
  // this warp's rows wm·32 + 16i + g + 8·(e / 2), columns wn·32 + 8j + 2t + e % 2.
  template <bool kAtomic>
  static __device__ __forceinline__ void write_frags(const FragC& o, float* out, int64_t n,
                                                     int64_t d, int64_t i0, int64_t j0,
                                                     float out_scale) {
    const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
    const int wm = warp / 2, wn = warp % 2, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int i = 0; i < kMT; ++i)
#pragma unroll
      for (int e2 = 0; e2 < 2; ++e2) {
        const int64_t gi = i0 + wm * kWarpRows + 16 * i + g + 8 * e2;
        if (gi >= n) continue;
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
          // the lane's two adjacent columns (even gj: j0 is a multiple of DVS)
          const int64_t gj = j0 + wn * kWarpVCols + 8 * j + 2 * t;
          if constexpr (kAtomic && kVectorRed) {  // one request for both where d is even
            add_pair(out + gi * d + gj, gj, d, o[i][j][2 * e2] * out_scale,
                     o[i][j][2 * e2 + 1] * out_scale);
          } else {
#pragma unroll
            for (int e1 = 0; e1 < 2; ++e1)
              if (gj + e1 < d)
                store_value<kAtomic>(out + gi * d + gj + e1, o[i][j][2 * e2 + e1] * out_scale);
          }
        }
      }
  }

  // out[i0 + r][j0 + c] += (M V)[r][c]·out_scale by atomicAdd, V one chunk in stage:
  // 32 accumulators a thread, as SimtTile's.
  static __device__ __forceinline__ void add_atomic(const float* s, const unsigned char*,
                                                    const unsigned char* stage, float* out,
                                                    int64_t n, int64_t d, int64_t i0, int64_t j0,
                                                    float out_scale, float*) {
    FragC t;
    zero(t);
    mv<false>(t, s, stage);
    write_frags<true>(t, out, n, d, i0, j0, out_scale);
  }

  struct Accum {
    FragC o[kChunks];  // chunk c: columns c·DVS + wn·32 + 8j + 2t + e % 2 (write_frags)

    __device__ __forceinline__ void zero() {
#pragma unroll
      for (int c = 0; c < kChunks; ++c) Tf32Tile::zero(o[c]);
    }

    // O[:, chunk kChunk] += M V with M in s [BM][kLdS] and V in stage [BN][kLdV].
    template <int kChunk>
    __device__ __forceinline__ void add(const float* s, const unsigned char*,
                                        const unsigned char* stage) {
      mv<false>(o[kChunk], s, stage);
    }

    // O[:, chunk kChunk] += Mᵀ V (rows of O are columns of M).
    template <int kChunk>
    __device__ __forceinline__ void add_t(const float* s, const unsigned char*,
                                          const unsigned char* stage) {
      mv<true>(o[kChunk], s, stage);
    }

    template <bool kAtomic>
    __device__ __forceinline__ void store(float* out, int64_t n, int64_t d, int64_t i0,
                                          int64_t j0, float out_scale, float*) const {
#pragma unroll
      for (int c = 0; c < kChunks; ++c)
        write_frags<kAtomic>(o[c], out, n, d, i0, j0 + c * DVS, out_scale);
    }
  };
};

// Tensor cores (WMMA m16n16k16, fp32 accumulation) for float16/bfloat16.
// Row strides are 16-byte multiples (WMMA and uint4 need it) padded off
// multiples of 128 bytes to spread shared-memory banks; every fragment pointer
// is 32-byte aligned (offsets are multiples of 16 rows / 16 columns).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define PALFAST_WMMA_OK 0  // bf16 WMMA needs sm_80; the host refuses older GPUs
#else
#define PALFAST_WMMA_OK 1
#endif

template <typename T>
struct WmmaTile {
  using In = T;
  using Acc = float;
  static constexpr int BM = 64, BN = 64, BK = 32, DV = 128, DVS = DV;
  static constexpr int kChunks = 1;
  static constexpr int kLdStage = BK + 8;
  static constexpr int kLdS = BN + 4;  // floats; store_matrix_sync needs a multiple of 4
  static constexpr int kLdM = BN + 8;
  static constexpr int kLdV = DV + 8;
  static constexpr size_t kStageBytes =
      std::max<size_t>((BM + BN) * kLdStage, BN * kLdV) * sizeof(T);
  static constexpr size_t kMBytes = BM * kLdM * sizeof(T);
  // M is multiplied by 2^kMScaleLog2 / 2^ilogb(max|g|) before rounding to T, so
  // |M| < 2^(kMScaleLog2 + 2) (< 65504 for float16; |g_i| scaled < 2^13 and
  // p ≤ 1) and small M are not flushed to 0 (g = 1/N for a mean reduction).
  static constexpr int kMScaleLog2 = 12;
  static_assert(kTileThreads == 128, "2×2 warps");

  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using FragBt = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;  // U_Kᵀ
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
  using FragAt = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major>;  // Mᵀ
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

  static __device__ __forceinline__ void dots(const T* x, int64_t n, int64_t d, int64_t i0,
                                              int64_t k0, unsigned char* stage, Acc* s) {
#if PALFAST_WMMA_OK
    T* a = reinterpret_cast<T*>(stage);
    T* b = a + BM * kLdStage;
    const int warp = threadIdx.x / kWarpSize, wm = warp / 2, wn = warp % 2;
    FragC acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    for (int64_t d0 = 0; d0 < d; d0 += BK) {
      load_tile<BM, BK, kLdStage>(a, x, n, d, i0, d0);
      load_tile<BN, BK, kLdStage>(b, x, n, d, k0, d0);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        FragA fa[2];
        FragBt fb[2];  // U_K chunk read as a column-major K-major matrix = U_Kᵀ
#pragma unroll
        for (int i = 0; i < 2; ++i)
          wmma::load_matrix_sync(fa[i], a + (wm * 32 + 16 * i) * kLdStage + kk, kLdStage);
#pragma unroll
        for (int j = 0; j < 2; ++j)
          wmma::load_matrix_sync(fb[j], b + (wn * 32 + 16 * j) * kLdStage + kk, kLdStage);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
      __syncthreads();  // the next chunk (or load_v) overwrites the staging buffer
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(s + (wm * 32 + 16 * i) * kLdS + wn * 32 + 16 * j, acc[i][j], kLdS,
                                wmma::mem_row_major);
#else
    __trap();
#endif
  }

  static __device__ __forceinline__ void load_v(unsigned char* stage, const T* x, int64_t n,
                                                int64_t d, int64_t k0, int64_t j0) {
    load_tile<BN, DV, kLdV>(reinterpret_cast<T*>(stage), x, n, d, k0, j0);
  }

  static __device__ __forceinline__ void store_m(Acc*, unsigned char* m, int r, int c, Acc v) {
    reinterpret_cast<T*>(m)[r * kLdM + c] = narrow<T>(v);
  }

  // out[gi0 + r][gj0 + c] (+)= f[r][c]·out_scale inside [n, d]. Fragments have no
  // documented element layout, so f goes through the warp's 16×16 scratch w.
  template <bool kAtomic>
  static __device__ __forceinline__ void write_frag(const FragC& f, float* w, Acc* out, int64_t n,
                                                    int64_t d, int64_t gi0, int64_t gj0,
                                                    Acc out_scale) {
#if PALFAST_WMMA_OK
    const int lane = threadIdx.x % kWarpSize;
    wmma::store_matrix_sync(w, f, 16, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += kWarpSize) {
      const int64_t gi = gi0 + e / 16, gj = gj0 + e % 16;
      if (gi < n && gj < d) store_value<kAtomic>(out + gi * d + gj, w[e] * out_scale);
    }
    __syncwarp();  // before the next fragment overwrites the scratch
#endif
  }

  // out[i0 + r][j0 + c] += (M V)[r][c]·out_scale by atomicAdd, M in m [BM][kLdM],
  // V in stage [BN][kLdV]; each warp adds its 32×64 part one 16-column slice at
  // a time (16 more accumulator registers, not 64), through a per-warp 16×16
  // scratch in `scratch` (the S buffer, free once M is in m).
  static __device__ __forceinline__ void add_atomic(const Acc*, const unsigned char* m_raw,
                                                    const unsigned char* stage, Acc* out,
                                                    int64_t n, int64_t d, int64_t i0, int64_t j0,
                                                    Acc out_scale, Acc* scratch) {
#if PALFAST_WMMA_OK
    const T* m = reinterpret_cast<const T*>(m_raw);
    const T* v = reinterpret_cast<const T*>(stage);
    const int warp = threadIdx.x / kWarpSize, wm = warp / 2, wn = warp % 2;
    float* w = scratch + warp * 256;
#pragma unroll 1
    for (int j = 0; j < 4; ++j) {
      FragC t[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::fill_fragment(t[i], 0.0f);
#pragma unroll
      for (int kk = 0; kk < BN; kk += 16) {
        FragA fa[2];
        FragB fb;
#pragma unroll
        for (int i = 0; i < 2; ++i)
          wmma::load_matrix_sync(fa[i], m + (wm * 32 + 16 * i) * kLdM + kk, kLdM);
        wmma::load_matrix_sync(fb, v + kk * kLdV + wn * 64 + 16 * j, kLdV);
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::mma_sync(t[i], fa[i], fb, t[i]);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
        write_frag<true>(t[i], w, out, n, d, i0 + wm * 32 + 16 * i, j0 + wn * 64 + 16 * j,
                         out_scale);
    }
#endif
  }

  struct Accum {
    FragC o[2][4];  // warp (wm, wn) owns rows wm·32 + 16·i, columns wn·64 + 16·j

    __device__ __forceinline__ void zero() {
#if PALFAST_WMMA_OK
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) wmma::fill_fragment(o[i][j], 0.0f);
#endif
    }

    // O += M V (kTrans: Mᵀ V, rows of O being columns of M) with M in m [BM][kLdM]
    // (T) and V in stage [BN][kLdV] (T). Mᵀ is M read column-major.
    template <bool kTrans>
    __device__ __forceinline__ void mv(const unsigned char* m_raw, const unsigned char* stage) {
#if PALFAST_WMMA_OK
      const T* m = reinterpret_cast<const T*>(m_raw);
      const T* v = reinterpret_cast<const T*>(stage);
      const int warp = threadIdx.x / kWarpSize, wm = warp / 2, wn = warp % 2;
#pragma unroll
      for (int kk = 0; kk < BN; kk += 16) {
        std::conditional_t<kTrans, FragAt, FragA> fa[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int r = wm * 32 + 16 * i;
          wmma::load_matrix_sync(fa[i], kTrans ? m + kk * kLdM + r : m + r * kLdM + kk, kLdM);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          FragB fb;
          wmma::load_matrix_sync(fb, v + kk * kLdV + wn * 64 + 16 * j, kLdV);
#pragma unroll
          for (int i = 0; i < 2; ++i) wmma::mma_sync(o[i][j], fa[i], fb, o[i][j]);
        }
      }
#endif
    }

    template <int kChunk>
    __device__ __forceinline__ void add(const Acc*, const unsigned char* m,
                                        const unsigned char* stage) {
      static_assert(kChunk == 0, "one chunk: DVS = DV");
      mv<false>(m, stage);
    }

    template <int kChunk>
    __device__ __forceinline__ void add_t(const Acc*, const unsigned char* m,
                                          const unsigned char* stage) {
      static_assert(kChunk == 0 && BM == BN, "one chunk, square tiles");
      mv<true>(m, stage);
    }

    // Each fragment goes through a per-warp 16×16 scratch (in the then unused S
    // buffer) for bounds checks.
    template <bool kAtomic>
    __device__ __forceinline__ void store(Acc* out, int64_t n, int64_t d, int64_t i0, int64_t j0,
                                          Acc out_scale, Acc* scratch) const {
      const int warp = threadIdx.x / kWarpSize, wm = warp / 2, wn = warp % 2;
      float* w = scratch + warp * 256;
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
          write_frag<kAtomic>(o[i][j], w, out, n, d, i0 + wm * 32 + 16 * i, j0 + wn * 64 + 16 * j,
                              out_scale);
    }
  };
};

// Shared-memory layout of a tile kernel: [staging | S | M | row/col stats],
// each part 128-byte aligned.
template <typename Tile>
struct Smem {
  using Acc = typename Tile::Acc;
  static constexpr size_t kS = round_up(Tile::kStageBytes, 128);
  static constexpr size_t kM = kS + round_up(size_t(Tile::BM) * Tile::kLdS * sizeof(Acc), 128);
  static constexpr size_t kForward = kM;  // the forward needs staging and S only
  static constexpr size_t kStats = kM + round_up(Tile::kMBytes, 128);
  static constexpr size_t kBackward = kStats + 2 * (Tile::BM + Tile::BN) * sizeof(Acc);
  static_assert(kBackward <= 48 * 1024, "static shared memory is limited to 48 KiB");
};

// -------------------------------------------------------------- row kernels
// Row kernels run one warp per row (for_each_row): each row's shuffles involve
// its whole warp.

// ‖z_i‖ in every lane, with the row scaled before squaring by the power of two
// 2^−e that brings its largest |z_ik| into [1, 2) (e clamped so that 2^±e are
// normal floats), as row_norm in csrc/cpu/info_nce.cpp: float32 rows of norm 1e20 do
// not overflow (nor rows of 1e-30 underflow); a power of two scales exactly.
template <typename Acc, typename Z>
__device__ __forceinline__ Acc row_norm(const Z* __restrict__ zi, int64_t d, int lane) {
  Acc big = Acc(0);
  for (int64_t k = lane; k < d; k += kWarpSize) big = fmax(big, fabs(widen(zi[k])));
  big = warp_max(big);
  Acc scale = Acc(1);  // for a zero row, and for inf (NaN is caught by the sum below)
  if (big > Acc(0) && big < std::numeric_limits<Acc>::infinity()) {
    constexpr int kMinExp = std::numeric_limits<Acc>::min_exponent - 1;  // 2^kMinExp: smallest normal
    constexpr int kMaxExp = std::numeric_limits<Acc>::max_exponent - 1;  // 2^kMaxExp: largest power
    scale = static_cast<Acc>(ldexp(1.0, max(kMinExp, min(kMaxExp, -ilogb(big)))));
  }
  Acc ss = Acc(0);
  for (int64_t k = lane; k < d; k += kWarpSize) {
    const Acc v = widen(zi[k]) * scale;
    ss += v * v;
  }
  return sqrt(warp_sum(ss)) / scale;
}

// max(‖z_i‖, kNormFloor) (csrc/info_nce.h); like clamp_min, a NaN norm stays NaN.
template <typename Acc>
__device__ __forceinline__ Acc floored(Acc nrm) {
  return nrm < Acc(kNormFloor) ? Acc(kNormFloor) : nrm;
}

// The GEMM operand u = z / max(‖z‖, kNormFloor) (or z) in type Op, and ‖z‖ in Acc
// when norm != nullptr.
template <typename Z, typename Op, typename Acc>
__global__ void prep_kernel(const Z* __restrict__ z, int64_t n, int64_t d, bool normalize,
                            Op* __restrict__ op, Acc* __restrict__ norm) {
  for_each_row(n, [&](int64_t i, int lane) {
    const Z* zi = z + i * d;
    if (!normalize && norm == nullptr) {
      for (int64_t k = lane; k < d; k += kWarpSize) op[i * d + k] = narrow<Op>(widen(zi[k]));
      return;
    }
    const Acc nrm = row_norm<Acc>(zi, d, lane);
    if (norm != nullptr && lane == 0) norm[i] = nrm;
    const Acc denom = normalize ? floored(nrm) : Acc(1);
    for (int64_t k = lane; k < d; k += kWarpSize) {
      const Acc v = normalize ? widen(zi[k]) / denom : widen(zi[k]);
      op[i * d + k] = narrow<Op>(v);
    }
  });
}

// ------------------------------------------------------------------- host side
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

// The ATen element type behind a CUDA element type (the inverse of CudaType).
template <typename T>
struct AtenType {
  using type = T;
};
template <>
struct AtenType<__half> {
  using type = at::Half;
};
template <>
struct AtenType<__nv_bfloat16> {
  using type = at::BFloat16;
};

// Typed device pointer; data_ptr<> checks the dtype, so a mix-up throws.
template <typename T>
const T* ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr<typename AtenType<T>::type>());
}
template <typename T>
T* mut_ptr(at::Tensor& t) {
  return const_cast<T*>(ptr<T>(t));
}

// The GEMM operand u [n, d] in the tile's input type (z's dtype for 16-bit z,
// else the accumulator type) and, when wanted, ‖z‖ per row in Acc.
template <typename ZT, typename Tile>
at::Tensor prepare(const at::Tensor& z, bool normalize, at::Tensor* norm, cudaStream_t stream) {
  using Z = typename CudaType<ZT>::type;
  using In = typename Tile::In;
  using Acc = typename Tile::Acc;
  const int64_t n = z.size(0), d = z.size(1);
  const at::Tensor zc = z.contiguous();
  const auto acc_dtype = c10::CppTypeToScalarType<Acc>::value;
  at::Tensor op = at::empty({n, d}, z.options().dtype(std::is_same_v<In, Acc> ? acc_dtype
                                                                              : z.scalar_type()));
  if (norm != nullptr) *norm = at::empty({n}, z.options().dtype(acc_dtype));
  launch(prep_kernel<Z, In, Acc>, grid_stride(n, kRowWarps), kRowThreads,
         stream, ptr<Z>(zc), n, d, normalize, mut_ptr<In>(op),
         norm != nullptr ? mut_ptr<Acc>(*norm) : nullptr);
  return op;
}

// How float32 z computes S = U_I U_Kᵀ, read at each call: SIMT FMAs before sm_80
// (no tf32 mma), else tf32 tensor cores, plain where PyTorch's CUDA matmul
// precision is "tf32" (torch.backends.cuda.matmul.fp32_precision, which
// allow_tf32 = True and torch.set_float32_matmul_precision("high") also set),
// 3×TF32 split precision otherwise. Read as float32Precision(CUDA, MATMUL), as
// PyTorch's own cuBLAS calls read it: allowTF32CuBLAS() throws where the legacy and
// the new flag were both set.
enum class FloatMath { kSimt, kTf32, kTf32x3 };

FloatMath float_math() {
  if (at::cuda::getCurrentDeviceProperties()->major < 8) return FloatMath::kSimt;
  const bool tf32 = at::globalContext().float32Precision(at::Float32Backend::CUDA,
                                                         at::Float32Op::MATMUL) ==
                    at::Float32Precision::TF32;
  return tf32 ? FloatMath::kTf32 : FloatMath::kTf32x3;
}

void check_tensor_cores(const at::Tensor& z) {
  if (z.scalar_type() != at::kHalf && z.scalar_type() != at::kBFloat16) return;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major >= 8, "palfast.info_nce: ", z.scalar_type(),
              " z on CUDA needs a GPU of compute capability 8.0 or newer, got ", prop->major, ".",
              prop->minor, "; pass z.float() instead");
}

// Blocks per SM that the grids of small N aim for (the symmetric forward's region
// pairs, the backward's key splits): two, so that every SM has a block to run
// while another one waits on memory or at a barrier.
constexpr int64_t kBlocksPerSm = 2;

// Square tiles (the symmetric kernels); DV = 128 gradient columns per block (the
// common D ≤ 128 computes S once), staged in chunks that fit 48 KiB of shared memory.
using DoubleTile = SimtTile<double, 32, 32, 16, 128, 32>;
using FloatTile = SimtTile<float, 64, 64, 16, 128, 64>;
using Tf32Tile1 = Tf32Tile<false>;  // TF32 matmuls allowed: plain TF32
using Tf32Tile3 = Tf32Tile<true>;   // otherwise: 3×TF32
using HalfTile = WmmaTile<__half>;
using BFloat16Tile = WmmaTile<__nv_bfloat16>;

}  // namespace
}  // namespace palfast::cuda
