// palfast::info_nce_backward on CUDA: dneg = M u by the tile kernel, the positive
// term and the normalisation backward. The design, the tile policies and the
// kernels shared with the forward are in csrc/cuda/info_nce/info_nce.cuh.
#include <cstdlib>
#include <string>

#include "info_nce.cuh"
#include "info_nce_fa2.cuh"

namespace palfast::cuda {
namespace {

// ------------------------------------------------------------- tile kernels
// The power-of-two scale 2^m of g is clamped to |m| ≤ kMaxScaleLog2, so that 2^m
// and 2^−m are normal floats (exact), whatever tiny or huge g is.
constexpr int kMaxScaleLog2 = 100;

// The backward's per-row factor: g_i·2^m for the online path; for the fixed
// shift a_i = g_i·2^m·exp(1/τ − lse_i) = g_i·2^m/Σ_i, set to 0 where g_i = 0 (rows
// that are not anchors have lse = +inf, and N = 1 gives lse = −inf).
template <bool kFixed, typename Acc>
__device__ __forceinline__ Acc row_factor(Acc g_scaled, Acc lse, Acc inv_tau) {
  if constexpr (kFixed) return g_scaled == Acc(0) ? Acc(0) : g_scaled * exp_acc(inv_tau - lse);
  return g_scaled;
}

// The power-of-two scale 2^m of g with |g|·2^m < 2^(Tile::kMScaleLog2 + 1), from
// g_absmax = max|g| (a device scalar), and its inverse 2^−m that undoes it exactly
// when the gradient is stored. g all 0, inf or NaN: no scale.
template <typename Tile>
__device__ __forceinline__ void g_scales(typename Tile::Acc g_absmax, typename Tile::Acc& m_scale,
                                         typename Tile::Acc& out_scale) {
  using Acc = typename Tile::Acc;
  m_scale = Acc(1);
  out_scale = Acc(1);
  if (g_absmax > Acc(0) && g_absmax < std::numeric_limits<Acc>::infinity()) {
    const int e = max(-kMaxScaleLog2,
                      min(kMaxScaleLog2, Tile::kMScaleLog2 - static_cast<int>(ilogb(g_absmax))));
    m_scale = static_cast<Acc>(ldexp(1.0, e));
    out_scale = static_cast<Acc>(ldexp(1.0, -e));
  }
}

// The backward tile kernels' shared memory (Smem's layout): S (M in place for the
// fp32/fp64 tiles, SimtTile and Tf32Tile), M in the input type (WMMA tiles), and
// the row and column factors.
template <typename Tile>
struct GradSmem {
  using Acc = typename Tile::Acc;
  Acc* s;
  unsigned char* mbuf;
  Acc *row_g, *row_lse, *col_g, *col_lse;
  __device__ __forceinline__ explicit GradSmem(unsigned char* smem)
      : s(reinterpret_cast<Acc*>(smem + Smem<Tile>::kS)),
        mbuf(smem + Smem<Tile>::kM),
        row_g(reinterpret_cast<Acc*>(smem + Smem<Tile>::kStats)),
        row_lse(row_g + Tile::BM),
        col_g(row_lse + Tile::BM),
        col_lse(col_g + Tile::BN) {}
};

// M_rc of the tile (rows i0 + r, columns k0 + c) from S in s, the row factors
// row_g/row_lse and the column factors col_g/col_lse (see grad_tile_kernel),
// stored by Tile::store_m; all threads, after a barrier that completes S and
// the factors. Masked entries are 0 and never exp'd: with lse = −inf (N = 1)
// exp(s − lse) would be inf and 0·inf = NaN.
template <typename Tile, bool kFixed>
__device__ __forceinline__ void tile_m(typename Tile::Acc* s, unsigned char* mbuf, int64_t n,
                                       int64_t i0, int64_t k0, typename Tile::Acc inv_tau,
                                       const typename Tile::Acc* row_g,
                                       const typename Tile::Acc* row_lse,
                                       const typename Tile::Acc* col_g,
                                       const typename Tile::Acc* col_lse) {
  using Acc = typename Tile::Acc;
  constexpr int BM = Tile::BM, BN = Tile::BN;
  const Acc shift_log2 = inv_tau * Acc(kLog2e);
  for (int e = threadIdx.x; e < BM * BN; e += kTileThreads) {
    const int r = e / BN, c = e % BN;
    const int64_t i = i0 + r, k = k0 + c;
    Acc mv = Acc(0);
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
}

// The inputs of the backward tile kernels: x = u [n, d], 1/τ, g (grad_rows, 0
// outside the anchors [a0, a1)), lse, and max|g| (a device scalar).
template <typename Tile>
struct TileArgs {
  const typename Tile::In* x;
  int64_t n, d;
  typename Tile::Acc inv_tau;
  const typename Tile::Acc* g;
  const typename Tile::Acc* lse;
  const typename Tile::Acc* g_absmax;
  int64_t a0, a1;
};

// factor[r] = row_factor of row i0 + r (0 for rows ≥ n) for r < R, with g scaled
// by m_scale, and lse_out[r] = lse of that row unless lse_out is null; all threads.
template <bool kFixed, int R, typename Tile>
__device__ __forceinline__ void load_factors(const TileArgs<Tile>& p, typename Tile::Acc m_scale,
                                             int64_t i0, typename Tile::Acc* factor,
                                             typename Tile::Acc* lse_out) {
  using Acc = typename Tile::Acc;
  for (int r = threadIdx.x; r < R; r += kTileThreads) {
    const int64_t i = i0 + r;
    factor[r] = i < p.n ? row_factor<kFixed>(p.g[i] * m_scale, p.lse[i], p.inv_tau) : Acc(0);
    if (lse_out != nullptr) lse_out[r] = i < p.n ? p.lse[i] : Acc(0);
  }
}

// dneg[I, J] = Σ_K M_IK x[K, J] for this block's BM rows I and DV columns J,
// M_ik = g_i exp(s_ik − lse_i) + g_k exp(s_ik − lse_k), s = x xᵀ · inv_tau
// (kFixed: M_ik = e_ik (a_i + a_k), see use_fixed_shift). g_absmax (a device
// scalar, max|g|) sets the power-of-two scale of M. With key splits (small N,
// see backward_impl), block z of the grid's third dimension sums only the key
// tiles [z·split_tiles, (z+1)·split_tiles) into the slice z of dneg [splits, N, D].
// Every output element is written once, in a fixed order: deterministic.
template <typename Tile, bool kFixed>
__global__ void __launch_bounds__(kTileThreads)
    grad_tile_kernel(const TileArgs<Tile> p, int64_t split_tiles,
                     typename Tile::Acc* __restrict__ dneg) {
  using Acc = typename Tile::Acc;
  const int64_t n = p.n, d = p.d;
  constexpr int BM = Tile::BM, BN = Tile::BN;
  __shared__ __align__(128) unsigned char smem[Smem<Tile>::kBackward];
  const GradSmem<Tile> sm(smem);
  Acc *s = sm.s, *row_g = sm.row_g, *row_lse = sm.row_lse, *col_g = sm.col_g, *col_lse = sm.col_lse;
  unsigned char* mbuf = sm.mbuf;
  const int64_t i0 = int64_t(blockIdx.x) * BM;
  const int64_t j0 = int64_t(blockIdx.y) * Tile::DV;

  Acc m_scale, out_scale;
  g_scales<Tile>(*p.g_absmax, m_scale, out_scale);
  load_factors<kFixed, BM>(p, m_scale, i0, row_g, row_lse);
  // (row stats are first read after the barriers inside dots below)

  // g is 0 outside the anchors [a0, a1), so a block without anchor rows only
  // needs the key tiles that hold anchors (M_ik = g_k exp(s_ik − lse_k) there).
  const bool has_anchor_rows = i0 < p.a1 && i0 + BM > p.a0;
  const int64_t split_begin = int64_t(blockIdx.z) * split_tiles * BN;
  const int64_t split_end = std::min(n, split_begin + split_tiles * BN);
  // Both bounds are multiples of BN or N: the key tiles are those of the unsplit grid.
  const int64_t k_begin = std::max(split_begin, has_anchor_rows ? int64_t(0) : (p.a0 / BN) * BN);
  const int64_t k_end = std::min(split_end, has_anchor_rows ? n : p.a1);
  typename Tile::Accum acc;
  acc.zero();
  for (int64_t k0 = k_begin; k0 < k_end; k0 += BN) {
    Tile::dots(p.x, n, d, i0, k0, smem, s);  // ends with the staging buffer free
    Tile::load_v(smem, p.x, n, d, k0, j0);   // the first chunk of V
    load_factors<kFixed, BN>(p, m_scale, k0, col_g, col_lse);
    __syncthreads();  // S, V and column stats complete
    tile_m<Tile, kFixed>(s, mbuf, n, i0, k0, p.inv_tau, row_g, row_lse, col_g, col_lse);
    __syncthreads();  // M complete
    for_each_chunk<Tile::kChunks>([&](auto chunk) {
      constexpr int kC = decltype(chunk)::value;
      if constexpr (kC > 0) {
        if (j0 + kC * Tile::DVS >= d) return;  // the same in every thread
        __syncthreads();  // the previous chunk of V is read
        Tile::load_v(smem, p.x, n, d, k0, j0 + kC * Tile::DVS);
        __syncthreads();
      }
      acc.template add<kC>(s, mbuf, smem);
    });
    __syncthreads();  // M, V, S and column stats are read; the next tile may overwrite them
  }
  acc.template store<false>(dneg + int64_t(blockIdx.z) * n * d, n, d, i0, j0, out_scale, s);
}

// ------------------------------------------------ symmetric fixed-shift backward
// M_ik = e_ik (a_i + a_k) is symmetric, so, as the symmetric forward, only tile
// pairs (I, K) with I ≤ K are computed: M_IK U_K goes to rows I (the row side) and
// M_IKᵀ U_I to rows K (the column side); a diagonal pair (I = K) gives its rows
// M_KK U_K once, by the column side. Tensor FLOPs 3N²D instead of 4N²D, exps N²/2
// instead of N².
//
// Work item b (grid x) is a key tile K, largest K first, and a run of at most
// chunk_tiles row tiles I = i_hi, i_hi − 1, ..., i_lo ≤ K (FlashAttention-2's dK/dV
// order): the column side of K is summed in registers over the run and added to
// dneg once; the row side of each pair is added to dneg right away. Both by float
// atomicAdd into a zeroed dneg: the order of the adds varies from run to run, so
// this kernel runs only while torch's deterministic mode is off (backward_impl).
// Walking I downwards from K, blocks that start together add to different rows
// (block K to rows K − t at step t), which keeps atomics on one address rare.
__device__ __forceinline__ void sym_work_item(int64_t b, int64_t tiles, int64_t chunk_tiles,
                                              int64_t& tk, int64_t& i_hi, int64_t& i_lo) {
  tk = tiles - 1;
  for (;;) {
    const int64_t runs = (tk + chunk_tiles) / chunk_tiles;  // ceil((tk + 1) / chunk_tiles)
    if (b < runs) break;
    b -= runs;
    --tk;
  }
  i_hi = tk - b * chunk_tiles;
  i_lo = std::max<int64_t>(0, i_hi - chunk_tiles + 1);
}

template <typename Tile>
__global__ void __launch_bounds__(kTileThreads)
    sym_grad_kernel(const TileArgs<Tile> p, int64_t chunk_tiles,
                    typename Tile::Acc* __restrict__ dneg) {
  using Acc = typename Tile::Acc;
  const int64_t n = p.n, d = p.d;
  static_assert(Tile::BM == Tile::BN, "symmetric tiles are square");
  constexpr int B = Tile::BM;
  __shared__ __align__(128) unsigned char smem[Smem<Tile>::kBackward];
  const GradSmem<Tile> sm(smem);  // (row_lse and col_lse: unused on the fixed-shift path)
  Acc *s = sm.s, *row_g = sm.row_g, *col_g = sm.col_g;
  unsigned char* mbuf = sm.mbuf;
  int64_t tk, i_hi, i_lo;
  sym_work_item(blockIdx.x, (n + B - 1) / B, chunk_tiles, tk, i_hi, i_lo);
  const int64_t k0 = tk * B;
  const int64_t j0 = int64_t(blockIdx.y) * Tile::DV;

  Acc m_scale, out_scale;
  g_scales<Tile>(*p.g_absmax, m_scale, out_scale);
  load_factors<true, B>(p, m_scale, k0, col_g, nullptr);
  // A pair of two tiles without anchor rows has M = 0 (a_i = 0 outside [a0, a1)).
  auto has_anchors = [&](int64_t t) { return t * B < p.a1 && (t + 1) * B > p.a0; };
  typename Tile::Accum acc;
  acc.zero();
  for (int64_t ti = i_hi; ti >= i_lo; --ti) {
    if (!has_anchors(ti) && !has_anchors(tk)) continue;  // the same for the whole block
    const int64_t i0 = ti * B;
    load_factors<true, B>(p, m_scale, i0, row_g, nullptr);
    Tile::dots(p.x, n, d, i0, k0, smem, s);  // ends with the staging buffer free
    Tile::load_v(smem, p.x, n, d, i0, j0);   // U_I, the first chunk
    __syncthreads();  // S, U_I and the factors complete
    tile_m<Tile, true>(s, mbuf, n, i0, k0, p.inv_tau, row_g, sm.row_lse, col_g, sm.col_lse);
    __syncthreads();  // M complete
    for_each_chunk<Tile::kChunks>([&](auto chunk) {
      constexpr int kC = decltype(chunk)::value;
      const int64_t jc = j0 + kC * Tile::DVS;
      if constexpr (kC > 0) {
        if (jc >= d) return;  // the same in every thread
        __syncthreads();  // the previous chunk is read
        Tile::load_v(smem, p.x, n, d, i0, jc);
        __syncthreads();
      }
      acc.template add_t<kC>(s, mbuf, smem);  // column side: rows K += M_IKᵀ U_I
      if (ti != tk) {                         // row side: rows I += M_IK U_K
        __syncthreads();                      // U_I is read
        Tile::load_v(smem, p.x, n, d, k0, jc);
        __syncthreads();
        Tile::add_atomic(s, mbuf, smem, dneg, n, d, i0, jc, out_scale, s);
      }
    });
    __syncthreads();  // M, V and the row factors are read; the next pair may overwrite them
  }
  acc.template store<true>(dneg, n, d, k0, j0, out_scale, s);
}

// ------------------------- symmetric fixed-shift backward, FA2-style (16-bit)
// The work items, walk order and atomics of sym_grad_kernel, with the tile
// products in registers as in FlashAttention-2's backward (its dK/dV loop): the
// block's key tile U_K (64 rows) is copied once into shared memory and each warp
// keeps the ldmatrix A fragments of its 16 key rows; row tiles U_I of 32 rows
// (half a key tile) stream through two shared buffers by cp.async, I from the
// top of the run down, the next one copied while the current one is used. Per
// pair, warp w computes its 16 rows of Sᵀ = U_K U_Iᵀ (16 × 32) by mma.sync, turns
// it into M_KI = e (a_k + a_i) (scaled by 2^m, as WmmaTile's M) in place, and
//  * the column side, rows K += M_KI U_I, by mma.sync with the accumulators
//    rounded to 16 bits as the A operand (no shared memory) and U_I as B
//    (ldmatrix .trans of the row-major tile); summed in registers over the walk
//    (16 × 128 fp32 a warp) and added to dneg once;
//  * the row side, rows I += M_IK U_K, needs M transposed across the warps: each
//    warp stores its 16-bit M_KI rows into a shared [64][32] buffer, and after a
//    barrier warp w multiplies I rows 16(w % 2).. by D columns 64(w / 2).. with
//    A = M_IK by ldmatrix .trans of that buffer and B = U_K by ldmatrix .trans
//    of the key tile; added to dneg right away, two columns a request
//    (red_add_v2) where D is even.
// 32-row I tiles keep the three tiles (17 + 2·8.5 KiB at D ≤ 128) and the M buffer
// (5 KiB) inside the 48 KiB of static shared memory. The row side adds one
// value per I row, D column and key tile, N²D/(2·64) in all whatever the I
// tile's height: as many as sym_grad_kernel's, in half the requests where D is
// even. Counts and predicted times: csrc/cuda/info_nce/info_nce.md.
template <typename T>
struct Fa2Backward {
  using F = Fa2Forward<T>;
  static constexpr int kK = WmmaTile<T>::BM;  // key tile: sym_work_item's tiles, 4 warps × 16 rows
  static constexpr int kI = kK / 2;           // streamed row tile (half a key tile)
  static constexpr int kHalves = kK / kI;
  static constexpr int kThreads = F::kThreads;
  static constexpr int kINTiles = kI / 8;              // n8 tiles of a warp's Sᵀ
  static constexpr int kDNTiles = F::kMaxD / 8;        // n8 tiles of the column side's D
  static constexpr int kRowWarpRows = 16;              // row side: I rows a warp
  static constexpr int kRowWarpCols = F::kMaxD / 2;    // row side: D columns a warp
  // M staging stride: 80 bytes, 5 × 16, so the 8 rows of an ldmatrix hit 8
  // distinct 16-byte bank groups (5r mod 8 is a permutation).
  static constexpr int kLdM = kI + 8;
  static_assert(kThreads == kTileThreads && kI % 16 == 0);
  static_assert((kI / kRowWarpRows) * (F::kMaxD / kRowWarpCols) == kThreads / kWarpSize,
                "the row side's warps tile I × D");
};

// The fixed-shift factors a_i·2^m (row_factor, g scaled as g_scales sets it) of
// rows [0, len), 0 for rows ≥ n: fa2_sym_grad_kernel copies them by cp.async
// with the row tiles, len a multiple of the key tile so every copy stays inside.
template <typename Tile>
__global__ void fa2_factors_kernel(const TileArgs<Tile> p, int64_t len,
                                   typename Tile::Acc* __restrict__ a) {
  using Acc = typename Tile::Acc;
  Acc m_scale, out_scale;
  g_scales<Tile>(*p.g_absmax, m_scale, out_scale);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < len; i += stride)
    a[i] = i < p.n ? row_factor<true>(p.g[i] * m_scale, p.lse[i], p.inv_tau) : Acc(0);
}

template <typename T>
__global__ void __launch_bounds__(Fa2Backward<T>::kThreads)
    fa2_sym_grad_kernel(const T* __restrict__ x, int64_t n, int64_t d, int64_t ld, float inv_tau,
                        const float* __restrict__ a, const float* __restrict__ g_absmax,
                        int64_t a0, int64_t a1, int64_t chunk_tiles, float* __restrict__ dneg) {
  using F = Fa2Forward<T>;
  using W = Fa2Backward<T>;
  constexpr int KB = W::kK, IB = W::kI;
  __shared__ __align__(128) T key[KB * F::kLd];
  __shared__ __align__(128) T rows[2][IB * F::kLd];
  __shared__ __align__(128) T mbuf[KB * W::kLdM];
  __shared__ __align__(16) float a_rows[2][IB];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, t = lane % 4;  // this lane's rows g, g + 8 and columns 2t, 2t + 1
  const int ksteps = static_cast<int>((d + 15) / 16);
  const int cols = ksteps * 16;  // D zero-padded to mma's K
  const float shift_log2 = inv_tau * float(kLog2e);  // e_ik = exp2(c_ik·shift_log2 − shift_log2)
  float m_scale, out_scale;  // a holds the scaled factors; out_scale undoes the scale
  g_scales<WmmaTile<T>>(*g_absmax, m_scale, out_scale);
  int64_t tk, i_hi, i_lo;
  sym_work_item(blockIdx.x, (n + KB - 1) / KB, chunk_tiles, tk, i_hi, i_lo);
  const int64_t k0 = tk * KB;
  // The run's row tiles as half tiles h (rows h·IB..), from the top down, without
  // those past n and, when K has no anchor rows, those without any (M = 0 there).
  int64_t h_hi = std::min((i_hi + 1) * W::kHalves - 1, (n - 1) / IB);
  int64_t h_lo = i_lo * W::kHalves;
  if (!(k0 < a1 && k0 + KB > a0)) {
    h_hi = a1 > a0 ? std::min(h_hi, (a1 - 1) / IB) : -1;
    h_lo = std::max(h_lo, a0 / IB);
  }
  if (h_lo > h_hi) return;  // the same for the whole block

  // Copies of row tile h and its factors into buffer b; committed by the caller.
  auto load_rows = [&](int b, int64_t h) {
    load_tile_async<T, IB>(rows[b], x, n, ld, cols, h * IB);
    load_floats_async<IB>(a_rows[b], a, h * IB);
  };
  load_tile_async<T, KB>(key, x, n, ld, cols, k0);
  load_rows(0, h_hi);
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
  __syncthreads();  // the key tile and the first row tile have landed
  uint32_t kf[1][F::kKSteps][4];  // A fragments of this warp's 16 key rows (one m16 tile)
#pragma unroll
  for (int ks = 0; ks < F::kKSteps; ++ks) {
    if (ks < ksteps) {
      ptx::ldmatrix_x4(kf[0][ks], ptx::smem_addr(frag_row(key, warp * 16, ks * 16, false)));
    }
  }
  const int64_t krow = k0 + warp * 16 + g;
  const float ak[2] = {a[krow], a[krow + 8]};  // a is padded to whole key tiles
  float acc[W::kDNTiles][4];  // column side: rows krow, krow + 8; columns 8j + 2t, + 1
#pragma unroll
  for (int j = 0; j < W::kDNTiles; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

  for (int64_t h = h_hi; h >= h_lo; --h) {
    const int cur = static_cast<int>((h_hi - h) & 1);
    if (h > h_lo) load_rows(cur ^ 1, h - 1);
    ptx::cp_async_commit();   // empty after the last tile: the wait below stays the same
    ptx::cp_async_wait<1>();  // this thread's copies of tile h have landed
    __syncthreads();          // and everyone's
    const int64_t i0 = h * IB;
    const bool diagonal = i0 / KB == tk;  // I inside K: the column side gives M_KK U_K

    // Sᵀ = U_K U_Iᵀ: this warp's 16 key rows × the 32 rows of I.
    float s[1][W::kINTiles][4];
    tile_dots(s, kf, rows[cur], ksteps);

    // M_ki = e_ki (a_k + a_i) in place, rounded to T as the A fragments of the
    // column side (n8 tiles 2kk, 2kk + 1 of Sᵀ are k-step kk over I). Masked
    // entries (k ≥ n, i ≥ n, the diagonal) are 0, never exp'd.
    const bool masked = diagonal || i0 + IB > n || k0 + KB > n;
    uint32_t mf[W::kINTiles / 2][4];
#pragma unroll
    for (int j = 0; j < W::kINTiles; ++j) {
      float m[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = 8 * j + 2 * t + (e & 1);
        const int64_t k = krow + 8 * (e >> 1), i = i0 + c;
        const bool keep = !masked || (i < n && k < n && i != k);
        m[e] = keep ? exp2_normal(fmaf(s[0][j][e], shift_log2, -shift_log2)) * (ak[e >> 1] + a_rows[cur][c])
                    : 0.0f;
      }
      mf[j / 2][2 * (j & 1)] = ptx::pack16x2<T>(m[0], m[1]);      // row g
      mf[j / 2][2 * (j & 1) + 1] = ptx::pack16x2<T>(m[2], m[3]);  // row g + 8
    }

    // Column side: rows K += M_KI U_I, U_I as B by ldmatrix .trans ([k = I][n = D]).
#pragma unroll
    for (int kk = 0; kk < W::kINTiles / 2; ++kk) {
#pragma unroll
      for (int nb = 0; nb < F::kKSteps; ++nb) {
        if (nb >= ksteps) continue;
        uint32_t bf[4];
        ptx::ldmatrix_x4<true>(bf, ptx::smem_addr(frag_row(rows[cur], kk * 16, nb * 16, false)));
        const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
        ptx::mma_m16n8k16<T>(acc[2 * nb], mf[kk], b0);
        ptx::mma_m16n8k16<T>(acc[2 * nb + 1], mf[kk], b1);
      }
    }

    if (!diagonal) {  // the same for the whole block
      // Row side: M_KI into the shared [K][I] buffer, then rows I += M_IK U_K.
      const int r = warp * 16 + g;
#pragma unroll
      for (int kk = 0; kk < W::kINTiles / 2; ++kk) {
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {
          const int c = 16 * kk + 8 * jj + 2 * t;
          *reinterpret_cast<uint32_t*>(mbuf + r * W::kLdM + c) = mf[kk][2 * jj];
          *reinterpret_cast<uint32_t*>(mbuf + (r + 8) * W::kLdM + c) = mf[kk][2 * jj + 1];
        }
      }
      __syncthreads();  // M complete
      const int ri = (warp % 2) * W::kRowWarpRows, cb = (warp / 2) * W::kRowWarpCols;
      uint32_t af[KB / 16][4];  // A = M_IK (rows ri.., k-steps over K): .trans of [K][I]
#pragma unroll
      for (int ks = 0; ks < KB / 16; ++ks)
        ptx::ldmatrix_x4<true>(af[ks], ptx::smem_addr(frag_row<T, W::kLdM>(mbuf, ks * 16, ri, true)));
#pragma unroll
      for (int nb = 0; nb < W::kRowWarpCols / 16; ++nb) {
        const int col = cb + nb * 16;
        if (col >= cols) break;  // the same for the whole warp
        float o[2][4] = {};
#pragma unroll
        for (int ks = 0; ks < KB / 16; ++ks) {
          uint32_t bf[4];  // B = U_K [k = K][n = D] by .trans
          ptx::ldmatrix_x4<true>(bf, ptx::smem_addr(frag_row(key, ks * 16, col, false)));
          const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
          ptx::mma_m16n8k16<T>(o[0], af[ks], b0);
          ptx::mma_m16n8k16<T>(o[1], af[ks], b1);
        }
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int64_t i = i0 + ri + g + 8 * half, c = col + 8 * hh + 2 * t;
            if (i < n) {
              add_pair(dneg + i * d + c, c, d, o[hh][2 * half] * out_scale,
                       o[hh][2 * half + 1] * out_scale);
            }
          }
        }
      }
    }
    __syncthreads();  // rows[cur], a_rows[cur] and mbuf are read: the next tile may overwrite them
  }
  // The column side of K, once.
#pragma unroll
  for (int j = 0; j < W::kDNTiles; ++j) {
    const int64_t c = 8 * j + 2 * t;
    if (c >= cols) continue;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t k = krow + 8 * half;
      if (k < n) add_pair(dneg + k * d + c, c, d, acc[j][2 * half] * out_scale, acc[j][2 * half + 1] * out_scale);
    }
  }
}

// ------------------------------- row backward, FA2-style (16-bit, atomic-free)
// dneg_I = Σ_K M_IK U_K for this block's 128 query rows I (Fa2Forward's tile: 4
// warps × 32 rows, two m16 tiles a warp), over the key halves of 64 rows
// [h_lo, h_hi) of its split z (blockIdx.y; all of them with one split), streamed
// by cp.async through the two key buffers that first hold the query tile while
// each warp loads its A fragments. Per 16 keys of a half, each warp computes
// S = U_I U_Kᵀ (32 × 16) by mma.sync, M_ik = e_ik (a_i + a_k) in those
// accumulators (as fa2_sym_grad_kernel, a scaled by 2^m), rounds M to 16 bits as
// the A fragments of one k-step (FlashAttention-2 repacks P the same way), and
// adds M·U_K with B = U_K by ldmatrix .trans of the same buffer, into 32 × 128
// fp32 accumulators held over the walk. Every element of the block's slice
// out[z][I][:d] is then written once, by plain stores: no atomics, no zeroed
// output, the same sums in the same order on every run (deterministic). Counts and
// predicted times: csrc/cuda/info_nce/info_nce.md, "Step 4: the FA2-style row kernel".
template <typename T>
struct Fa2Row {
  using F = Fa2Forward<T>;
  static constexpr int kKeySteps = F::kKeyRows / 16;  // 16-key k-steps of M·U_K per half
  static constexpr int kDNTiles = F::kMaxD / 8;       // n8 tiles of dneg's D
};

template <typename T>
__global__ void __launch_bounds__(Fa2Forward<T>::kThreads)
    fa2_row_grad_kernel(const T* __restrict__ x, int64_t n, int64_t d, int64_t ld, float inv_tau,
                        const float* __restrict__ a, const float* __restrict__ g_absmax,
                        int64_t a0, int64_t a1, int64_t split_halves, float* __restrict__ out) {
  using F = Fa2Forward<T>;
  using R = Fa2Row<T>;
  constexpr int B = F::kB, KR = F::kKeyRows;
  __shared__ __align__(128) T tiles[F::kHalves * KR * F::kLd];
  __shared__ __align__(16) float a_keys[2][KR];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, t = lane % 4;  // rows g, g + 8 of each m16 tile, columns 2t, 2t + 1
  const int ksteps = static_cast<int>((d + 15) / 16);
  const int cols = ksteps * 16;  // D zero-padded to mma's K
  const float shift_log2 = inv_tau * float(kLog2e);  // e_ik = exp2(c_ik·shift_log2 − shift_log2)
  float m_scale, out_scale;  // a holds the scaled factors; out_scale undoes the scale
  g_scales<WmmaTile<T>>(*g_absmax, m_scale, out_scale);
  const int64_t i0 = int64_t(blockIdx.x) * B;
  // This split's key halves, without those past n and, when I has no anchor rows,
  // those without any (a_i = a_k = 0 there: M = 0).
  int64_t h_lo = int64_t(blockIdx.y) * split_halves;
  int64_t h_hi = std::min(h_lo + split_halves, (n + KR - 1) / KR);
  if (!(i0 < a1 && i0 + B > a0)) {
    h_lo = std::max(h_lo, a0 / KR);
    h_hi = std::min(h_hi, (a1 + KR - 1) / KR);
  }
  const int64_t row0 = i0 + warp * F::kWarpRows + g;  // rows row0 + 16m + 8r of this lane
  float o[F::kMTiles][R::kDNTiles][4];  // rows 16m + g (+ 8), columns 8j + 2t, + 1
#pragma unroll
  for (int m = 0; m < F::kMTiles; ++m) {
#pragma unroll
    for (int j = 0; j < R::kDNTiles; ++j) o[m][j][0] = o[m][j][1] = o[m][j][2] = o[m][j][3] = 0.0f;
  }

  if (h_lo < h_hi) {  // the same for the whole block
    // Copies of key half h and its factors into buffer b; committed by the caller.
    auto load_half = [&](int b, int64_t h) {
      load_tile_async<T, KR>(tiles + b * KR * F::kLd, x, n, ld, cols, h * KR);
      load_floats_async<KR>(a_keys[b], a, h * KR);
    };
    // Q through both key buffers, its fragments into registers, then the key halves.
    uint32_t qf[F::kMTiles][F::kKSteps][4];
    load_query_fragments(qf, tiles, x, n, ld, cols, ksteps, i0);
    float ai[F::kMTiles][2];  // a of rows row0 + 16m + 8r (a is padded to whole query tiles)
#pragma unroll
    for (int m = 0; m < F::kMTiles; ++m) {
      ai[m][0] = a[row0 + 16 * m];
      ai[m][1] = a[row0 + 16 * m + 8];
    }
    __syncthreads();  // every warp holds its Q: the buffers may take key halves
    load_half(0, h_lo);
    ptx::cp_async_commit();

    for (int64_t h = h_lo; h < h_hi; ++h) {
      const int cur = static_cast<int>((h - h_lo) & 1);
      const T* key = tiles + cur * KR * F::kLd;
      if (h + 1 < h_hi) load_half(cur ^ 1, h + 1);
      ptx::cp_async_commit();   // empty after the last half: the wait below stays the same
      ptx::cp_async_wait<1>();  // this thread's copies of half h have landed
      __syncthreads();          // and everyone's
      // Masked entries (k ≥ n, i ≥ n, the diagonal) are 0, never exp'd; only halves
      // inside the query tile and the last tiles have any.
      const bool masked = (h * KR < i0 + B && (h + 1) * KR > i0) || (h + 1) * KR > n || i0 + B > n;
#pragma unroll
      for (int kk = 0; kk < R::kKeySteps; ++kk) {
        // S of keys h·KR + 16kk.. (two n8 tiles), then M in place, as A of k-step kk.
        float s[F::kMTiles][2][4];
        tile_dots(s, qf, key + kk * 16 * F::kLd, ksteps);
        uint32_t mf[F::kMTiles][4];
#pragma unroll
        for (int m = 0; m < F::kMTiles; ++m) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            float mv[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int c = 16 * kk + 8 * j + 2 * t + (e & 1);
              const int64_t i = row0 + 16 * m + 8 * (e >> 1), k = h * KR + c;
              const bool keep = !masked || (i < n && k < n && i != k);
              const float ak = ai[m][e >> 1] + a_keys[cur][c];
              mv[e] = keep ? exp2_normal(fmaf(s[m][j][e], shift_log2, -shift_log2)) * ak : 0.0f;
            }
            mf[m][2 * j] = ptx::pack16x2<T>(mv[0], mv[1]);      // row g; keys 8j + 2t..
            mf[m][2 * j + 1] = ptx::pack16x2<T>(mv[2], mv[3]);  // row g + 8
          }
        }
        // dneg_I += M·U_K over these 16 keys, U_K as B by ldmatrix .trans ([k = keys][n = D]).
#pragma unroll
        for (int nb = 0; nb < F::kKSteps; ++nb) {
          if (nb >= ksteps) continue;
          uint32_t bf[4];
          ptx::ldmatrix_x4<true>(bf, ptx::smem_addr(frag_row(key, kk * 16, nb * 16, false)));
          const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
#pragma unroll
          for (int m = 0; m < F::kMTiles; ++m) {
            ptx::mma_m16n8k16<T>(o[m][2 * nb], mf[m], b0);
            ptx::mma_m16n8k16<T>(o[m][2 * nb + 1], mf[m], b1);
          }
        }
      }
      __syncthreads();  // the key buffer and its factors are read: the next half may overwrite them
    }
  }
  // Every element of the block's rows < n and columns < d, once (0 without key halves).
  float* slice = out + int64_t(blockIdx.y) * n * d;
#pragma unroll
  for (int m = 0; m < F::kMTiles; ++m) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t i = row0 + 16 * m + 8 * r;
      if (i >= n) continue;
#pragma unroll
      for (int j = 0; j < R::kDNTiles; ++j) {
        const int64_t c = 8 * j + 2 * t;
        if (c < d) slice[i * d + c] = o[m][j][2 * r] * out_scale;
        if (c + 1 < d) slice[i * d + c + 1] = o[m][j][2 * r + 1] * out_scale;
      }
    }
  }
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

// ------------------------------------------------------- backward row kernels
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
// dneg (zeroed) += M u by the symmetric kernels, on the fixed-shift path:
// fa2_sym_grad_kernel where use_fa2_tiles allows it, sym_grad_kernel otherwise.
template <typename Tile>
void symmetric_dneg(const TileArgs<Tile>& args, const at::Tensor& u, int64_t col_blocks,
                    at::Tensor& dneg, cudaStream_t stream) {
  using In = typename Tile::In;
  using Acc = typename Tile::Acc;
  const int64_t n = args.n;
  const int64_t tiles = ceil_div(n, Tile::BM), pairs = tiles * (tiles + 1) / 2;
  // Runs of at most chunk_tiles pairs, so that the grid has kBlocksPerSm blocks per
  // SM when N allows it (N = 4096 in bf16: runs of 8, 288 blocks); large N gets one
  // run per key tile (N = 65536: 1024 blocks of 1 to 1024 pairs, largest first).
  const int64_t want = ceil_div(kBlocksPerSm * sm_count(), col_blocks);
  const int64_t chunk_tiles = std::clamp<int64_t>(ceil_div(pairs, want), 1, tiles);
  int64_t items = 0;  // Σ_K ceil((K + 1) / chunk_tiles), as sym_work_item counts them
  for (int64_t tk = 0; tk < tiles; ++tk) items += ceil_div(tk + 1, chunk_tiles);
  const dim3 grid(grid_exact(kBackwardOp, items), static_cast<unsigned int>(col_blocks));
  if constexpr (std::is_same_v<In, __half> || std::is_same_v<In, __nv_bfloat16>) {
    if (use_fa2_tiles<Tile>(args.d)) {
      const at::Tensor up = pad_to_chunk<In>(u);
      at::Tensor a = at::empty({tiles * Tile::BM}, dneg.options());
      launch(fa2_factors_kernel<Tile>, grid_stride(a.numel(), kRowThreads), kRowThreads, stream,
             args, a.numel(), mut_ptr<Acc>(a));
      launch(fa2_sym_grad_kernel<In>, grid, Fa2Backward<In>::kThreads, stream, ptr<In>(up), n,
             args.d, up.size(1), args.inv_tau, ptr<Acc>(a), args.g_absmax, args.a0, args.a1,
             chunk_tiles, mut_ptr<Acc>(dneg));
      return;
    }
  }
  launch(sym_grad_kernel<Tile>, grid, kTileThreads, stream, args, chunk_tiles, mut_ptr<Acc>(dneg));
}

// Key splits of a row kernel (grad_tile_kernel, fa2_row_grad_kernel) with `blocks`
// blocks per split over `keys` key tiles: at small N the key tiles are split over up
// to `splits` blocks per output tile, so that the grid has kBlocksPerSm blocks per
// SM; their partial sums go to slices [splits, N, D] (about kBlocksPerSm·SMs
// output tiles in all, whatever N), added in a fixed order by sum_slices. Large N:
// one split, written straight into dneg.
struct KeySplits {
  int64_t per_split, splits;
};
inline KeySplits key_splits(int64_t blocks, int64_t keys) {
  const int64_t want = ceil_div(kBlocksPerSm * sm_count(), blocks);
  const int64_t per_split = ceil_div(keys, std::clamp<int64_t>(want, 1, keys));
  return {per_split, ceil_div(keys, per_split)};  // ≤ kMaxGridY: want ≤ 2·SMs
}

// The slices' output: dneg itself for one split, else a [splits, N, D] buffer.
inline at::Tensor slices_for(const KeySplits& ks, at::Tensor& dneg) {
  return ks.splits == 1 ? dneg : at::empty({ks.splits, dneg.size(0), dneg.size(1)}, dneg.options());
}

// dneg = Σ of the slices in order (nothing to do for one split).
template <typename Acc>
void sum_slices(const KeySplits& ks, const at::Tensor& parts, at::Tensor& dneg,
                cudaStream_t stream) {
  if (ks.splits == 1) return;
  launch(sum_slices_kernel<Acc>, grid_stride(dneg.numel(), kRowThreads), kRowThreads, stream,
         ptr<Acc>(parts), ks.splits, dneg.numel(), mut_ptr<Acc>(dneg));
}

// dneg = M u by grad_tile_kernel: every element written once, in a fixed order
// (the deterministic kernel beyond fa2_row_grad_kernel's reach, and the one of the
// online path).
template <typename Tile>
void row_block_dneg(const TileArgs<Tile>& args, bool fixed_shift, int64_t col_blocks,
                    at::Tensor& dneg, cudaStream_t stream) {
  using Acc = typename Tile::Acc;
  const int64_t row_blocks = ceil_div(args.n, Tile::BM);
  const KeySplits ks = key_splits(row_blocks * col_blocks, ceil_div(args.n, Tile::BN));
  at::Tensor parts = slices_for(ks, dneg);
  const dim3 grid(grid_exact(kBackwardOp, row_blocks), static_cast<unsigned int>(col_blocks),
                  static_cast<unsigned int>(ks.splits));
  launch(fixed_shift ? grad_tile_kernel<Tile, true> : grad_tile_kernel<Tile, false>,
         grid, kTileThreads, stream, args, ks.per_split, mut_ptr<Acc>(parts));
  sum_slices<Acc>(ks, parts, dneg, stream);
}

// dneg = M u by fa2_row_grad_kernel (16-bit z, D ≤ 128, the fixed shift): every
// element written once, in a fixed order, no atomics.
template <typename Tile>
void fa2_row_dneg(const TileArgs<Tile>& args, const at::Tensor& u, at::Tensor& dneg,
                  cudaStream_t stream) {
  using In = typename Tile::In;
  using Acc = typename Tile::Acc;
  if constexpr (std::is_same_v<In, __half> || std::is_same_v<In, __nv_bfloat16>) {
    using F = Fa2Forward<In>;
    const int64_t q_tiles = ceil_div(args.n, F::kB);
    const KeySplits ks = key_splits(q_tiles, ceil_div(args.n, F::kKeyRows));
    at::Tensor parts = slices_for(ks, dneg);
    const at::Tensor up = pad_to_chunk<In>(u);
    at::Tensor a = at::empty({q_tiles * F::kB}, dneg.options());  // whole query tiles
    launch(fa2_factors_kernel<Tile>, grid_stride(a.numel(), kRowThreads), kRowThreads, stream,
           args, a.numel(), mut_ptr<Acc>(a));
    const dim3 grid(grid_exact(kBackwardOp, q_tiles), static_cast<unsigned int>(ks.splits));
    launch(fa2_row_grad_kernel<In>, grid, F::kThreads, stream, ptr<In>(up), args.n, args.d,
           up.size(1), args.inv_tau, ptr<Acc>(a), args.g_absmax, args.a0, args.a1, ks.per_split,
           mut_ptr<Acc>(parts));
    sum_slices<Acc>(ks, parts, dneg, stream);
  } else {
    TORCH_CHECK(false, kBackwardOp, ": fa2_row_grad_kernel takes 16-bit z only");
  }
}

// The backward's dneg kernel as PALFAST_INFO_NCE_BACKWARD asks (docs/cuda.md,
// "info_nce kernels"): unset or empty, the default; "row", fa2_row_grad_kernel;
// "sym", the symmetric kernels; "tile", grad_tile_kernel. Any other value is an error.
enum class DnegChoice { kDefault, kRow, kSym, kTile };
inline DnegChoice dneg_choice() {
  const char* env = std::getenv("PALFAST_INFO_NCE_BACKWARD");
  const std::string v = env == nullptr ? "" : env;
  if (v.empty()) return DnegChoice::kDefault;
  if (v == "row") return DnegChoice::kRow;
  if (v == "sym") return DnegChoice::kSym;
  if (v == "tile") return DnegChoice::kTile;
  TORCH_CHECK(false, kBackwardOp,
              ": PALFAST_INFO_NCE_BACKWARD must be 'row', 'sym', 'tile' or unset, not '", v, "'");
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

  const int64_t col_blocks = ceil_div(d, Tile::DV);
  TORCH_CHECK(col_blocks <= kMaxGridY, kBackwardOp, ": z has too many columns (", d,
              ") for one CUDA grid");
  const TileArgs<Tile> args{ptr<In>(u), n, d, inv_tau, ptr<Acc>(gr), ptr<Acc>(lse),
                            ptr<Acc>(g_absmax), a0, a1};
  const bool fixed_shift = use_fixed_shift<Acc>(normalize, temperature);
  // dneg = Σ_K M_IK u_K by one of three kernels (docs/cuda.md, "info_nce kernels"):
  //  * fa2_row_grad_kernel, 16-bit z with D ≤ 128 on the fixed-shift path: no
  //    atomics, deterministic, predicted the fastest (info_nce.md): the default there;
  //  * the symmetric kernels (3/4 of the tensor FLOPs, float atomics adding in a
  //    varying order): the default of the other fixed-shift cases, never under
  //    torch.use_deterministic_algorithms, as PyTorch's own ops pick a
  //    deterministic kernel where they have one (docs/cuda.md, "Determinism");
  //  * grad_tile_kernel, the row-block kernel: the online path, and deterministic
  //    mode where fa2_row_grad_kernel does not apply.
  // PALFAST_INFO_NCE_BACKWARD picks another where it applies (read on every path,
  // so that a bad value is always an error).
  const DnegChoice choice = dneg_choice();
  const bool row_ok = fixed_shift && use_fa2_tiles<Tile>(d);
  const bool sym_ok = fixed_shift && !at::globalContext().deterministicAlgorithms();
  at::Tensor dneg;
  if (row_ok && choice != DnegChoice::kTile && (choice != DnegChoice::kSym || !sym_ok)) {
    dneg = at::empty({n, d}, acc_opts);
    fa2_row_dneg<Tile>(args, u, dneg, stream);
  } else if (sym_ok && choice != DnegChoice::kTile) {
    dneg = at::zeros({n, d}, acc_opts);
    symmetric_dneg<Tile>(args, u, col_blocks, dneg, stream);
  } else {
    dneg = at::empty({n, d}, acc_opts);
    row_block_dneg<Tile>(args, fixed_shift, col_blocks, dneg, stream);
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

// The kernels behind the entry point of csrc/info_nce.h (which checks the arguments).
at::Tensor info_nce_backward_cuda(const at::Tensor& grad_rows, const at::Tensor& z,
                                  const GraphArgs& g, const at::Tensor& lse, double temperature,
                                  bool normalize, int64_t a0, int64_t a1) {
  const c10::cuda::CUDAGuard guard(z.device());
  check_tensor_cores(z);
  switch (z.scalar_type()) {
    case at::kDouble:
      return backward_impl<double, DoubleTile>(grad_rows, z, g, lse, temperature, normalize, a0, a1);
    case at::kFloat:
      switch (float_math()) {
        case FloatMath::kTf32:
          return backward_impl<float, Tf32Tile1>(grad_rows, z, g, lse, temperature, normalize, a0,
                                                 a1);
        case FloatMath::kTf32x3:
          return backward_impl<float, Tf32Tile3>(grad_rows, z, g, lse, temperature, normalize, a0,
                                                 a1);
        default:
          return backward_impl<float, FloatTile>(grad_rows, z, g, lse, temperature, normalize, a0,
                                                 a1);
      }
    case at::kHalf:
      return backward_impl<at::Half, HalfTile>(grad_rows, z, g, lse, temperature, normalize, a0, a1);
    default:
      return backward_impl<at::BFloat16, BFloat16Tile>(grad_rows, z, g, lse, temperature,
                                                        normalize, a0, a1);
  }
}


}  // namespace

TORCH_LIBRARY_IMPL(palfast, CUDA, m) {
  m.impl("info_nce_backward", &info_nce_backward_entry<&info_nce_backward_cuda>);
}

}  // namespace palfast::cuda
