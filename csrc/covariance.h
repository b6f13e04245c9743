// The covariance-loss ops (SPEC §3.2–3.4, PAL's VIC²): shape contracts and checks.
//
// graph_spmm(x [N, D], graph, transpose) -> G·x (Gᵀ·x when transpose), x's dtype.
//     The graph enters every covariance loss through this product: CSR rows plus
//     per-class sums, never a dense N×N G.
// graph_dirichlet(z [N, D], graph) -> Σ_ij w_ij ‖z_i − z_j‖²  (0-dim, acc dtype)
//     computed from differences (CSR edges) and within-class scatter
//     (label sets: Σ_{i≠j∈c} ‖z_i − z_j‖² = 2 n_c Σ_{i∈c} ‖z_i − μ_c‖²), so there
//     is no cancellation when positives are close (the regime SSL converges to).
//   backward: dz_i = g·[2 Σ_j w_ij (z_i − z_j) + 2 Σ_j w_ji (z_i − z_j)]
// sq_xcorr(p [M, a], q [M, b] or None (= p), offdiag) -> (value 0-dim, aux)
//     value = Σ_kl (pᵀq)_kl² − [offdiag] Σ_k (pᵀq)_kk²  (offdiag needs a = b)
//     computed on the cheaper side: the a×b product C = pᵀq, or the M×M Gram
//     matrices, ‖pᵀq‖_F² = Σ (p pᵀ ⊙ q qᵀ). aux is what backward needs:
//     Gram side [1 or 2, M, M] (p pᵀ, and q qᵀ unless q is None), else [1, a, b]
//     (C with its diagonal zeroed when offdiag).
// barlow_twins(zhat [N, D] column-standardised, graph, lambd, scale) -> (loss, aux)
//     C = scale · ẑᵀ G ẑ; loss = Σ_k (1 − C_kk)² + lambd Σ_{k≠l} C_kl².
//     N < D: ‖ẑᵀGẑ‖² = Σ (K ⊙ G K Gᵀ), K = ẑ ẑᵀ, with G K Gᵀ from two SpMMs
//     over K's rows (one N²·D GEMM in all, instead of two); aux = [K, G K Gᵀ].
//     N ≥ D: C itself; aux = [C].
// All accumulate in float32 (float64 for float64 inputs) and return acc-dtype
// scalars; gradients come back in the inputs' dtypes.
#pragma once

#include <cmath>

#include "graph.h"

namespace palfast {

inline at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_matrix(const char* op, const char* name, const at::Tensor& x) {
  PALFAST_CHECK(x.dim() == 2, op, ": ", name, " must be a 2-D tensor, got shape ", x.sizes());
  PALFAST_CHECK_TYPE(is_float_dtype(x.scalar_type()), op, ": ", name,
                     " must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
}

inline void check_scalar_grad(const char* op, const at::Tensor& grad, const at::Tensor& like) {
  PALFAST_CHECK(grad.dim() == 0, op, ": grad must be a 0-dim tensor, got shape ", grad.sizes());
  check_same_device(op, "grad", grad, like);
}

// Which side sq_xcorr computes on (the fake kernel in palfast/_ops.py mirrors it).
// FLOPs of forward + backward: Gram 2·M²·(a + b) (self: 2·M²·a), product 3·M·a·b
// (self: 2·M·a²).
inline bool sq_xcorr_use_gram(int64_t m, int64_t a, int64_t b, bool self) {
  return self ? m < a : 2 * m * (a + b) < 3 * a * b;
}

inline void check_sq_xcorr(const char* op, const at::Tensor& p, const c10::optional<at::Tensor>& q,
                           bool offdiag) {
  check_matrix(op, "p", p);
  if (q.has_value()) {
    check_matrix(op, "q", *q);
    check_same_device(op, "q", *q, p);
    PALFAST_CHECK(q->size(0) == p.size(0), op, ": q must have as many rows as p (", p.size(0),
                  "), got shape ", q->sizes());
    PALFAST_CHECK(!offdiag || q->size(1) == p.size(1), op,
                  ": offdiag needs square pᵀq, so q must have ", p.size(1),
                  " columns like p, got shape ", q->sizes());
  }
}

inline void check_barlow_twins(const char* op, const at::Tensor& zhat, const GraphArgs& g,
                               double lambd, double scale) {
  check_embeddings(op, zhat);
  check_graph(op, g, zhat);
  PALFAST_CHECK(std::isfinite(lambd) && lambd >= 0, op,
                ": lambd must be a finite number >= 0, got ", lambd);
  PALFAST_CHECK(std::isfinite(scale) && scale > 0, op,
                ": scale (1/|G|) must be a finite number > 0, got ", scale);
}

inline bool barlow_use_gram(int64_t n, int64_t d) { return n < d; }

}  // namespace palfast
