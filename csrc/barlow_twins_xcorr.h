// palfast::barlow_twins_xcorr — shape contract.
//
// The Barlow Twins objective of the graph cross-correlation of column-
// standardised embeddings; palfast.functional.barlow_twins standardises z and
// calls it (the op is not the whole loss, hence the name).
//
//   barlow_twins_xcorr(zhat [N, D], graph, lambd, scale, gram) -> (loss 0-dim, aux)
//     C = scale · ẑᵀ G ẑ;  loss = Σ_k (1 − C_kk)² + lambd Σ_{k≠l} C_kl²
//   gram=true (the caller's choice, palfast/_ops.py barlow_twins_xcorr_uses_gram):
//     ‖ẑᵀGẑ‖² = Σ (K ⊙ G K Gᵀ), K = ẑ ẑᵀ, with G K Gᵀ from two SpMMs over K's rows
//     (one N²·D GEMM in all, instead of two); aux = [K, G K Gᵀ]  [2, N, N].
//   gram=false: C itself, diagonal zeroed; aux [1, D, D].
//   backward(grad 0-dim, zhat, graph, aux, lambd, scale, gram) -> dẑ, ẑ's dtype.
// Accumulates in float32 (float64 for float64 zhat).
#pragma once

#include <cmath>

#include "graph.h"

namespace palfast {

inline void check_barlow_twins_xcorr(const char* op, const at::Tensor& zhat, const GraphArgs& g,
                                     double lambd, double scale) {
  check_embeddings(op, zhat);
  check_graph(op, g, zhat);
  PALFAST_CHECK(std::isfinite(lambd) && lambd >= 0, op,
                ": lambd must be a finite number >= 0, got ", lambd);
  PALFAST_CHECK(std::isfinite(scale) && scale > 0, op,
                ": scale (1/|G|) must be a finite number > 0, got ", scale);
}

}  // namespace palfast
