// palfast::graph_spmm — shape contract (docs: the graph as the kernels see it,
// csrc/graph.h).
//
//   graph_spmm(x [N, D], graph, transpose) -> G·x (Gᵀ·x when transpose), x's dtype.
//
// The graph enters every covariance loss through this product: CSR rows plus
// per-class sums, never a dense N×N G. Its gradient is the same op with the
// other side of the graph, so it has no backward op of its own.
#pragma once

#include "graph.h"

namespace palfast {

inline void check_graph_spmm(const char* op, const at::Tensor& x, const GraphArgs& g) {
  check_matrix(op, "x", x);
  check_graph(op, g, x);
}

}  // namespace palfast
