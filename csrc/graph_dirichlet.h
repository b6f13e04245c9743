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
