// palfast::sq_xcorr — shape contract.
//
//   sq_xcorr(p [M, a], q [M, b] or None (= p), offdiag, gram) -> (value 0-dim, aux)
//     value = Σ_kl (pᵀq)_kl² − [offdiag] Σ_k (pᵀq)_kk²  (offdiag needs a = b)
//   computed on the side the caller chose: gram=false, the a×b product C = pᵀq;
//   gram=true, the M×M Gram matrices, ‖pᵀq‖_F² = Σ (p pᵀ ⊙ q qᵀ). The choice is
//   made once, in Python (palfast/_ops.py, sq_xcorr_uses_gram), so the fake
//   kernels and the C++ cannot disagree about aux's shape:
//     gram:    aux [1 or 2, M, M] (p pᵀ, and q qᵀ unless q is None)
//     product: aux [1, a, b] (C with its diagonal zeroed when offdiag)
//   backward(grad 0-dim, p, q, aux, offdiag, gram) -> (dp, dq; dq empty when q is None)
// Accumulates in float32 (float64 when p or q is float64); gradients come back
// in the inputs' dtypes.
#pragma once

#include "checks.h"

namespace palfast {

inline at::ScalarType sq_xcorr_acc_dtype(const at::Tensor& p, const c10::optional<at::Tensor>& q) {
  if (acc_dtype(p) == at::kDouble || (q.has_value() && acc_dtype(*q) == at::kDouble))
    return at::kDouble;
  return at::kFloat;
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

// aux must be what sq_xcorr returned for these p, q and side.
inline void check_sq_xcorr_aux(const char* op, const at::Tensor& aux, const at::Tensor& p,
                               const c10::optional<at::Tensor>& q, bool gram) {
  const int64_t m = p.size(0), a = p.size(1), b = q.has_value() ? q->size(1) : a;
  const int64_t want0 = gram && q.has_value() ? 2 : 1;
  const int64_t want1 = gram ? m : a, want2 = gram ? m : b;
  const auto acc = sq_xcorr_acc_dtype(p, q);
  PALFAST_CHECK(aux.dim() == 3 && aux.size(0) == want0 && aux.size(1) == want1 &&
                    aux.size(2) == want2 && aux.scalar_type() == acc,
                op, ": aux must be the [", want0, ", ", want1, ", ", want2, "] ", acc,
                " tensor returned by sq_xcorr with gram=", gram ? "True" : "False", ", got ",
                aux.sizes(), " ", aux.scalar_type());
}

}  // namespace palfast
