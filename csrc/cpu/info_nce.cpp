// palfast::info_nce on the CPU: flash-style tiles, never an N×N matrix.
//
// Forward: the similarity matrix is visited in kTile×kTile tiles. s_ij is
// symmetric, so only tiles (I, K) with I ≤ K are computed (one GEMM each) and
// each tile adds to the log-sum-exp of its rows *and* of its columns.
//
// Backward: dL/du = (1/τ) M u − (1/τ) [c ∘ (G u) + Gᵀ (c ∘ u)], where
//   M_ik = g_i p_ik + g_k p_ki, p_ik = exp(s_ik − lse_i), c_i = g_i / W_i.
// M is symmetric, so again only tiles I ≤ K are recomputed; a tile adds M u_K
// to rows I and Mᵀ u_I to rows K.
//
// Fixed shift (FixedShift below): every logit obeys |s_ik| ≤ b = max_i ‖u_i‖² / τ
// (Cauchy–Schwarz; b ≤ 1/τ when normalising). When 2b is small enough that
// exp(s − b) can neither overflow nor leave the normal floating-point range,
// one exponential e_ik = exp(s_ik − b) per element serves both row i and
// column k: the forward sums e over rows and columns (lse_i = b + log Σ_k e_ik,
// no running maximum), and the backward's M_ik = e_ik (a_i + a_k) with
// a_i = g_i exp(b − lse_i). Otherwise (τ below ~2/kFixedShiftSpan<T> with
// normalize=True, or large unnormalised rows) the tiles keep an online
// (max, sum) per row and column, two exponentials per element.
//
// Scheduling (csrc/cpu/schedule.h, run_ordered): the tile pairs are handed out
// one at a time to whichever thread is free, so a core taken by another
// process costs its share of the tiles and no more. Each tile pair writes its
// partial (row and column sums in the forward, its [tile, D] row and column
// gradients in the backward) into a slot, and the slots are merged in
// tile-pair order: the result is bitwise the same whatever the schedule (which
// thread ran which tile, how long the OS paused it) and the thread count.
// Memory: O(N·D) outputs plus kSlotsPerThread slots of [2, kTile, D] per
// thread in the backward, i.e. O(N·D + threads·kTile·D).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "../info_nce.h"
#include "graph_spmm_cpu.h"
#include "schedule.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

// The tile loops are compiled for AVX-512, AVX2 and baseline x86-64 and the
// best one is picked at load time, so the wheel runs on any x86-64 CPU. The
// clones are chosen by CPU *feature* ("arch=haswell" would test the CPU model
// and pick the slow default on every AMD part).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PALFAST_CLONES \
  __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PALFAST_CLONES
#endif
// Helpers called from a clone must be inlined into it to get its instruction set.
#define PALFAST_INLINE inline __attribute__((always_inline))

namespace palfast::cpu {
namespace {

// Rows per tile: a 256×256 tile (256 KiB in float32) stays in L2 while its GEMM and
// exps run, and N = 8192 gives 528 tile pairs, plenty to balance over the threads.
constexpr int64_t kTile = 256;
constexpr int kLanes = 16;  // independent partial reductions, so loops vectorise
// The forward's run_ordered slots per thread: its slots hold a few kTile-long
// vectors (a few KiB), so a thread may run 64 tile pairs (tens of ms) ahead of a
// peer the OS paused for little memory; the backward's [2, kTile, D] slots keep
// schedule.h's kSlotsPerThread.
constexpr int64_t kForwardSlotsPerThread = 64;

// exp(x) for float within ~2 ulp (Cephes polynomial), branch-free so that GCC
// vectorises loops of it; exp(x < -87) = 0, NaN stays NaN.
PALFAST_INLINE float fast_exp(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const float scale = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return x < -87.0f ? 0.0f : y * scale;
}
PALFAST_INLINE double fast_exp(double x) { return std::exp(x); }

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// The largest span 2b of the shifted logits s − b ∈ [−2b, 0] for which the
// fixed shift is used: every e = exp(s − b) ≥ exp(−span) stays a normal number
// (full relative precision; float32's smallest normal is exp(−87.3), float64's
// exp(−708.4)), and a_i = g_i / Σ_k e_ik ≤ g_i exp(span) stays finite.
// float32: span 80 admits τ ≥ 0.025 with normalize=True.
template <typename T>
constexpr T kFixedShiftSpan = 80;
template <>
constexpr double kFixedShiftSpan<double> = 700;

// One forward tile with the fixed shift: e_rc = exp(s_rc / τ − b) (0 on the
// diagonal of diagonal tiles), Σ_c e_rc into row_sum[r] and, for off-diagonal
// tiles, Σ_r e_rc into col_sum[c]. Both sums start at 0 here.
template <typename T>
PALFAST_CLONES void forward_tile_fixed(const T* s, int64_t ni, int64_t nk, T inv_tau, T shift,
                                       bool diagonal, T* row_sum, T* col_sum) {
  std::fill(col_sum, col_sum + nk, T(0));
  for (int64_t r = 0; r < ni; ++r) {
    const T* row = s + r * nk;
    T acc[kLanes] = {};
    int64_t c = 0;
    for (; c + kLanes <= nk; c += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const T e = (diagonal && c + j == r) ? T(0) : fast_exp(row[c + j] * inv_tau - shift);
        acc[j] += e;
        col_sum[c + j] += e;
      }
    for (; c < nk; ++c) {
      const T e = (diagonal && c == r) ? T(0) : fast_exp(row[c] * inv_tau - shift);
      acc[0] += e;
      col_sum[c] += e;
    }
    T sum = 0;
    for (int j = 0; j < kLanes; ++j) sum += acc[j];
    row_sum[r] = sum;
  }
}

// One backward tile with the fixed shift: s [ni, nk] (unscaled dots) becomes
// M_rc = e_rc (a_r + a_c), 0 on the diagonal of diagonal tiles.
template <typename T>
PALFAST_CLONES void backward_tile_fixed(T* s, int64_t ni, int64_t nk, T inv_tau, T shift,
                                        bool diagonal, const T* a_r, const T* a_c) {
  for (int64_t r = 0; r < ni; ++r) {
    T* row = s + r * nk;
    const T ar = a_r[r];
    for (int64_t c = 0; c < nk; ++c) row[c] = fast_exp(row[c] * inv_tau - shift) * (ar + a_c[c]);
    if (diagonal) row[r] = T(0);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// The same two tiles for float32 with AVX2 + FMA intrinsics: GCC 12 leaves the
// generic loops above scalar in their "avx2" clone (objdump shows vmovss/vaddss),
// and these loops are the whole cost of the kernel besides the GEMMs.
#define PALFAST_AVX2 __attribute__((target("avx2,fma"), always_inline)) inline

// fast_exp on 8 lanes, the same Cephes polynomial; exp(x < -87) = 0, NaN stays
// NaN (max/min return their second operand when one is NaN).
PALFAST_AVX2 __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 xc = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(lo, x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 res = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), res);
}

// Lanes c0 .. c0+7 that are < nk (all ones) and, on a diagonal tile, not r.
PALFAST_AVX2 __m256 lane_mask(int64_t c0, int64_t nk, int64_t diag_col) {
  const __m256i lane = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(c0)),
                                        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i in = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(nk)), lane);
  const __m256i diag = _mm256_cmpeq_epi32(lane, _mm256_set1_epi32(static_cast<int32_t>(diag_col)));
  return _mm256_castsi256_ps(_mm256_andnot_si256(diag, in));
}

constexpr int64_t kAvx2Lanes = 8;

__attribute__((target("avx2,fma"))) void forward_tile_fixed_avx2(
    const float* s, int64_t ni, int64_t nk, float inv_tau, float shift, bool diagonal,
    float* row_sum, float* col_sum) {
  std::fill(col_sum, col_sum + nk, 0.0f);
  const __m256 vscale = _mm256_set1_ps(inv_tau), vshift = _mm256_set1_ps(shift);
  for (int64_t r = 0; r < ni; ++r) {
    const float* row = s + r * nk;
    const int64_t diag_col = diagonal ? r : -1;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t c = 0; c < nk; c += kAvx2Lanes) {
      const bool full = c + kAvx2Lanes <= nk && (diag_col < c || diag_col >= c + kAvx2Lanes);
      const __m256 mask = full ? _mm256_setzero_ps() : lane_mask(c, nk, diag_col);
      const __m256 x = full ? _mm256_loadu_ps(row + c)
                            : _mm256_maskload_ps(row + c, _mm256_castps_si256(mask));
      __m256 e = exp8(_mm256_fmsub_ps(x, vscale, vshift));
      if (!full) e = _mm256_and_ps(e, mask);
      acc = _mm256_add_ps(acc, e);
      if (diagonal) continue;  // a diagonal tile's columns are its rows
      if (full) {
        _mm256_storeu_ps(col_sum + c, _mm256_add_ps(_mm256_loadu_ps(col_sum + c), e));
      } else {
        const __m256i m = _mm256_castps_si256(lane_mask(c, nk, -1));
        _mm256_maskstore_ps(col_sum + c, m, _mm256_add_ps(_mm256_maskload_ps(col_sum + c, m), e));
      }
    }
    // Fixed-order horizontal sum: the same bits on every run.
    alignas(32) float lanes[kAvx2Lanes];
    _mm256_store_ps(lanes, acc);
    float sum = 0;
    for (int64_t j = 0; j < kAvx2Lanes; ++j) sum += lanes[j];
    row_sum[r] = sum;
  }
}

__attribute__((target("avx2,fma"))) void backward_tile_fixed_avx2(
    float* s, int64_t ni, int64_t nk, float inv_tau, float shift, bool diagonal,
    const float* a_r, const float* a_c) {
  const __m256 vscale = _mm256_set1_ps(inv_tau), vshift = _mm256_set1_ps(shift);
  for (int64_t r = 0; r < ni; ++r) {
    float* row = s + r * nk;
    const __m256 ar = _mm256_set1_ps(a_r[r]);
    int64_t c = 0;
    for (; c + kAvx2Lanes <= nk; c += kAvx2Lanes) {
      const __m256 e = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(row + c), vscale, vshift));
      _mm256_storeu_ps(row + c, _mm256_mul_ps(e, _mm256_add_ps(ar, _mm256_loadu_ps(a_c + c))));
    }
    if (c < nk) {
      const __m256i m = _mm256_castps_si256(lane_mask(c, nk, -1));
      const __m256 e = exp8(_mm256_fmsub_ps(_mm256_maskload_ps(row + c, m), vscale, vshift));
      _mm256_maskstore_ps(row + c, m, _mm256_mul_ps(e, _mm256_add_ps(ar, _mm256_maskload_ps(a_c + c, m))));
    }
    if (diagonal) row[r] = 0.0f;
  }
}

bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

// The fixed-shift tiles: AVX2 + FMA for float32 where the CPU has them, else
// the generic loops (cloned for AVX-512, AVX2 and baseline x86-64).
template <typename T>
struct FixedShiftTiles {
  decltype(&forward_tile_fixed<T>) forward = &forward_tile_fixed<T>;
  decltype(&backward_tile_fixed<T>) backward = &backward_tile_fixed<T>;
  FixedShiftTiles() {
#if defined(__x86_64__) && defined(__GNUC__)
    if constexpr (std::is_same_v<T, float>) {
      if (cpu_has_avx2_fma()) {
        forward = &forward_tile_fixed_avx2;
        backward = &backward_tile_fixed_avx2;
      }
    }
#endif
  }
};

// Online log-sum-exp merge: (M, S) represents Σ exp(.) = S·exp(M).
template <typename T>
inline void lse_merge(T& big_m, T& big_s, T m, T s) {
  if (m == kNegInf<T>) return;
  if (m > big_m) {
    big_s = big_s * fast_exp(big_m - m) + s;
    big_m = m;
  } else {
    big_s += s * fast_exp(m - big_m);
  }
}

template <typename T>
PALFAST_INLINE T row_max(const T* x, int64_t n) {
  T acc[kLanes];
  std::fill(acc, acc + kLanes, kNegInf<T>);
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] = std::max(acc[j], x[c + j]);
  for (; c < n; ++c) acc[0] = std::max(acc[0], x[c]);
  return *std::max_element(acc, acc + kLanes);
}

template <typename T>
PALFAST_INLINE T row_sum_exp(const T* x, int64_t n, T shift) {
  T acc[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += fast_exp(x[c + j] - shift);
  for (; c < n; ++c) acc[0] += fast_exp(x[c] - shift);
  T s = 0;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// One forward tile s [ni, nk] (unscaled dot products). Scales by 1/τ, masks the
// diagonal of diagonal tiles, and merges row stats (and column stats for
// off-diagonal tiles) into this thread's running (max, sum).
template <typename T>
PALFAST_CLONES void forward_tile(T* s, int64_t ni, int64_t nk, T inv_tau, bool diagonal,
                                 T* row_m, T* row_s, T* col_m, T* col_s, T* col_tmp) {
  for (int64_t r = 0; r < ni; ++r) {
    T* row = s + r * nk;
    for (int64_t c = 0; c < nk; ++c) row[c] *= inv_tau;
    if (diagonal) row[r] = kNegInf<T>;
  }
  for (int64_t r = 0; r < ni; ++r) {
    const T* row = s + r * nk;
    const T m = row_max(row, nk);
    if (m == kNegInf<T>) continue;  // a 1×1 diagonal tile: nothing but i itself
    lse_merge(row_m[r], row_s[r], m, row_sum_exp(row, nk, m));
  }
  if (diagonal) return;
  T* cm = col_tmp;
  T* cs = col_tmp + nk;
  std::fill(cm, cm + nk, kNegInf<T>);
  std::fill(cs, cs + nk, T(0));
  for (int64_t r = 0; r < ni; ++r) {
    const T* row = s + r * nk;
    for (int64_t c = 0; c < nk; ++c) cm[c] = std::max(cm[c], row[c]);
  }
  for (int64_t r = 0; r < ni; ++r) {
    const T* row = s + r * nk;
    for (int64_t c = 0; c < nk; ++c) cs[c] += fast_exp(row[c] - cm[c]);
  }
  for (int64_t c = 0; c < nk; ++c) lse_merge(col_m[c], col_s[c], cm[c], cs[c]);
}

// One backward tile: s [ni, nk] (unscaled dots) becomes M_rc = g_r p_rc + g_c p_cr.
template <typename T>
PALFAST_CLONES void backward_tile(T* s, int64_t ni, int64_t nk, T inv_tau, bool diagonal,
                                  const T* g_r, const T* lse_r, const T* g_c, const T* lse_c) {
  for (int64_t r = 0; r < ni; ++r) {
    T* row = s + r * nk;
    const T gr = g_r[r];
    const T lr = lse_r[r];
    for (int64_t c = 0; c < nk; ++c) {
      const T x = row[c] * inv_tau;
      row[c] = gr * fast_exp(x - lr) + g_c[c] * fast_exp(x - lse_c[c]);
    }
    if (diagonal) row[r] = T(0);
  }
}

// Tile pairs (I, K), I ≤ K, that touch an anchor row: a pair of two non-anchor
// blocks contributes nothing to anchors' lse or to the gradient.
struct Tile {
  int64_t i0, ni, k0, nk;  // rows [i0, i0 + ni) against rows [k0, k0 + nk)
  bool diagonal() const { return i0 == k0; }
};
struct TilePairs {
  int64_t n;
  std::vector<std::pair<int64_t, int64_t>> pairs;
  TilePairs(int64_t n, int64_t a0, int64_t a1) : n(n) {
    const int64_t nb = (n + kTile - 1) / kTile;
    auto is_anchor_block = [&](int64_t b) { return b * kTile < a1 && (b + 1) * kTile > a0; };
    for (int64_t i = 0; i < nb; ++i)
      for (int64_t k = i; k < nb; ++k)
        if (is_anchor_block(i) || is_anchor_block(k)) pairs.emplace_back(i, k);
  }
  int64_t size() const { return static_cast<int64_t>(pairs.size()); }
  Tile operator[](int64_t unit) const {
    const auto [bi, bk] = pairs[unit];
    return {bi * kTile, std::min(kTile, n - bi * kTile), bk * kTile, std::min(kTile, n - bk * kTile)};
  }
};

// ‖x‖ of one row, scaled by its max-abs before squaring (like palfast.knn.unit_rows):
// float32 rows of norm 1e20 do not overflow to inf (their squares would).
template <typename T>
T row_norm(const T* x, int64_t d) {
  T m = 0;
  for (int64_t k = 0; k < d; ++k) m = std::max(m, std::abs(x[k]));
  if (!(m > 0)) return m;
  T sq = 0;
  for (int64_t k = 0; k < d; ++k) sq += (x[k] / m) * (x[k] / m);
  return std::sqrt(sq) * m;
}

// u = z (as T, contiguous), divided by max(‖z_i‖, kNormFloor) when normalising.
// One dynamically scheduled row loop rather than a chain of ATen ops, each of
// which would wait for every pool thread (a whole time slice when another
// process holds a core).
template <typename T>
at::Tensor embeddings_for_kernel(const at::Tensor& z, bool normalize) {
  const at::Tensor x = z.to(c10::CppTypeToScalarType<T>::value).contiguous();
  if (!normalize) return x;
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor u = at::empty_like(x);
  const T* xp = x.data_ptr<T>();
  T* up = u.data_ptr<T>();
  const T floor = static_cast<T>(kNormFloor);
  parallel_for_dynamic(n, kRowsPerUnit, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T norm = std::max(row_norm(xp + i * d, d), floor);
      for (int64_t k = 0; k < d; ++k) up[i * d + k] = xp[i * d + k] / norm;
    }
  });
  return u;
}

// One kTile×kTile scratch tile per thread (the GEMM output, used by one unit at
// a time): units run on the at::parallel_for threads, numbered 0 .. threads-1.
struct TileScratch {
  std::vector<at::Tensor> tiles;
  explicit TileScratch(const at::TensorOptions& options) {
    for (int64_t t = 0; t < num_threads(); ++t) tiles.push_back(at::empty({kTile * kTile}, options));
  }
  at::Tensor get(int64_t ni, int64_t nk) const {
    return tiles[at::get_thread_num()].narrow(0, 0, ni * nk).view({ni, nk});
  }
};

// The tile pairs of u's similarity matrix touching anchor rows [a0, a1), run
// by run_ordered with `slots` slots: on any thread, the GEMM s = u_I u_Kᵀ into
// a scratch tile, then tile(s, t, slot); merge(t, slot) in tile-pair order.
template <typename T, typename TileFn, typename Merge>
void run_tiles(const at::Tensor& u, int64_t a0, int64_t a1, int64_t slots, const TileFn& tile,
               const Merge& merge) {
  const TilePairs tiles(u.size(0), a0, a1);
  const TileScratch scratch(u.options());
  auto compute = [&](int64_t unit, int64_t slot) {
    const Tile t = tiles[unit];
    at::Tensor s = scratch.get(t.ni, t.nk);
    at::mm_out(s, u.narrow(0, t.i0, t.ni), u.narrow(0, t.k0, t.nk).t());
    tile(s, t, slot);
  };
  run_ordered(tiles.size(), slots, compute, [&](int64_t unit, int64_t slot) {
    merge(tiles[unit], slot);
  });
}

// Slots for the tile pairs touching anchor rows [a0, a1), per_thread each.
inline int64_t tile_slots(int64_t n, int64_t a0, int64_t a1, int64_t per_thread) {
  return ordered_slots(TilePairs(n, a0, a1).size(), per_thread);
}

// b = max_i ‖u_i‖² / τ bounds every |s_ik|; `fixed` says whether the fixed
// shift applies (2b ≤ kFixedShiftSpan<T>; false for inf/NaN b). O(N·D) on this
// thread: a parallel ATen reduction would wait for every pool thread, which
// costs whole scheduler time slices when another process holds a core.
template <typename T>
struct FixedShift {
  T b = 0;
  bool fixed = false;
  FixedShift(const at::Tensor& u, T inv_tau) {
    const int64_t n = u.size(0), d = u.size(1);
    const T* p = u.data_ptr<T>();
    double max_sq = 0;
    for (int64_t i = 0; i < n; ++i) {
      double sq = 0;
      for (int64_t k = 0; k < d; ++k) sq += static_cast<double>(p[i * d + k]) * p[i * d + k];
      max_sq = std::max(max_sq, sq);  // NaN rows are skipped: NaN then flows through the tiles
    }
    const double bound = max_sq * static_cast<double>(inv_tau);
    fixed = std::isfinite(bound) && 2 * bound <= static_cast<double>(kFixedShiftSpan<T>);
    b = static_cast<T>(bound);
  }
};

// lse [N]: lse_of(i) = log Σ_{k≠i} exp(<u_i, u_k> / τ) for anchor rows [a0, a1)
// (-inf when row i has no other row, N = 1), +inf elsewhere.
template <typename T, typename LseOf>
at::Tensor anchor_lse(int64_t n, int64_t a0, int64_t a1, const LseOf& lse_of) {
  at::Tensor lse = at::empty({n}, c10::CppTypeToScalarType<T>::value);
  T* out = lse.data_ptr<T>();
  for (int64_t i = 0; i < n; ++i)
    out[i] = (i < a0 || i >= a1) ? std::numeric_limits<T>::infinity()  // exp(s - lse) = 0
                                 : static_cast<T>(lse_of(i));
  return lse;
}

// The forward with the fixed shift: row and column sums of e = exp(s − b).
// Sums are merged in double (one add per tile pair and row).
template <typename T>
at::Tensor row_logsumexp_fixed(const at::Tensor& u, T inv_tau, T shift, int64_t a0, int64_t a1) {
  const int64_t n = u.size(0);
  std::vector<double> sums(n, 0.0);
  // A slot holds one tile pair's row sums and column sums (2 KiB in float32).
  constexpr int64_t kSlotSize = 2 * kTile;
  const int64_t slots = tile_slots(n, a0, a1, kForwardSlotsPerThread);
  std::vector<T> slot_sums(static_cast<size_t>(slots * kSlotSize));
  const FixedShiftTiles<T> tile_fns;
  run_tiles<T>(
      u, a0, a1, slots,
      [&](at::Tensor& s, const Tile& t, int64_t slot) {
        T* st = slot_sums.data() + slot * kSlotSize;
        tile_fns.forward(s.data_ptr<T>(), t.ni, t.nk, inv_tau, shift, t.diagonal(), st,
                         st + kTile);
      },
      [&](const Tile& t, int64_t slot) {
        const T* st = slot_sums.data() + slot * kSlotSize;
        for (int64_t r = 0; r < t.ni; ++r) sums[t.i0 + r] += st[r];
        if (t.diagonal()) return;  // a diagonal tile's columns are its rows, already added
        for (int64_t c = 0; c < t.nk; ++c) sums[t.k0 + c] += st[kTile + c];
      });
  return anchor_lse<T>(n, a0, a1, [&](int64_t i) { return shift + std::log(sums[i]); });
}

// The forward without the fixed shift: an online (max, sum) per row and column.
template <typename T>
at::Tensor row_logsumexp_online(const at::Tensor& u, T inv_tau, int64_t a0, int64_t a1) {
  const int64_t n = u.size(0);
  std::vector<T> stat_m(n, kNegInf<T>), stat_s(n, T(0));
  // A slot holds one tile pair's row max, row sum, column max, column sum.
  constexpr int64_t kSlotSize = 4 * kTile;
  const int64_t slots = tile_slots(n, a0, a1, kForwardSlotsPerThread);
  std::vector<T> slot_stats(static_cast<size_t>(slots * kSlotSize));
  std::vector<std::vector<T>> col_tmp(num_threads(), std::vector<T>(2 * kTile));
  run_tiles<T>(
      u, a0, a1, slots,
      [&](at::Tensor& s, const Tile& t, int64_t slot) {
        T* st = slot_stats.data() + slot * kSlotSize;
        std::fill(st, st + kTile, kNegInf<T>);
        std::fill(st + kTile, st + 2 * kTile, T(0));
        std::fill(st + 2 * kTile, st + 3 * kTile, kNegInf<T>);
        std::fill(st + 3 * kTile, st + 4 * kTile, T(0));
        forward_tile<T>(s.data_ptr<T>(), t.ni, t.nk, inv_tau, t.diagonal(), st, st + kTile,
                        st + 2 * kTile, st + 3 * kTile, col_tmp[at::get_thread_num()].data());
      },
      [&](const Tile& t, int64_t slot) {
        const T* st = slot_stats.data() + slot * kSlotSize;
        for (int64_t r = 0; r < t.ni; ++r)
          lse_merge(stat_m[t.i0 + r], stat_s[t.i0 + r], st[r], st[kTile + r]);
        if (t.diagonal()) return;  // a diagonal tile's columns are its rows, already merged
        for (int64_t c = 0; c < t.nk; ++c)
          lse_merge(stat_m[t.k0 + c], stat_s[t.k0 + c], st[2 * kTile + c], st[3 * kTile + c]);
      });
  return anchor_lse<T>(n, a0, a1, [&](int64_t i) { return stat_m[i] + std::log(stat_s[i]); });
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& z, const GraphArgs& g,
                                                double temperature, bool normalize, int64_t a0,
                                                int64_t a1) {
  const int64_t n = z.size(0), d = z.size(1);
  const T inv_tau = static_cast<T>(1.0 / temperature);
  at::Tensor u = embeddings_for_kernel<T>(z, normalize);
  const FixedShift<T> shift(u, inv_tau);
  at::Tensor lse = shift.fixed ? row_logsumexp_fixed<T>(u, inv_tau, shift.b, a0, a1)
                               : row_logsumexp_online<T>(u, inv_tau, a0, a1);

  // Positive term: <u_i, (G u)_i> / (τ W_i).
  at::Tensor q = at::zeros_like(u);
  graph_spmm<T>(g, u.data_ptr<T>(), nullptr, q.data_ptr<T>(), n, d, /*transpose=*/false);
  at::Tensor loss = at::empty({n}, u.options());
  const T* up = u.data_ptr<T>();
  const T* qp = q.data_ptr<T>();
  const T* lp = lse.data_ptr<T>();
  const double* wp = g.pos_weight.data_ptr<double>();
  T* out = loss.data_ptr<T>();
  parallel_for_dynamic(n, kRowsPerUnit, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (!(wp[i] > 0) || i < a0 || i >= a1) {
        out[i] = 0;
        continue;
      }
      T dot = 0;
      for (int64_t k = 0; k < d; ++k) dot += up[i * d + k] * qp[i * d + k];
      out[i] = lp[i] - dot * inv_tau / static_cast<T>(wp[i]);
    }
  });
  return {loss, lse};
}

template <typename T>
at::Tensor backward_impl(const at::Tensor& grad_rows, const at::Tensor& z, const GraphArgs& g,
                         const at::Tensor& lse_in, double temperature, bool normalize, int64_t a0,
                         int64_t a1) {
  const int64_t n = z.size(0), d = z.size(1);
  const T inv_tau = static_cast<T>(1.0 / temperature);
  at::Tensor u = embeddings_for_kernel<T>(z, normalize);
  at::Tensor lse = lse_in.contiguous();
  const at::Tensor grad_c = grad_rows.contiguous();
  // Rows without positives, and rows that are not anchors, carry no loss,
  // whatever grad_rows says. c_i = g_i / W_i weighs the positive term.
  const double* wp = g.pos_weight.data_ptr<double>();
  std::vector<T> gr(n), c(n);
  for (int64_t i = 0; i < n; ++i) {
    const bool loss_row = i >= a0 && i < a1 && wp[i] > 0;
    gr[i] = loss_row ? grad_c.data_ptr<T>()[i] : T(0);
    c[i] = gr[i] != 0 ? gr[i] / static_cast<T>(wp[i]) : T(0);
  }
  const T* gp = gr.data();
  const T* lp = lse.data_ptr<T>();
  // With the fixed shift, g_i p_ik = e_ik a_i, a_i = g_i exp(b − lse_i): one
  // exponential per element. a_i is finite whenever lse comes from the forward
  // (exp(b − lse_i) = 1 / Σ_k e_ik ≤ exp(kFixedShiftSpan<T>)); if it is not
  // (another lse, or a huge g_i), the online tiles take over.
  const FixedShift<T> shift(u, inv_tau);
  const FixedShiftTiles<T> tile_fns;
  bool fixed = shift.fixed;
  std::vector<T> a(fixed ? n : 0);
  for (int64_t i = 0; i < n && fixed; ++i) {
    a[i] = gp[i] == 0 ? T(0)
                      : static_cast<T>(gp[i] * std::exp(static_cast<double>(shift.b) - lp[i]));
    fixed = std::isfinite(a[i]);
  }

  at::Tensor du = at::zeros({n, d}, u.options());
  // A slot holds one tile pair's contribution to its rows (M u_K) and to its
  // columns (Mᵀ u_I), until it is added into du in tile-pair order.
  const int64_t slots = tile_slots(n, a0, a1, kSlotsPerThread);
  at::Tensor slot_grads = at::empty({slots, 2, kTile, d}, u.options());
  T* dp = du.data_ptr<T>();
  const T* sp = slot_grads.data_ptr<T>();
  auto add_rows = [&](int64_t r0, int64_t nr, const T* src) {
    T* dst = dp + r0 * d;
    for (int64_t e = 0; e < nr * d; ++e) dst[e] += src[e];
  };
  run_tiles<T>(
      u, a0, a1, slots,
      [&](at::Tensor& m, const Tile& t, int64_t slot) {
        if (fixed)
          tile_fns.backward(m.data_ptr<T>(), t.ni, t.nk, inv_tau, shift.b, t.diagonal(),
                            a.data() + t.i0, a.data() + t.k0);
        else
          backward_tile<T>(m.data_ptr<T>(), t.ni, t.nk, inv_tau, t.diagonal(), gp + t.i0,
                           lp + t.i0, gp + t.k0, lp + t.k0);
        const at::Tensor ui = u.narrow(0, t.i0, t.ni), uk = u.narrow(0, t.k0, t.nk);
        at::Tensor rows = slot_grads[slot][0].narrow(0, 0, t.ni);
        at::mm_out(rows, m, uk);
        if (t.diagonal()) return;  // M of a diagonal tile is symmetric: its rows are its columns
        at::Tensor cols = slot_grads[slot][1].narrow(0, 0, t.nk);
        at::mm_out(cols, m.t(), ui);
      },
      [&](const Tile& t, int64_t slot) {
        const T* src = sp + slot * 2 * kTile * d;
        add_rows(t.i0, t.ni, src);
        if (!t.diagonal()) add_rows(t.k0, t.nk, src + kTile * d);
      });

  // Positive term: − c ∘ (G u) − Gᵀ (c ∘ u), then the 1/τ, then (when
  // normalising) back through u = z / max(‖z‖, eps): project out the radial
  // part, or plain 1/eps when clamped. One row loop after the two SpMMs.
  at::Tensor gu = at::zeros_like(u), gtcu = at::zeros_like(u);
  graph_spmm<T>(g, u.data_ptr<T>(), nullptr, gu.data_ptr<T>(), n, d, /*transpose=*/false);
  graph_spmm<T>(g, u.data_ptr<T>(), c.data(), gtcu.data_ptr<T>(), n, d, /*transpose=*/true);
  const at::Tensor x = normalize ? z.to(u.scalar_type()).contiguous() : u;
  const T* up = u.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  const T* p1 = gu.data_ptr<T>();
  const T* p2 = gtcu.data_ptr<T>();
  const T floor = static_cast<T>(kNormFloor);
  parallel_for_dynamic(n, kRowsPerUnit, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* di = dp + i * d;
      const int64_t o = i * d;
      for (int64_t k = 0; k < d; ++k) di[k] = (di[k] - (c[i] * p1[o + k] + p2[o + k])) * inv_tau;
      if (!normalize) continue;
      const T norm = row_norm(xp + o, d);
      if (norm > floor) {
        T radial = 0;
        for (int64_t k = 0; k < d; ++k) radial += up[o + k] * di[k];
        for (int64_t k = 0; k < d; ++k) di[k] = (di[k] - up[o + k] * radial) / norm;
      } else {
        for (int64_t k = 0; k < d; ++k) di[k] /= floor;
      }
    }
  });
  return grad_in_dtype(du, z.scalar_type());
}

// The kernels behind the entry points of csrc/info_nce.h (which check the arguments).
std::tuple<at::Tensor, at::Tensor> info_nce_cpu(const at::Tensor& z, const GraphArgs& g,
                                                double temperature, bool normalize,
                                                int64_t anchor_begin, int64_t anchor_end) {
  if (z.scalar_type() == at::kDouble)
    return forward_impl<double>(z, g, temperature, normalize, anchor_begin, anchor_end);
  return forward_impl<float>(z, g, temperature, normalize, anchor_begin, anchor_end);
}

at::Tensor info_nce_backward_cpu(const at::Tensor& grad_rows, const at::Tensor& z,
                                 const GraphArgs& g, const at::Tensor& lse, double temperature,
                                 bool normalize, int64_t anchor_begin, int64_t anchor_end) {
  if (z.scalar_type() == at::kDouble)
    return backward_impl<double>(grad_rows, z, g, lse, temperature, normalize, anchor_begin,
                                 anchor_end);
  return backward_impl<float>(grad_rows, z, g, lse, temperature, normalize, anchor_begin,
                              anchor_end);
}

}  // namespace

TORCH_LIBRARY_IMPL(palfast, CPU, m) {
  m.impl("info_nce", &info_nce_entry<&info_nce_cpu>);
  m.impl("info_nce_backward", &info_nce_backward_entry<&info_nce_backward_cpu>);
}

}  // namespace palfast::cpu
