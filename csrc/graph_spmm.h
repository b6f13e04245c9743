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

// A device's product: out (zeros, x's accumulation dtype) += G·xa (Gᵀ·xa when
// transpose), xa = x in that dtype, contiguous; op names the op in alerts.
using GraphSpmmImpl = void (*)(const char* op, const GraphArgs& g, const at::Tensor& xa,
                               at::Tensor& out, bool transpose);

// The op's entry point for every device (m.impl("graph_spmm", &graph_spmm_entry<...>)):
// the checks, then kImpl (graph_spmm_cpu, graph_spmm_cuda).
template <GraphSpmmImpl kImpl>
at::Tensor graph_spmm_entry(const at::Tensor& x, PALFAST_GRAPH_PARAMS, bool transpose) {
  const char* op = "palfast.graph_spmm";
  const GraphArgs g = make_graph_args(PALFAST_GRAPH_NAMES);
  check_graph_spmm(op, x, g);
  const at::Tensor xa = x.to(acc_dtype(x)).contiguous();
  at::Tensor out = at::zeros_like(xa);
  kImpl(op, g, xa, out, transpose);
  return out.to(x.scalar_type());
}

}  // namespace palfast
