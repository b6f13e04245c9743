// palfast::graph_dirichlet — shape contract.
//
//   graph_dirichlet(z [N, D], graph) -> Σ_ij w_ij ‖z_i − z_j‖²  (0-dim, float32;
//       float64 for float64 z)
//   backward(grad 0-dim) -> dz_i = grad·[2 Σ_j w_ij (z_i − z_j) + 2 Σ_j w_ji (z_i − z_j)],
//       z's dtype.
//
// Computed from differences (CSR edges) and within-class scatter (label sets:
// Σ_{i≠j∈c} ‖z_i − z_j‖² = 2 n_c Σ_{i∈c} ‖z_i − μ_c‖²), so there is no
// cancellation when positives are close (the regime SSL converges to).
#pragma once

#include "graph.h"

namespace palfast {

inline GraphArgs checked_dirichlet_graph(
    const char* op, const at::Tensor& z, const at::Tensor& indptr, const at::Tensor& indices,
    const at::Tensor& weights, const at::Tensor& t_indptr, const at::Tensor& t_indices,
    const at::Tensor& t_weights, const at::Tensor& labels, at::ArrayRef<double> label_weights,
    at::ArrayRef<int64_t> label_classes, const at::Tensor& pos_weight) {
  GraphArgs g = make_graph_args(indptr, indices, weights, t_indptr, t_indices, t_weights, labels,
                                label_weights, label_classes, pos_weight);
  check_embeddings(op, z);
  check_graph(op, g, z);
  return g;
}

}  // namespace palfast
