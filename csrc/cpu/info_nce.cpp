// palfast::info_nce on the CPU: flash-style tiles, never an N×N matrix.
//
// Forward: the similarity matrix is visited in kTile×kTile tiles. s_ij is
// symmetric, so only tiles (I, K) with I ≤ K are computed (one GEMM each) and
// each tile updates the online log-sum-exp of its rows *and* of its columns.
//
// Backward: dL/du = (1/τ) M u − (1/τ) [c ∘ (G u) + Gᵀ (c ∘ u)], where
//   M_ik = g_i p_ik + g_k p_ki, p_ik = exp(s_ik − lse_i), c_i = g_i / W_i.
// M is symmetric, so again only tiles I ≤ K are recomputed; a tile adds M u_K
// to rows I and Mᵀ u_I to rows K.
//
// Scheduling (csrc/cpu/schedule.h, run_ordered): the tile pairs are handed out
// one at a time to whichever thread is free, so a core taken by another
// process costs its share of the tiles and no more. Each tile pair writes its
// partial (row and column (max, sum) in the forward, its [tile, D] row and
// column gradients in the backward) into a slot, and the slots are merged in
// tile-pair order: the result is bitwise the same whatever the schedule (which
// thread ran which tile, how long the OS paused it) and the thread count. Memory: O(N·D) outputs plus kSlotsPerThread slots per thread,
// i.e. O(N·D + threads·kTile·D) in the backward.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "../info_nce.h"
#include "graph_spmm.h"
#include "schedule.h"

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
struct TilePairs {
  std::vector<std::pair<int64_t, int64_t>> pairs;
  TilePairs(int64_t n, int64_t a0, int64_t a1) {
    const int64_t nb = (n + kTile - 1) / kTile;
    auto is_anchor_block = [&](int64_t b) { return b * kTile < a1 && (b + 1) * kTile > a0; };
    for (int64_t i = 0; i < nb; ++i)
      for (int64_t k = i; k < nb; ++k)
        if (is_anchor_block(i) || is_anchor_block(k)) pairs.emplace_back(i, k);
  }
};

// u = z (as T, contiguous), divided by max(‖z_i‖, kNormFloor) when normalising.
at::Tensor embeddings_for_kernel(const at::Tensor& z, at::ScalarType acc, bool normalize) {
  at::Tensor u = z.to(acc).contiguous();
  if (normalize) u = u / row_norms(u).clamp_min(kNormFloor);
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

// Per-row log Σ_{k≠i} exp(<u_i, u_k> / τ) for anchor rows [a0, a1), +inf elsewhere.
template <typename T>
at::Tensor row_logsumexp(const at::Tensor& u, T inv_tau, int64_t a0, int64_t a1) {
  const int64_t n = u.size(0);
  const TilePairs tiles(n, a0, a1);
  const int64_t units = static_cast<int64_t>(tiles.pairs.size());
  std::vector<T> stat_m(n, kNegInf<T>), stat_s(n, T(0));
  // A slot holds one tile pair's row max, row sum, column max, column sum.
  constexpr int64_t kSlotSize = 4 * kTile;
  std::vector<T> slot_stats(static_cast<size_t>(ordered_slots(units) * kSlotSize));
  const TileScratch scratch(u.options());
  std::vector<std::vector<T>> col_tmp(num_threads(), std::vector<T>(2 * kTile));

  auto compute = [&](int64_t unit, int64_t slot) {
    const auto [bi, bk] = tiles.pairs[unit];
    const int64_t i0 = bi * kTile, ni = std::min(kTile, n - i0);
    const int64_t k0 = bk * kTile, nk = std::min(kTile, n - k0);
    at::Tensor s = scratch.get(ni, nk);
    at::mm_out(s, u.narrow(0, i0, ni), u.narrow(0, k0, nk).t());
    T* st = slot_stats.data() + slot * kSlotSize;
    std::fill(st, st + kTile, kNegInf<T>);
    std::fill(st + kTile, st + 2 * kTile, T(0));
    std::fill(st + 2 * kTile, st + 3 * kTile, kNegInf<T>);
    std::fill(st + 3 * kTile, st + 4 * kTile, T(0));
    forward_tile<T>(s.data_ptr<T>(), ni, nk, inv_tau, bi == bk, st, st + kTile, st + 2 * kTile,
                    st + 3 * kTile, col_tmp[at::get_thread_num()].data());
  };
  auto apply = [&](int64_t unit, int64_t slot) {
    const auto [bi, bk] = tiles.pairs[unit];
    const int64_t i0 = bi * kTile, ni = std::min(kTile, n - i0);
    const int64_t k0 = bk * kTile, nk = std::min(kTile, n - k0);
    const T* st = slot_stats.data() + slot * kSlotSize;
    for (int64_t r = 0; r < ni; ++r) lse_merge(stat_m[i0 + r], stat_s[i0 + r], st[r], st[kTile + r]);
    if (bi == bk) return;  // a diagonal tile's columns are its rows, already merged
    for (int64_t c = 0; c < nk; ++c)
      lse_merge(stat_m[k0 + c], stat_s[k0 + c], st[2 * kTile + c], st[3 * kTile + c]);
  };
  run_ordered(units, compute, apply);

  at::Tensor lse = at::empty({n}, u.options());
  T* out = lse.data_ptr<T>();
  for (int64_t i = 0; i < n; ++i) {
    if (i < a0 || i >= a1) {
      out[i] = std::numeric_limits<T>::infinity();  // not an anchor: exp(s - lse) = 0
      continue;
    }
    out[i] = stat_m[i] + std::log(stat_s[i]);  // -inf when row i has no other row (N = 1)
  }
  return lse;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& z, const GraphArgs& g,
                                                double temperature, bool normalize, int64_t a0,
                                                int64_t a1) {
  const int64_t n = z.size(0), d = z.size(1);
  const T inv_tau = static_cast<T>(1.0 / temperature);
  at::Tensor u = embeddings_for_kernel(z, c10::CppTypeToScalarType<T>::value, normalize);
  at::Tensor lse = row_logsumexp<T>(u, inv_tau, a0, a1);

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
  at::Tensor u = embeddings_for_kernel(z, c10::CppTypeToScalarType<T>::value, normalize);
  at::Tensor lse = lse_in.contiguous();
  // Rows without positives, and rows that are not anchors, carry no loss,
  // whatever grad_rows says.
  at::Tensor is_anchor = at::zeros({n}, g.pos_weight.options().dtype(at::kBool));
  is_anchor.narrow(0, a0, a1 - a0).fill_(true);
  at::Tensor gr = at::where(is_anchor & (g.pos_weight > 0), grad_rows, at::zeros_like(grad_rows))
                      .contiguous();
  const T* gp = gr.data_ptr<T>();
  const T* lp = lse.data_ptr<T>();

  const TilePairs tiles(n, a0, a1);
  const int64_t units = static_cast<int64_t>(tiles.pairs.size());
  at::Tensor du = at::zeros({n, d}, u.options());
  // A slot holds one tile pair's contribution to its rows (M u_K) and to its
  // columns (Mᵀ u_I), until it is added into du in tile-pair order.
  at::Tensor slot_grads = at::empty({ordered_slots(units), 2, kTile, d}, u.options());
  const TileScratch scratch(u.options());

  auto compute = [&](int64_t unit, int64_t slot) {
    const auto [bi, bk] = tiles.pairs[unit];
    const int64_t i0 = bi * kTile, ni = std::min(kTile, n - i0);
    const int64_t k0 = bk * kTile, nk = std::min(kTile, n - k0);
    const at::Tensor ui = u.narrow(0, i0, ni), uk = u.narrow(0, k0, nk);
    at::Tensor m = scratch.get(ni, nk);
    at::mm_out(m, ui, uk.t());
    backward_tile<T>(m.data_ptr<T>(), ni, nk, inv_tau, bi == bk, gp + i0, lp + i0, gp + k0,
                     lp + k0);
    at::Tensor rows = slot_grads[slot][0].narrow(0, 0, ni);
    at::mm_out(rows, m, uk);
    if (bi == bk) return;  // M of a diagonal tile is symmetric: its rows are its columns
    at::Tensor cols = slot_grads[slot][1].narrow(0, 0, nk);
    at::mm_out(cols, m.t(), ui);
  };
  T* dp = du.data_ptr<T>();
  const T* sp = slot_grads.data_ptr<T>();
  auto add_rows = [&](int64_t r0, int64_t nr, const T* src) {
    T* dst = dp + r0 * d;
    for (int64_t e = 0; e < nr * d; ++e) dst[e] += src[e];
  };
  auto apply = [&](int64_t unit, int64_t slot) {
    const auto [bi, bk] = tiles.pairs[unit];
    const int64_t i0 = bi * kTile, ni = std::min(kTile, n - i0);
    const int64_t k0 = bk * kTile, nk = std::min(kTile, n - k0);
    const T* src = sp + slot * 2 * kTile * d;
    add_rows(i0, ni, src);
    if (bi != bk) add_rows(k0, nk, src + kTile * d);
  };
  run_ordered(units, compute, apply);

  // Positive term: − c ∘ (G u) − Gᵀ (c ∘ u), c_i = g_i / W_i.
  at::Tensor c = at::where(gr != 0, gr / g.pos_weight.to(gr.scalar_type()), at::zeros_like(gr))
                     .contiguous();
  at::Tensor pos = at::zeros_like(u);
  graph_spmm<T>(g, u.data_ptr<T>(), nullptr, pos.data_ptr<T>(), n, d, /*transpose=*/false);
  pos.mul_(c.unsqueeze(1));
  graph_spmm<T>(g, u.data_ptr<T>(), c.data_ptr<T>(), pos.data_ptr<T>(), n, d, /*transpose=*/true);
  du = (du - pos) * inv_tau;

  if (normalize) {
    // u = z / max(‖z‖, eps): project out the radial part, or plain 1/eps when clamped.
    at::Tensor norm = row_norms(z.to(u.scalar_type()));
    at::Tensor radial = du - u * (u * du).sum(1, true);
    du = at::where(norm > kNormFloor, radial / norm.clamp_min(kNormFloor), du / kNormFloor);
  }
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
