// palfast::graph_spmm on CUDA: the op around graph_spmm.cuh (out = G·x or Gᵀ·x).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../graph_spmm.h"
#include "graph_spmm.cuh"

namespace palfast::cuda {
namespace {

at::Tensor graph_spmm_cuda(const at::Tensor& x, const at::Tensor& indptr,
                           const at::Tensor& indices, const at::Tensor& weights,
                           const at::Tensor& t_indptr, const at::Tensor& t_indices,
                           const at::Tensor& t_weights, const at::Tensor& labels,
                           at::ArrayRef<double> label_weights,
                           at::ArrayRef<int64_t> label_classes, const at::Tensor& pos_weight,
                           bool transpose) {
  const char* op = "palfast.graph_spmm";
  const GraphArgs g = make_graph_args(indptr, indices, weights, t_indptr, t_indices, t_weights,
                                      labels, label_weights, label_classes, pos_weight);
  check_matrix(op, "x", x);
  check_graph(op, g, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xa = x.to(acc_dtype(x)).contiguous();
  at::Tensor out = at::zeros_like(xa);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(xa.scalar_type(), "graph_spmm_cuda", [&] {
    graph_spmm<scalar_t, scalar_t>(op, g, xa.data_ptr<scalar_t>(), nullptr,
                                   out.data_ptr<scalar_t>(), xa.size(0), xa.size(1), transpose,
                                   stream);
  });
  return out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(palfast, CUDA, m) { m.impl("graph_spmm", &graph_spmm_cuda); }

}  // namespace palfast::cuda
