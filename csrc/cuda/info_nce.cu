// palfast::info_nce on CUDA: flash-style tiles, never an N×N matrix.
//
// Same semantics as csrc/cpu/info_nce.cpp (the model): u = z / max(‖z‖, kNormFloor)
// (or u = z), s_ik = <u_i, u_k>/τ, lse_i = log Σ_{k≠i} exp(s_ik),
// loss_i = lse_i − <u_i, (G u)_i>/(τ W_i) for W_i > 0 else 0, for anchor rows
// i in [a0, a1) (all rows in one process, a rank's own rows under
// torch.distributed); other rows get loss 0 and lse +inf. Outputs are
// float32 (float64 for float64 z); only lse is saved for backward.
//
// Forward, two paths (use_fixed_shift):
//  * normalize=True and τ ≥ about 0.026 (the usual case): the fixed-shift
//    softmax e_ik = exp(s_ik − 1/τ) over the tile pairs I ≤ K only, each e_ik
//    added to row i and to row k (sym_lse_kernel, then lse_finish_kernel; see
//    "symmetric fixed-shift forward" below);
//  * otherwise (lse_kernel): one block owns BM query rows and walks over all key
//    tiles of BN rows, folding each into a running (max, sum) per row. Each lane
//    keeps its own running pair per row (no shuffles per tile); lanes are merged
//    once at the end.
// Both compute S = U_I U_Kᵀ over D in chunks of BK (partial tiles zero-padded in
// shared memory) and store S in shared memory.
//
// Backward (grad_tile_kernel): one block owns BM rows and DV columns of
//   dneg_I = Σ_K M_IK U_K,   M_ik = g_i exp(s_ik − lse_i) + g_k exp(s_ik − lse_k)
// (= e_ik (a_i + a_k) on the fixed-shift path, one exp per entry),
// with the diagonal and rows/columns ≥ N masked (their exp is never evaluated,
// so lse = −inf for N = 1 gives no NaN). S is recomputed exactly as in the
// forward (same code, same chunk order), so exp(s_ik − lse_i) ≤ 1. The block
// writes its slice of dneg once: no atomics on the gradient. For D > DV the
// grid has ceil(D/DV) column blocks, each recomputing S (cost × ceil(D/DV) on
// the first GEMM; DV = 128 for the 16-bit path covers the common D ≤ 128).
// At small N the key tiles are split over several blocks per output tile (grid
// z), whose partial sums are then added in a fixed order (sum_slices_kernel).
// Then, as on the CPU:
//   dL/du = (1/τ) [dneg − c ∘ (G u) − Gᵀ(c ∘ u)],  c_i = g_i / W_i (0 if W_i = 0),
// followed by the normalisation backward, fused in grad_rows_kernel.
//
// Tile GEMMs:
//   float16/bfloat16: WMMA m16n16k16 tensor cores, fp32 accumulation; BM = BN = 64,
//     BK = 32, DV = 128, 4 warps in 2×2 (32×32 of S, 32×64 of the gradient each).
//     M is rounded to the 16-bit type for the second GEMM, after scaling by a
//     power of two 2^12/max|g| so that float16 does not flush small M to zero
//     (g = 1/N for a mean reduction); the scale is undone in fp32.
//   float32: SIMT fp32 (exact like the CPU, no TF32); BM = BN = 64, BK = 16, DV = 64.
//   float64: SIMT fp64; BM = BN = 32, BK = 16, DV = 32 (fits 48 KiB of smem).
// All blocks have 128 threads. Shared memory per block ≤ 45 KiB (static).
//
// Positive term (graph_spmm.cuh): out += G·(scale ∘ x) with one warp per CSR
// row and, for label sets, per-class sums (atomicAdd into a [C, D] buffer, so
// those ops alert under deterministic mode) then S_{y_i} − x_i. The graph's
// index and class-id ranges are checked first (check_graph_values in csrc/graph.h).
// It reads the same u as the tile GEMMs (rounded to 16 bits for 16-bit z,
// accumulated in fp32), so s_ij in the positive term and in lse_i agree; only
// the normalisation backward recomputes u from z in full precision.
// Memory: O(N·D) (u, G u, the gradient accumulator), O(C·D) for class sums.
// All work is on the current stream; the only host synchronisation is the one
// of check_graph_values (a bad class id would otherwise write out of bounds).
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

#include "../info_nce.h"
#include "graph_spmm.cuh"

namespace palfast::cuda {
namespace {

namespace wmma = nvcuda::wmma;

// Tile kernels: 4 warps, the 2×2 warp grid of the 16-bit tiles (each warp 32×32
// of S) and 8 S entries per thread per 64×64 tile in the SIMT tiles.
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
//   load_v(stage, x, n, d, k0, j0): stage ← x[k0:k0+BN, j0:j0+DV].
//   store_m(s, m, r, c, value): record M_rc for the second GEMM.
//   Accum: the [BM, DV] gradient accumulator, add() does O += M V.

// SIMT fp32/fp64. Thread t owns rows ty + 8·i and columns tx + 16·j of each
// tile (tx = t % 16, ty = t / 16): shared-memory reads are broadcasts (rows)
// or consecutive (columns), row strides are odd so column reads do not conflict.
template <typename T, int BM_, int BN_, int BK_, int DV_>
struct SimtTile {
  using In = T;
  using Acc = T;
  static constexpr int BM = BM_, BN = BN_, BK = BK_, DV = DV_;
  static constexpr int kLdStage = BK + 1;
  static constexpr int kLdS = BN + 1;
  static constexpr int kLdV = DV + 1;
  static constexpr int kRM = BM / 8, kRN = BN / 16, kRV = DV / 16;
  static constexpr size_t kStageBytes =
      std::max<size_t>((BM + BN) * kLdStage, BN * kLdV) * sizeof(T);
  static constexpr size_t kMBytes = 0;  // M overwrites S in place
  // g is scaled into [1, 2) (power of two, exact): fp32/fp64 M needs no headroom,
  // but the fixed shift's a_i = g_i/Σ_i must stay finite (use_fixed_shift).
  static constexpr int kMScaleLog2 = 0;
  static_assert(kTileThreads == 128 && BM % 8 == 0 && BN % 32 == 0 && DV % 16 == 0);

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
    load_tile<BN, DV, kLdV>(reinterpret_cast<T*>(stage), x, n, d, k0, j0);
  }

  static __device__ __forceinline__ void store_m(Acc* s, unsigned char*, int r, int c, Acc v) {
    s[r * kLdS + c] = v;  // the same thread read s[r][c] just before
  }

  struct Accum {
    Acc o[kRM][kRV];

    __device__ __forceinline__ void zero() {
#pragma unroll
      for (int i = 0; i < kRM; ++i)
#pragma unroll
        for (int j = 0; j < kRV; ++j) o[i][j] = Acc(0);
    }

    // O += M V with M in s [BM][kLdS] and V in stage [BN][kLdV].
    __device__ __forceinline__ void add(const Acc* s, const unsigned char*,
                                        const unsigned char* stage) {
      const T* v = reinterpret_cast<const T*>(stage);
      const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll 4
      for (int c = 0; c < BN; ++c) {
        Acc mv[kRM], vv[kRV];
#pragma unroll
        for (int i = 0; i < kRM; ++i) mv[i] = s[(ty + 8 * i) * kLdS + c];
#pragma unroll
        for (int j = 0; j < kRV; ++j) vv[j] = v[c * kLdV + tx + 16 * j];
#pragma unroll
        for (int i = 0; i < kRM; ++i)
#pragma unroll
          for (int j = 0; j < kRV; ++j) o[i][j] = fma(mv[i], vv[j], o[i][j]);
      }
    }

    __device__ __forceinline__ void store(Acc* out, int64_t n, int64_t d, int64_t i0, int64_t j0,
                                          Acc out_scale, Acc*) const {
      const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
      for (int i = 0; i < kRM; ++i) {
        const int64_t gi = i0 + ty + 8 * i;
#pragma unroll
        for (int j = 0; j < kRV; ++j) {
          const int64_t gj = j0 + tx + 16 * j;
          if (gi < n && gj < d) out[gi * d + gj] = o[i][j] * out_scale;
        }
      }
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
  static constexpr int BM = 64, BN = 64, BK = 32, DV = 128;
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

    // O += M V with M in m [BM][kLdM] (T) and V in stage [BN][kLdV] (T).
    __device__ __forceinline__ void add(const Acc*, const unsigned char* m_raw,
                                        const unsigned char* stage) {
#if PALFAST_WMMA_OK
      const T* m = reinterpret_cast<const T*>(m_raw);
      const T* v = reinterpret_cast<const T*>(stage);
      const int warp = threadIdx.x / kWarpSize, wm = warp / 2, wn = warp % 2;
#pragma unroll
      for (int kk = 0; kk < BN; kk += 16) {
        FragA fa[2];
#pragma unroll
        for (int i = 0; i < 2; ++i)
          wmma::load_matrix_sync(fa[i], m + (wm * 32 + 16 * i) * kLdM + kk, kLdM);
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

    // Fragments have no documented element layout, so each goes through a
    // per-warp 16×16 scratch (in the then unused S buffer) for bounds checks.
    __device__ __forceinline__ void store(Acc* out, int64_t n, int64_t d, int64_t i0, int64_t j0,
                                          Acc out_scale, Acc* scratch) const {
#if PALFAST_WMMA_OK
      const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
      const int wm = warp / 2, wn = warp % 2;
      float* w = scratch + warp * 256;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          wmma::store_matrix_sync(w, o[i][j], 16, wmma::mem_row_major);
          __syncwarp();
          for (int e = lane; e < 256; e += kWarpSize) {
            const int64_t gi = i0 + wm * 32 + 16 * i + e / 16;
            const int64_t gj = j0 + wn * 64 + 16 * j + e % 16;
            if (gi < n && gj < d) out[gi * d + gj] = w[e] * out_scale;
          }
          __syncwarp();  // before the next fragment overwrites the scratch
        }
      }
#endif
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

// ------------------------------------------------------------- tile kernels
// The power-of-two scale 2^m of g is clamped to |m| ≤ kMaxScaleLog2, so that 2^m
// and 2^−m are normal floats (exact), whatever tiny or huge g is.
constexpr int kMaxScaleLog2 = 100;

// lse[i] = log Σ_{k≠i} exp(<x_i, x_k> · inv_tau) for the BM rows of this block,
// which are anchor rows a0 + blockIdx.x·BM + r (< a1), by the online (max, sum):
// the path for normalize=False and for τ below the fixed shift's bound.
template <typename Tile>
__global__ void __launch_bounds__(kTileThreads)
    lse_kernel(const typename Tile::In* __restrict__ x, int64_t n, int64_t d,
               typename Tile::Acc inv_tau, int64_t a0, int64_t a1,
               typename Tile::Acc* __restrict__ lse) {
  using Acc = typename Tile::Acc;
  using L = Smem<Tile>;
  constexpr int kRowsPerWarp = Tile::BM / kWarps;
  constexpr int kColsPerLane = Tile::BN / kWarpSize;
  __shared__ __align__(128) unsigned char smem[L::kForward];
  Acc* s = reinterpret_cast<Acc*>(smem + L::kS);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t i0 = a0 + int64_t(blockIdx.x) * Tile::BM;

  // Lane-private running (max, sum) of row warp·kRowsPerWarp + rr over the
  // columns lane + 32·cc of every tile.
  Acc run_m[kRowsPerWarp], run_s[kRowsPerWarp];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    run_m[rr] = neg_inf<Acc>();
    run_s[rr] = Acc(0);
  }

  for (int64_t k0 = 0; k0 < n; k0 += Tile::BN) {
    Tile::dots(x, n, d, i0, k0, smem, s);
    __syncthreads();  // S complete
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      const int64_t i = i0 + r;
#pragma unroll
      for (int cc = 0; cc < kColsPerLane; ++cc) {
        const int c = lane + kWarpSize * cc;
        const int64_t k = k0 + c;
        // Masked entries (k ≥ n, the diagonal) are skipped, never exp'd.
        if (k < n && k != i) lse_add(run_m[rr], run_s[rr], s[r * Tile::kLdS + c] * inv_tau);
      }
    }
    __syncthreads();  // S is read; the next tile may overwrite it
  }

#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    Acc m = run_m[rr], sum = run_s[rr];
#pragma unroll
    for (int off = kWarpSize / 2; off > 0; off >>= 1) {
      const Acc m2 = __shfl_xor_sync(kFullWarp, m, off);
      const Acc s2 = __shfl_xor_sync(kFullWarp, sum, off);
      lse_merge(m, sum, m2, s2);
    }
    const int64_t i = i0 + warp * kRowsPerWarp + rr;
    // N = 1: m = −inf, sum = 0, lse = −inf (the CPU kernel gives the same).
    if (lane == 0 && i < a1) lse[i] = m + log_acc(sum);
  }
}

// ------------------------------------------- symmetric fixed-shift forward
// s_ik = s_ki, so, as csrc/cpu/info_nce.cpp does, only tile pairs (I, K) with
// I ≤ K are computed, and each e_ik is added to the sum of row i and of row k.
// The B×B tiles (B = BM = BN) are grouped into `regions` runs of `per_region`
// consecutive tiles; block b takes the region pair (P, Q), P ≤ Q (the b-th in
// row-major order of the upper triangle), and every tile pair (I, K), I ≤ K, of
// it. Sums go to fixed slots, no atomics: the block's row sums of tile I over its
// K to row_part[Q][rows of I], its column sums to col_part[P][rows of K]
// (zero-initialised, only this block adds to them). lse_finish_kernel then adds
// each row's slots in a fixed order: the result does not depend on the schedule.
// Partial memory: 2·regions·N sums, regions ≈ √(2·kBlocksPerSm·SMs) (about 24 on
// an H200), so O(N) for a given GPU.

// The region pair (p, q), p ≤ q, of block b: b = Σ_{p' < p} (regions − p') + (q − p).
__device__ __forceinline__ void region_pair(int64_t b, int64_t regions, int64_t& p, int64_t& q) {
  p = 0;
  while (b >= regions - p) b -= regions - p++;
  q = p + b;
}

template <typename Tile>
__global__ void __launch_bounds__(kTileThreads)
    sym_lse_kernel(const typename Tile::In* __restrict__ x, int64_t n, int64_t d,
                   typename Tile::Acc inv_tau, int64_t a0, int64_t a1, int64_t per_region,
                   int64_t regions, typename Tile::Acc* __restrict__ row_part,
                   typename Tile::Acc* __restrict__ col_part) {
  using Acc = typename Tile::Acc;
  using L = Smem<Tile>;
  static_assert(Tile::BM == Tile::BN, "symmetric tiles are square");
  constexpr int B = Tile::BM;
  constexpr int kRowsPerWarp = B / kWarps;
  constexpr int kColsPerLane = B / kWarpSize;
  constexpr int kParts = kTileThreads / B;  // threads summing one column, B/kParts rows each
  static_assert(kTileThreads % B == 0 && B % kWarpSize == 0 && B % kWarps == 0);
  __shared__ __align__(128) unsigned char smem[L::kForward];
  __shared__ Acc col_tmp[kTileThreads];
  Acc* s = reinterpret_cast<Acc*>(smem + L::kS);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const Acc shift_log2 = inv_tau * Acc(kLog2e);  // e_ik = exp2(c_ik·shift_log2 − shift_log2)
  int64_t p, q;
  region_pair(blockIdx.x, regions, p, q);
  const int64_t tiles = (n + B - 1) / B;
  const int64_t i_end = std::min(tiles, (p + 1) * per_region);
  const int64_t k_end = std::min(tiles, (q + 1) * per_region);
  // A pair of two tiles without anchor rows adds nothing any anchor's lse needs.
  auto has_anchors = [&](int64_t t) { return t * B < a1 && (t + 1) * B > a0; };

  for (int64_t ti = p * per_region; ti < i_end; ++ti) {
    Acc run[kRowsPerWarp];  // lane-private sums of rows warp·kRowsPerWarp + rr
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) run[rr] = Acc(0);
    for (int64_t tk = std::max(ti, q * per_region); tk < k_end; ++tk) {
      if (!has_anchors(ti) && !has_anchors(tk)) continue;  // the same for the whole block
      Tile::dots(x, n, d, ti * B, tk * B, smem, s);
      __syncthreads();  // S complete
      // e_ik into the row sums, and in place of S for the column sums. Masked
      // entries (k ≥ n, i ≥ n, the diagonal) are 0, never exp'd.
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr) {
        const int r = warp * kRowsPerWarp + rr;
        const int64_t i = ti * B + r;
#pragma unroll
        for (int cc = 0; cc < kColsPerLane; ++cc) {
          const int c = lane + kWarpSize * cc;
          const int64_t k = tk * B + c;
          Acc e = Acc(0);
          if (i < n && k < n && k != i) {
            e = exp2_acc(fma(s[r * Tile::kLdS + c], shift_log2, -shift_log2));
          }
          run[rr] += e;
          s[r * Tile::kLdS + c] = e;  // this thread's own entry
        }
      }
      if (ti != tk) {  // a diagonal tile's columns are its rows, summed already
        __syncthreads();  // E complete
        const int c = threadIdx.x % B, part = threadIdx.x / B;
        Acc sum = Acc(0);
        constexpr int kRowsPerPart = B / kParts;
        for (int r = part * kRowsPerPart; r < (part + 1) * kRowsPerPart; ++r) {
          sum += s[r * Tile::kLdS + c];
        }
        col_tmp[threadIdx.x] = sum;
        __syncthreads();  // column parts complete
        const int64_t k = tk * B + threadIdx.x;
        if (threadIdx.x < B && k < n) {
          Acc total = Acc(0);
#pragma unroll
          for (int pp = 0; pp < kParts; ++pp) total += col_tmp[pp * B + threadIdx.x];
          col_part[p * n + k] += total;
        }
      }
      __syncthreads();  // E and column parts are read; the next tile may overwrite them
    }
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const Acc sum = warp_sum(run[rr]);
      const int64_t i = ti * B + warp * kRowsPerWarp + rr;
      if (lane == 0 && i < n) row_part[q * n + i] = sum;
    }
  }
}

// lse_i = 1/τ + ln(Σ_{q ≥ P(i)} row_part[q][i] + Σ_{p ≤ P(i)} col_part[p][i]) for the
// anchor rows i in [a0, a1), P(i) = i / rows_per_region, summed in that order. A
// row without other rows (N = 1) has the sum 0 and lse −inf, as on the CPU.
template <typename Acc>
__global__ void lse_finish_kernel(const Acc* __restrict__ row_part,
                                  const Acc* __restrict__ col_part, int64_t n,
                                  int64_t rows_per_region, int64_t regions, Acc inv_tau, int64_t a0,
                                  int64_t a1, Acc* __restrict__ lse) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = a0 + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < a1; i += stride) {
    const int64_t home = i / rows_per_region;
    Acc sum = Acc(0);
    for (int64_t q = home; q < regions; ++q) sum += row_part[q * n + i];
    for (int64_t p = 0; p <= home; ++p) sum += col_part[p * n + i];
    lse[i] = inv_tau + log_acc(sum);
  }
}

// The backward's per-row factor: g_i·2^m for the online path; for the fixed
// shift a_i = g_i·2^m·exp(1/τ − lse_i) = g_i·2^m/Σ_i, set to 0 where g_i = 0 (rows
// that are not anchors have lse = +inf, and N = 1 gives lse = −inf).
template <bool kFixed, typename Acc>
__device__ __forceinline__ Acc row_factor(Acc g_scaled, Acc lse, Acc inv_tau) {
  if constexpr (kFixed) return g_scaled == Acc(0) ? Acc(0) : g_scaled * exp_acc(inv_tau - lse);
  return g_scaled;
}

// dneg[I, J] = Σ_K M_IK x[K, J] for this block's BM rows I and DV columns J,
// M_ik = g_i exp(s_ik − lse_i) + g_k exp(s_ik − lse_k), s = x xᵀ · inv_tau
// (kFixed: M_ik = e_ik (a_i + a_k), see use_fixed_shift). g_absmax (a device
// scalar, max|g|) sets the power-of-two scale of M. With key splits (small N,
// see backward_impl), block z of the grid's third dimension sums only the key
// tiles [z·split_tiles, (z+1)·split_tiles) into the slice z of dneg [splits, N, D].
template <typename Tile, bool kFixed>
__global__ void __launch_bounds__(kTileThreads)
    grad_tile_kernel(const typename Tile::In* __restrict__ x, int64_t n, int64_t d,
                     typename Tile::Acc inv_tau, const typename Tile::Acc* __restrict__ g,
                     const typename Tile::Acc* __restrict__ lse,
                     const typename Tile::Acc* __restrict__ g_absmax, int64_t a0, int64_t a1,
                     int64_t split_tiles, typename Tile::Acc* __restrict__ dneg) {
  using Acc = typename Tile::Acc;
  using L = Smem<Tile>;
  constexpr int BM = Tile::BM, BN = Tile::BN;
  __shared__ __align__(128) unsigned char smem[L::kBackward];
  Acc* s = reinterpret_cast<Acc*>(smem + L::kS);
  unsigned char* mbuf = smem + L::kM;
  Acc* row_g = reinterpret_cast<Acc*>(smem + L::kStats);
  Acc* row_lse = row_g + BM;
  Acc* col_g = row_lse + BM;
  Acc* col_lse = col_g + BN;
  const int64_t i0 = int64_t(blockIdx.x) * BM;
  const int64_t j0 = int64_t(blockIdx.y) * Tile::DV;

  // Power-of-two scale |g|·2^m < 2^(kMScaleLog2 + 1): exact, and undone exactly
  // when the result is stored.
  Acc m_scale = Acc(1), out_scale = Acc(1);
  {
    const Acc gm = *g_absmax;
    if (gm > Acc(0) && gm < std::numeric_limits<Acc>::infinity()) {  // else g is 0, inf or NaN
      const int e = max(-kMaxScaleLog2,
                        min(kMaxScaleLog2, Tile::kMScaleLog2 - static_cast<int>(ilogb(gm))));
      m_scale = static_cast<Acc>(ldexp(1.0, e));
      out_scale = static_cast<Acc>(ldexp(1.0, -e));
    }
  }
  const Acc shift_log2 = inv_tau * Acc(kLog2e);
  for (int r = threadIdx.x; r < BM; r += kTileThreads) {
    const int64_t i = i0 + r;
    row_g[r] = i < n ? row_factor<kFixed>(g[i] * m_scale, lse[i], inv_tau) : Acc(0);
    row_lse[r] = i < n ? lse[i] : Acc(0);
  }
  // (row stats are first read after the barriers inside dots below)

  // g is 0 outside the anchors [a0, a1), so a block without anchor rows only
  // needs the key tiles that hold anchors (M_ik = g_k exp(s_ik − lse_k) there).
  const bool has_anchor_rows = i0 < a1 && i0 + BM > a0;
  const int64_t split_begin = int64_t(blockIdx.z) * split_tiles * BN;
  const int64_t split_end = std::min(n, split_begin + split_tiles * BN);
  // Both bounds are multiples of BN or N: the key tiles are those of the unsplit grid.
  const int64_t k_begin = std::max(split_begin, has_anchor_rows ? int64_t(0) : (a0 / BN) * BN);
  const int64_t k_end = std::min(split_end, has_anchor_rows ? n : a1);
  typename Tile::Accum acc;
  acc.zero();
  for (int64_t k0 = k_begin; k0 < k_end; k0 += BN) {
    Tile::dots(x, n, d, i0, k0, smem, s);  // ends with the staging buffer free
    Tile::load_v(smem, x, n, d, k0, j0);
    for (int c = threadIdx.x; c < BN; c += kTileThreads) {
      const int64_t k = k0 + c;
      col_g[c] = k < n ? row_factor<kFixed>(g[k] * m_scale, lse[k], inv_tau) : Acc(0);
      col_lse[c] = k < n ? lse[k] : Acc(0);
    }
    __syncthreads();  // S, V and column stats complete
    for (int e = threadIdx.x; e < BM * BN; e += kTileThreads) {
      const int r = e / BN, c = e % BN;
      const int64_t i = i0 + r, k = k0 + c;
      Acc mv = Acc(0);
      // Masked entries are never exp'd: with lse = −inf (N = 1) exp(s − lse)
      // would be inf and 0·inf = NaN.
      if (i < n && k < n && k != i) {
        const Acc c_ik = s[r * Tile::kLdS + c];
        if constexpr (kFixed) {
          mv = exp2_acc(fma(c_ik, shift_log2, -shift_log2)) * (row_g[r] + col_g[c]);
        } else {
          const Acc xv = c_ik * inv_tau;
          mv = row_g[r] * exp_acc(xv - row_lse[r]) + col_g[c] * exp_acc(xv - col_lse[c]);
        }
      }
      Tile::store_m(s, mbuf, r, c, mv);
    }
    __syncthreads();  // M complete
    acc.add(s, mbuf, smem);
    __syncthreads();  // M, V, S and column stats are read; the next tile may overwrite them
  }
  acc.store(dneg + int64_t(blockIdx.z) * n * d, n, d, i0, j0, out_scale, s);
}

// out[e] = Σ_s parts[s][e] for e < count, the slices added in order (deterministic).
template <typename Acc>
__global__ void sum_slices_kernel(const Acc* __restrict__ parts, int64_t slices, int64_t count,
                                  Acc* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < count; e += stride) {
    Acc sum = parts[e];
    for (int64_t sl = 1; sl < slices; ++sl) sum += parts[sl * count + e];
    out[e] = sum;
  }
}

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

// loss_i = lse_i − <u_i, q_i> · inv_tau / W_i for W_i > 0, else 0 (q = G u).
// u is the GEMM operand, so s_ij here and in lse come from the same values:
// with one positive and no other key (N = 2) the loss is 0 up to fp32 rounding.
template <typename X, typename Acc>
__global__ void loss_kernel(const X* __restrict__ u, const Acc* __restrict__ q,
                            const Acc* __restrict__ lse, const double* __restrict__ pos_weight,
                            int64_t n, int64_t d, Acc inv_tau, int64_t a0, int64_t a1,
                            Acc* __restrict__ loss) {
  for_each_row(n, [&](int64_t i, int lane) {
    Acc dot = Acc(0);
    for (int64_t k = lane; k < d; k += kWarpSize) dot += widen(u[i * d + k]) * q[i * d + k];
    dot = warp_sum(dot);
    if (lane == 0) {
      const double w = pos_weight[i];
      const bool anchor = i >= a0 && i < a1;
      loss[i] = anchor && w > 0 ? lse[i] - dot * inv_tau / static_cast<Acc>(w) : Acc(0);
    }
  });
}

// The gradient in z's dtype: a row with ‖z_i‖ ≤ kNormFloor gets dL/du_i / kNormFloor
// (as torch.nn.functional.normalize), beyond float16's range, so float16 saturates
// to ±kHalfMax (csrc/info_nce.h, grad_in_dtype) instead of becoming inf; NaN stays.
template <typename Z, typename Acc>
__device__ __forceinline__ Z narrow_grad(Acc v) {
  if constexpr (std::is_same_v<Z, __half>) {
    const Acc top = Acc(kHalfMax);
    return narrow<Z>(v > top ? top : (v < -top ? -top : v));
  }
  return narrow<Z>(v);
}

// grad_z_i from v_i = (dneg_i − c_i q_i) · inv_tau = dL/du_i, through the
// normalisation: (v − u <u, v>) / ‖z‖, or v / kNormFloor where ‖z‖ ≤ kNormFloor.
// Here u is recomputed from z in Acc (not the 16-bit operand): the projection is
// then as exact as on the CPU.
template <typename Acc, typename Z>
__global__ void grad_rows_kernel(const Acc* __restrict__ dneg, const Acc* __restrict__ q,
                                 const Acc* __restrict__ c, const Z* __restrict__ z,
                                 const Acc* __restrict__ norm, int64_t n, int64_t d, Acc inv_tau,
                                 bool normalize, Z* __restrict__ grad) {
  for_each_row(n, [&](int64_t i, int lane) {
    const int64_t base = i * d;
    const Acc ci = c[i];
    if (!normalize) {
      for (int64_t k = lane; k < d; k += kWarpSize)
        grad[base + k] = narrow_grad<Z>((dneg[base + k] - ci * q[base + k]) * inv_tau);
      return;
    }
    const Acc nrm = norm[i];
    const Acc denom = floored(nrm);
    Acc dot = Acc(0);
    for (int64_t k = lane; k < d; k += kWarpSize)
      dot += (widen(z[base + k]) / denom) * ((dneg[base + k] - ci * q[base + k]) * inv_tau);
    dot = warp_sum(dot);
    for (int64_t k = lane; k < d; k += kWarpSize) {
      const Acc v = (dneg[base + k] - ci * q[base + k]) * inv_tau;
      const Acc u = widen(z[base + k]) / denom;
      grad[base + k] = narrow_grad<Z>(nrm > Acc(kNormFloor) ? (v - u * dot) / nrm : v / Acc(kNormFloor));
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

// lse of the anchor rows [a0, a1) by the symmetric fixed-shift kernels.
template <typename Tile>
void symmetric_lse(const at::Tensor& u, int64_t n, int64_t d, typename Tile::Acc inv_tau,
                   int64_t a0, int64_t a1, at::Tensor& lse, cudaStream_t stream) {
  using Acc = typename Tile::Acc;
  const int64_t tiles = ceil_div(n, Tile::BM);
  int64_t min_regions = 1;  // the fewest regions whose pairs give every SM kBlocksPerSm blocks
  while (min_regions * (min_regions + 1) / 2 < kBlocksPerSm * sm_count()) ++min_regions;
  const int64_t per_region = std::max<int64_t>(1, tiles / min_regions);
  const int64_t regions = ceil_div(tiles, per_region);
  at::Tensor row_part = at::empty({regions, n}, lse.options());
  at::Tensor col_part = at::zeros({regions, n}, lse.options());
  launch(sym_lse_kernel<Tile>, grid_exact(kForwardOp, regions * (regions + 1) / 2), kTileThreads,
         stream, ptr<typename Tile::In>(u), n, d, inv_tau, a0, a1, per_region, regions,
         mut_ptr<Acc>(row_part), mut_ptr<Acc>(col_part));
  launch(lse_finish_kernel<Acc>, grid_stride(a1 - a0, kRowThreads), kRowThreads, stream,
         ptr<Acc>(row_part), ptr<Acc>(col_part), n, per_region * Tile::BM, regions, inv_tau, a0,
         a1, mut_ptr<Acc>(lse));
}

template <typename ZT, typename Tile>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& z, const GraphArgs& g,
                                                double temperature, bool normalize, int64_t a0,
                                                int64_t a1) {
  using In = typename Tile::In;
  using Acc = typename Tile::Acc;
  const int64_t n = z.size(0), d = z.size(1);
  const auto acc_opts = z.options().dtype(info_nce_acc_dtype(z));
  at::Tensor loss = at::empty({n}, acc_opts);
  // Rows that are not anchors keep lse = +inf: exp(s − lse) = 0 in the backward.
  at::Tensor lse = at::full({n}, std::numeric_limits<double>::infinity(), acc_opts);
  if (n == 0) return {loss, lse};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Acc inv_tau = static_cast<Acc>(1.0 / temperature);

  const at::Tensor u = prepare<ZT, Tile>(z, normalize, nullptr, stream);
  if (a1 > a0 && use_fixed_shift<Acc>(normalize, temperature)) {
    symmetric_lse<Tile>(u, n, d, inv_tau, a0, a1, lse, stream);
  } else if (a1 > a0) {
    launch(lse_kernel<Tile>, grid_exact(kForwardOp, ceil_div(a1 - a0, Tile::BM)), kTileThreads,
           stream, ptr<In>(u), n, d, inv_tau, a0, a1, mut_ptr<Acc>(lse));
  }

  // Positive term: <u_i, (G u)_i> / (τ W_i), accumulated in Acc.
  at::Tensor q = at::zeros({n, d}, acc_opts);
  graph_spmm<In, Acc>(kForwardOp, g, ptr<In>(u), nullptr, mut_ptr<Acc>(q), n, d,
                      /*transpose=*/false, stream);
  launch(loss_kernel<In, Acc>, grid_stride(n, kRowWarps), kRowThreads, stream,
         ptr<In>(u), ptr<Acc>(q), ptr<Acc>(lse), g.pos_weight.data_ptr<double>(), n, d, inv_tau,
         a0, a1, mut_ptr<Acc>(loss));
  return {loss, lse};
}

template <typename ZT, typename Tile>
at::Tensor backward_impl(const at::Tensor& grad_rows, const at::Tensor& z, const GraphArgs& g,
                         const at::Tensor& lse_in, double temperature, bool normalize, int64_t a0,
                         int64_t a1) {
  using In = typename Tile::In;
  using Acc = typename Tile::Acc;
  using Z = typename CudaType<ZT>::type;
  const int64_t n = z.size(0), d = z.size(1);
  at::Tensor grad = at::empty({n, d}, z.options());
  if (n == 0) return grad;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Acc inv_tau = static_cast<Acc>(1.0 / temperature);
  const auto acc_opts = z.options().dtype(info_nce_acc_dtype(z));

  at::Tensor norm;
  const at::Tensor u = prepare<ZT, Tile>(z, normalize, &norm, stream);
  const at::Tensor lse = lse_in.contiguous();
  // Rows without positives, and rows that are not anchors, carry no loss,
  // whatever grad_rows says; c_i = g_i / W_i.
  at::Tensor has_pos = g.pos_weight > 0;
  has_pos.narrow(0, 0, a0).fill_(false);
  has_pos.narrow(0, a1, n - a1).fill_(false);
  const at::Tensor gr = at::where(has_pos, grad_rows, at::zeros_like(grad_rows)).contiguous();
  const at::Tensor c =
      at::where(has_pos, gr / g.pos_weight.to(gr.scalar_type()), at::zeros_like(gr)).contiguous();
  // max|g| on the device (no sync), for the power-of-two scale of g and M.
  const at::Tensor g_absmax = gr.abs().amax();

  // dneg = Σ_K M_IK u_K: every element is written once by the tile kernel.
  at::Tensor dneg = at::empty({n, d}, acc_opts);
  const int64_t col_blocks = ceil_div(d, Tile::DV);
  TORCH_CHECK(col_blocks <= kMaxGridY, kBackwardOp, ": z has too many columns (", d,
              ") for one CUDA grid");
  const int64_t row_blocks = ceil_div(n, Tile::BM), key_tiles = ceil_div(n, Tile::BN);
  // Small N: split the key tiles over up to `splits` blocks per output tile, so
  // that the grid has kBlocksPerSm blocks per SM; their partial sums go to slices
  // [splits, N, D] (about kBlocksPerSm·SMs·BM·D floats in all, whatever N)
  // added in a fixed order. Large N: one slice, written straight into dneg.
  const int64_t want = ceil_div(kBlocksPerSm * sm_count(), row_blocks * col_blocks);
  const int64_t split_tiles = ceil_div(key_tiles, std::clamp<int64_t>(want, 1, key_tiles));
  const int64_t splits = ceil_div(key_tiles, split_tiles);  // ≤ kMaxGridY: want ≤ 2·SMs
  at::Tensor parts = splits == 1 ? dneg : at::empty({splits, n, d}, acc_opts);
  const dim3 grid(grid_exact(kBackwardOp, row_blocks), static_cast<unsigned int>(col_blocks),
                  static_cast<unsigned int>(splits));
  launch(use_fixed_shift<Acc>(normalize, temperature) ? grad_tile_kernel<Tile, true>
                                                     : grad_tile_kernel<Tile, false>,
         grid, kTileThreads, stream, ptr<In>(u), n, d, inv_tau, ptr<Acc>(gr), ptr<Acc>(lse),
         ptr<Acc>(g_absmax), a0, a1, split_tiles, mut_ptr<Acc>(parts));
  if (splits > 1) {
    launch(sum_slices_kernel<Acc>, grid_stride(n * d, kRowThreads), kRowThreads, stream,
           ptr<Acc>(parts), splits, n * d, mut_ptr<Acc>(dneg));
  }

  // Positive term: dneg −= Gᵀ(c ∘ u) here, − c ∘ (G u) in grad_rows_kernel.
  const at::Tensor minus_c = c.neg();
  graph_spmm<In, Acc>(kBackwardOp, g, ptr<In>(u), ptr<Acc>(minus_c), mut_ptr<Acc>(dneg), n, d,
                      /*transpose=*/true, stream);
  at::Tensor q = at::zeros({n, d}, acc_opts);
  graph_spmm<In, Acc>(kBackwardOp, g, ptr<In>(u), nullptr, mut_ptr<Acc>(q), n, d,
                      /*transpose=*/false, stream);
  const at::Tensor zc = z.contiguous();
  launch(grad_rows_kernel<Acc, Z>, grid_stride(n, kRowWarps), kRowThreads,
         stream, ptr<Acc>(dneg), ptr<Acc>(q), ptr<Acc>(c), ptr<Z>(zc), ptr<Acc>(norm), n, d,
         inv_tau, normalize, mut_ptr<Z>(grad));
  return grad;
}

using DoubleTile = SimtTile<double, 32, 32, 16, 32>;  // square: the symmetric forward
using FloatTile = SimtTile<float, 64, 64, 16, 64>;
using HalfTile = WmmaTile<__half>;
using BFloat16Tile = WmmaTile<__nv_bfloat16>;

// The kernels behind the entry points of csrc/info_nce.h (which check the arguments).
std::tuple<at::Tensor, at::Tensor> info_nce_cuda(const at::Tensor& z, const GraphArgs& g,
                                                 double temperature, bool normalize, int64_t a0,
                                                 int64_t a1) {
  const c10::cuda::CUDAGuard guard(z.device());
  check_tensor_cores(z);
  switch (z.scalar_type()) {
    case at::kDouble: return forward_impl<double, DoubleTile>(z, g, temperature, normalize, a0, a1);
    case at::kFloat: return forward_impl<float, FloatTile>(z, g, temperature, normalize, a0, a1);
    case at::kHalf: return forward_impl<at::Half, HalfTile>(z, g, temperature, normalize, a0, a1);
    default: return forward_impl<at::BFloat16, BFloat16Tile>(z, g, temperature, normalize, a0, a1);
  }
}

at::Tensor info_nce_backward_cuda(const at::Tensor& grad_rows, const at::Tensor& z,
                                  const GraphArgs& g, const at::Tensor& lse, double temperature,
                                  bool normalize, int64_t a0, int64_t a1) {
  const c10::cuda::CUDAGuard guard(z.device());
  check_tensor_cores(z);
  switch (z.scalar_type()) {
    case at::kDouble:
      return backward_impl<double, DoubleTile>(grad_rows, z, g, lse, temperature, normalize, a0, a1);
    case at::kFloat:
      return backward_impl<float, FloatTile>(grad_rows, z, g, lse, temperature, normalize, a0, a1);
    case at::kHalf:
      return backward_impl<at::Half, HalfTile>(grad_rows, z, g, lse, temperature, normalize, a0, a1);
    default:
      return backward_impl<at::BFloat16, BFloat16Tile>(grad_rows, z, g, lse, temperature,
                                                        normalize, a0, a1);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(palfast, CUDA, m) {
  m.impl("info_nce", &info_nce_entry<&info_nce_cuda>);
  m.impl("info_nce_backward", &info_nce_backward_entry<&info_nce_backward_cuda>);
}

}  // namespace palfast::cuda
