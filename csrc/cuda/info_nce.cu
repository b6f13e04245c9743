// palfast::info_nce on CUDA: flash-style tiles, never an N×N matrix.
//
// Same semantics as csrc/cpu/info_nce.cpp (the model): u = z / max(‖z‖, 1e-12)
// (or u = z), s_ik = <u_i, u_k>/τ, lse_i = log Σ_{k≠i} exp(s_ik),
// loss_i = lse_i − <u_i, (G u)_i>/(τ W_i) for W_i > 0 else 0, for anchor rows
// i in [a0, a1) (all rows in one process, a rank's own rows under
// torch.distributed); other rows get loss 0 and lse +inf. Outputs are
// float32 (float64 for float64 z); only lse is saved for backward.
//
// Forward (lse_kernel): one block owns BM query rows and walks over all key
// tiles of BN rows. For each tile it computes S = U_I U_Kᵀ over D in chunks of
// BK (partial tiles zero-padded in shared memory), stores S in shared memory,
// and folds it into a running (max, sum) per row. Each lane keeps its own
// running pair per row (no shuffles per tile); lanes are merged once at the end.
//
// Backward (grad_tile_kernel): one block owns BM rows and DV columns of
//   dneg_I = Σ_K M_IK U_K,   M_ik = g_i exp(s_ik − lse_i) + g_k exp(s_ik − lse_k),
// with the diagonal and rows/columns ≥ N masked (their exp is never evaluated,
// so lse = −inf for N = 1 gives no NaN). S is recomputed exactly as in the
// forward (same code, same chunk order), so exp(s_ik − lse_i) ≤ 1. The block
// writes its slice of dneg once: no atomics on the gradient. For D > DV the
// grid has ceil(D/DV) column blocks, each recomputing S (cost × ceil(D/DV) on
// the first GEMM; DV = 128 for the 16-bit path covers the common D ≤ 128).
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
//   float64: SIMT fp64; BM = 32, BN = 64, BK = 16, DV = 32 (fits 48 KiB of smem).
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

constexpr int kThreads = 128;  // tile kernels: 4 warps
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kRowWarps = 8;  // row kernels: one warp per row, 8 rows per block
constexpr int kRowThreads = kRowWarps * kWarpSize;
constexpr const char* kForwardOp = "palfast.info_nce";
constexpr const char* kBackwardOp = "palfast.info_nce_backward";

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
      for (int e = threadIdx.x; e < R * kPerRow; e += kThreads) {
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
  for (int e = threadIdx.x; e < R * C; e += kThreads) {
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
  static constexpr int kMScaleLog2 = 0;  // no scaling needed in fp32/fp64
  static_assert(kThreads == 128 && BM % 8 == 0 && BN % 32 == 0 && DV % 16 == 0);

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
  static_assert(kThreads == 128, "2×2 warps");

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
// lse[i] = log Σ_{k≠i} exp(<x_i, x_k> · inv_tau) for the BM rows of this block,
// which are anchor rows a0 + blockIdx.x·BM + r (< a1).
template <typename Tile>
__global__ void __launch_bounds__(kThreads)
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

// dneg[I, J] = Σ_K M_IK x[K, J] for this block's BM rows I and DV columns J,
// M_ik = g_i exp(s_ik − lse_i) + g_k exp(s_ik − lse_k), s = x xᵀ · inv_tau.
// g_absmax (device scalar, or nullptr) sets the power-of-two scale of M.
template <typename Tile>
__global__ void __launch_bounds__(kThreads)
    grad_tile_kernel(const typename Tile::In* __restrict__ x, int64_t n, int64_t d,
                     typename Tile::Acc inv_tau, const typename Tile::Acc* __restrict__ g,
                     const typename Tile::Acc* __restrict__ lse,
                     const typename Tile::Acc* __restrict__ g_absmax, int64_t a0, int64_t a1,
                     typename Tile::Acc* __restrict__ dneg) {
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

  // Power-of-two scale: exact, and undone exactly when the result is stored.
  Acc m_scale = Acc(1), out_scale = Acc(1);
  if constexpr (Tile::kMScaleLog2 != 0) {
    const Acc gm = g_absmax != nullptr ? *g_absmax : Acc(0);
    if (gm > Acc(0) && gm < std::numeric_limits<Acc>::infinity()) {  // else g is 0, inf or NaN
      const int e = max(-100, min(100, Tile::kMScaleLog2 - static_cast<int>(ilogb(gm))));
      m_scale = static_cast<Acc>(ldexp(1.0, e));
      out_scale = static_cast<Acc>(ldexp(1.0, -e));
    }
  }
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    const int64_t i = i0 + r;
    row_g[r] = i < n ? g[i] * m_scale : Acc(0);
    row_lse[r] = i < n ? lse[i] : Acc(0);
  }
  // (row stats are first read after the barriers inside dots below)

  // g is 0 outside the anchors [a0, a1), so a block without anchor rows only
  // needs the key tiles that hold anchors (M_ik = g_k exp(s_ik − lse_k) there).
  const bool has_anchor_rows = i0 < a1 && i0 + BM > a0;
  const int64_t k_begin = has_anchor_rows ? 0 : (a0 / BN) * BN;
  const int64_t k_end = has_anchor_rows ? n : a1;
  typename Tile::Accum acc;
  acc.zero();
  for (int64_t k0 = k_begin; k0 < k_end; k0 += BN) {
    Tile::dots(x, n, d, i0, k0, smem, s);  // ends with the staging buffer free
    Tile::load_v(smem, x, n, d, k0, j0);
    for (int c = threadIdx.x; c < BN; c += kThreads) {
      const int64_t k = k0 + c;
      col_g[c] = k < n ? g[k] * m_scale : Acc(0);
      col_lse[c] = k < n ? lse[k] : Acc(0);
    }
    __syncthreads();  // S, V and column stats complete
    for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
      const int r = e / BN, c = e % BN;
      const int64_t i = i0 + r, k = k0 + c;
      Acc mv = Acc(0);
      // Masked entries are never exp'd: with lse = −inf (N = 1) exp(s − lse)
      // would be inf and 0·inf = NaN.
      if (i < n && k < n && k != i) {
        const Acc xv = s[r * Tile::kLdS + c] * inv_tau;
        mv = row_g[r] * exp_acc(xv - row_lse[r]) + col_g[c] * exp_acc(xv - col_lse[c]);
      }
      Tile::store_m(s, mbuf, r, c, mv);
    }
    __syncthreads();  // M complete
    acc.add(s, mbuf, smem);
    __syncthreads();  // M, V, S and column stats are read; the next tile may overwrite them
  }
  acc.store(dneg, n, d, i0, j0, out_scale, s);
}

// -------------------------------------------------------------- row kernels
// The GEMM operand u = z / max(‖z‖, 1e-12) (or z) in type Op, and ‖z‖ in Acc
// when norm != nullptr. One warp per row.
template <typename Z, typename Op, typename Acc>
__global__ void prep_kernel(const Z* __restrict__ z, int64_t n, int64_t d, bool normalize,
                            Op* __restrict__ op, Acc* __restrict__ norm) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t i = int64_t(blockIdx.x) * kRowWarps + threadIdx.x / kWarpSize;
  if (i >= n) return;  // whole warp: no shuffle below is left half-done
  const Z* zi = z + i * d;
  Acc ss = Acc(0);
  for (int64_t k = lane; k < d; k += kWarpSize) {
    const Acc v = widen(zi[k]);
    ss += v * v;
  }
  const Acc nrm = sqrt(warp_sum(ss));
  if (norm != nullptr && lane == 0) norm[i] = nrm;
  // Like clamp_min: a NaN norm stays NaN (and so does the row).
  const Acc eps = Acc(1e-12);
  const Acc denom = normalize ? (nrm < eps ? eps : nrm) : Acc(1);
  for (int64_t k = lane; k < d; k += kWarpSize) {
    const Acc v = normalize ? widen(zi[k]) / denom : widen(zi[k]);
    op[i * d + k] = narrow<Op>(v);
  }
}

// loss_i = lse_i − <u_i, q_i> · inv_tau / W_i for W_i > 0, else 0 (q = G u).
// u is the GEMM operand, so s_ij here and in lse come from the same values:
// with one positive and no other key (N = 2) the loss is 0 up to fp32 rounding.
template <typename X, typename Acc>
__global__ void loss_kernel(const X* __restrict__ u, const Acc* __restrict__ q,
                            const Acc* __restrict__ lse, const double* __restrict__ pos_weight,
                            int64_t n, int64_t d, Acc inv_tau, int64_t a0, int64_t a1,
                            Acc* __restrict__ loss) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t i = int64_t(blockIdx.x) * kRowWarps + threadIdx.x / kWarpSize;
  if (i >= n) return;
  Acc dot = Acc(0);
  for (int64_t k = lane; k < d; k += kWarpSize) dot += widen(u[i * d + k]) * q[i * d + k];
  dot = warp_sum(dot);
  if (lane == 0) {
    const double w = pos_weight[i];
    const bool anchor = i >= a0 && i < a1;
    loss[i] = anchor && w > 0 ? lse[i] - dot * inv_tau / static_cast<Acc>(w) : Acc(0);
  }
}

// grad_z_i from v_i = (dneg_i − c_i q_i) · inv_tau = dL/du_i, through the
// normalisation: (v − u <u, v>) / ‖z‖, or v / 1e-12 where ‖z‖ ≤ 1e-12. Here u
// is recomputed from z in Acc (not the 16-bit operand): the projection is
// then as exact as on the CPU.
template <typename Acc, typename Z>
__global__ void grad_rows_kernel(const Acc* __restrict__ dneg, const Acc* __restrict__ q,
                                 const Acc* __restrict__ c, const Z* __restrict__ z,
                                 const Acc* __restrict__ norm, int64_t n, int64_t d, Acc inv_tau,
                                 bool normalize, Z* __restrict__ grad) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t i = int64_t(blockIdx.x) * kRowWarps + threadIdx.x / kWarpSize;
  if (i >= n) return;
  const int64_t base = i * d;
  const Acc ci = c[i];
  if (!normalize) {
    for (int64_t k = lane; k < d; k += kWarpSize)
      grad[base + k] = narrow<Z>((dneg[base + k] - ci * q[base + k]) * inv_tau);
    return;
  }
  const Acc nrm = norm[i];
  const Acc eps = Acc(1e-12);
  const Acc denom = nrm < eps ? eps : nrm;
  Acc dot = Acc(0);
  for (int64_t k = lane; k < d; k += kWarpSize)
    dot += (widen(z[base + k]) / denom) * ((dneg[base + k] - ci * q[base + k]) * inv_tau);
  dot = warp_sum(dot);
  for (int64_t k = lane; k < d; k += kWarpSize) {
    const Acc v = (dneg[base + k] - ci * q[base + k]) * inv_tau;
    const Acc u = widen(z[base + k]) / denom;
    grad[base + k] = narrow<Z>(nrm > eps ? (v - u * dot) / nrm : v / eps);
  }
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
  launch(prep_kernel<Z, In, Acc>, grid_exact(kForwardOp, ceil_div(n, kRowWarps)), kRowThreads,
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
  if (a1 > a0) {
    launch(lse_kernel<Tile>, grid_exact(kForwardOp, ceil_div(a1 - a0, Tile::BM)), kThreads, stream,
           ptr<In>(u), n, d, inv_tau, a0, a1, mut_ptr<Acc>(lse));
  }

  // Positive term: <u_i, (G u)_i> / (τ W_i), accumulated in Acc.
  at::Tensor q = at::zeros({n, d}, acc_opts);
  graph_spmm<In, Acc>(kForwardOp, g, ptr<In>(u), nullptr, mut_ptr<Acc>(q), n, d,
                      /*transpose=*/false, stream);
  launch(loss_kernel<In, Acc>, grid_exact(kForwardOp, ceil_div(n, kRowWarps)), kRowThreads, stream,
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
  // max|g| on the device (no sync), for the scale of M in the 16-bit path.
  const at::Tensor g_absmax = Tile::kMScaleLog2 != 0 ? gr.abs().amax() : at::Tensor();

  // dneg = Σ_K M_IK u_K: every element is written once by the tile kernel.
  at::Tensor dneg = at::empty({n, d}, acc_opts);
  const int64_t col_blocks = ceil_div(d, Tile::DV);
  constexpr int64_t kMaxGridY = 65535;
  TORCH_CHECK(col_blocks <= kMaxGridY, kBackwardOp, ": z has too many columns (", d,
              ") for one CUDA grid");
  const dim3 grid(grid_exact(kBackwardOp, ceil_div(n, Tile::BM)),
                  static_cast<unsigned int>(col_blocks));
  launch(grad_tile_kernel<Tile>, grid, kThreads, stream, ptr<In>(u), n, d, inv_tau, ptr<Acc>(gr),
         ptr<Acc>(lse), g_absmax.defined() ? ptr<Acc>(g_absmax) : nullptr, a0, a1,
         mut_ptr<Acc>(dneg));

  // Positive term: dneg −= Gᵀ(c ∘ u) here, − c ∘ (G u) in grad_rows_kernel.
  const at::Tensor minus_c = c.neg();
  graph_spmm<In, Acc>(kBackwardOp, g, ptr<In>(u), ptr<Acc>(minus_c), mut_ptr<Acc>(dneg), n, d,
                      /*transpose=*/true, stream);
  at::Tensor q = at::zeros({n, d}, acc_opts);
  graph_spmm<In, Acc>(kBackwardOp, g, ptr<In>(u), nullptr, mut_ptr<Acc>(q), n, d,
                      /*transpose=*/false, stream);
  const at::Tensor zc = z.contiguous();
  launch(grad_rows_kernel<Acc, Z>, grid_exact(kBackwardOp, ceil_div(n, kRowWarps)), kRowThreads,
         stream, ptr<Acc>(dneg), ptr<Acc>(q), ptr<Acc>(c), ptr<Z>(zc), ptr<Acc>(norm), n, d,
         inv_tau, normalize, mut_ptr<Z>(grad));
  return grad;
}

using DoubleTile = SimtTile<double, 32, 64, 16, 32>;
using FloatTile = SimtTile<float, 64, 64, 16, 64>;
using HalfTile = WmmaTile<__half>;
using BFloat16Tile = WmmaTile<__nv_bfloat16>;

std::tuple<at::Tensor, at::Tensor> info_nce_cuda(
    const at::Tensor& z, const at::Tensor& indptr, const at::Tensor& indices,
    const at::Tensor& weights, const at::Tensor& t_indptr, const at::Tensor& t_indices,
    const at::Tensor& t_weights, const at::Tensor& labels, at::ArrayRef<double> label_weights,
    at::ArrayRef<int64_t> label_classes, const at::Tensor& pos_weight, double temperature,
    bool normalize, int64_t a0, int64_t a1) {
  const GraphArgs g = make_graph_args(indptr, indices, weights, t_indptr, t_indices, t_weights,
                                      labels, label_weights, label_classes, pos_weight);
  check_info_nce(kForwardOp, z, g, temperature, a0, a1);
  const c10::cuda::CUDAGuard guard(z.device());
  check_tensor_cores(z);
  switch (z.scalar_type()) {
    case at::kDouble: return forward_impl<double, DoubleTile>(z, g, temperature, normalize, a0, a1);
    case at::kFloat: return forward_impl<float, FloatTile>(z, g, temperature, normalize, a0, a1);
    case at::kHalf: return forward_impl<at::Half, HalfTile>(z, g, temperature, normalize, a0, a1);
    default: return forward_impl<at::BFloat16, BFloat16Tile>(z, g, temperature, normalize, a0, a1);
  }
}

at::Tensor info_nce_backward_cuda(
    const at::Tensor& grad_rows, const at::Tensor& z, const at::Tensor& indptr,
    const at::Tensor& indices, const at::Tensor& weights, const at::Tensor& t_indptr,
    const at::Tensor& t_indices, const at::Tensor& t_weights, const at::Tensor& labels,
    at::ArrayRef<double> label_weights, at::ArrayRef<int64_t> label_classes,
    const at::Tensor& pos_weight, const at::Tensor& lse, double temperature, bool normalize,
    int64_t a0, int64_t a1) {
  const GraphArgs g = make_graph_args(indptr, indices, weights, t_indptr, t_indices, t_weights,
                                      labels, label_weights, label_classes, pos_weight);
  check_info_nce_backward(kBackwardOp, grad_rows, z, g, lse, temperature, a0, a1);
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
  m.impl("info_nce", &info_nce_cuda);
  m.impl("info_nce_backward", &info_nce_backward_cuda);
}

}  // namespace palfast::cuda
