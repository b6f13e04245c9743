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

// Arguments are checked by checked_graph (graph.h), as for every op taking z and a graph.
#include "graph.h"

namespace palfast {

// A device's kernels, on za = z in its accumulation dtype (contiguous) and a
// checked graph; op names the op in alerts. The forward returns the 0-dim sum,
// the backward d(grad · sum)/dza, both in za's dtype.
using GraphDirichletImpl = at::Tensor (*)(const char* op, const at::Tensor& za, const GraphArgs& g);
using GraphDirichletBackwardImpl = at::Tensor (*)(const char* op, const at::Tensor& grad,
                                                  const at::Tensor& za, const GraphArgs& g);

// The ops' entry points for every device (m.impl(..., &graph_dirichlet_entry<...>)).
template <GraphDirichletImpl kImpl>
at::Tensor graph_dirichlet_entry(const at::Tensor& z, PALFAST_GRAPH_PARAMS) {
  const char* op = "palfast.graph_dirichlet";
  const GraphArgs g = checked_graph(op, z, PALFAST_GRAPH_NAMES);
  return kImpl(op, z.to(acc_dtype(z)).contiguous(), g);
}

template <GraphDirichletBackwardImpl kImpl>
at::Tensor graph_dirichlet_backward_entry(const at::Tensor& grad, const at::Tensor& z,
                                          PALFAST_GRAPH_PARAMS) {
  const char* op = "palfast.graph_dirichlet_backward";
  const GraphArgs g = checked_graph(op, z, PALFAST_GRAPH_NAMES);
  check_scalar_grad(op, grad, z);
  return kImpl(op, grad, z.to(acc_dtype(z)).contiguous(), g).to(z.scalar_type());
}

}  // namespace palfast
