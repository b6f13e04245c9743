// palfast::graph_spmm on the CPU: the op around graph_spmm.h (out = G·x or Gᵀ·x).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../graph_spmm.h"
#include "graph_spmm.h"

namespace palfast::cpu {
namespace {

at::Tensor graph_spmm_cpu(const at::Tensor& x, const at::Tensor& indptr,
                          const at::Tensor& indices, const at::Tensor& weights,
                          const at::Tensor& t_indptr, const at::Tensor& t_indices,
                          const at::Tensor& t_weights, const at::Tensor& labels,
                          at::ArrayRef<double> label_weights, at::ArrayRef<int64_t> label_classes,
                          const at::Tensor& pos_weight, bool transpose) {
  const char* op = "palfast.graph_spmm";
  const GraphArgs g = make_graph_args(indptr, indices, weights, t_indptr, t_indices, t_weights,
                                      labels, label_weights, label_classes, pos_weight);
  check_graph_spmm(op, x, g);
  const at::Tensor xa = x.to(acc_dtype(x)).contiguous();
  at::Tensor out = at::zeros_like(xa);
  AT_DISPATCH_FLOATING_TYPES(xa.scalar_type(), "graph_spmm_cpu", [&] {
    graph_spmm<scalar_t>(g, xa.data_ptr<scalar_t>(), nullptr, out.data_ptr<scalar_t>(),
                         xa.size(0), xa.size(1), transpose);
  });
  return out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(palfast, CPU, m) { m.impl("graph_spmm", &graph_spmm_cpu); }

}  // namespace palfast::cpu
