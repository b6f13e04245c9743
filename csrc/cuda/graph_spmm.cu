// palfast::graph_spmm on CUDA: the op around graph_spmm_cuda.cuh (out = G·x or Gᵀ·x).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../graph_spmm.h"
#include "graph_spmm_cuda.cuh"

namespace palfast::cuda {
namespace {

// The kernels behind graph_spmm_entry (csrc/graph_spmm.h, which checks the arguments).
void graph_spmm_cuda(const char* op, const GraphArgs& g, const at::Tensor& xa, at::Tensor& out,
                     bool transpose) {
  const c10::cuda::CUDAGuard guard(xa.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(xa.scalar_type(), "graph_spmm_cuda", [&] {
    graph_spmm<scalar_t, scalar_t>(op, g, xa.data_ptr<scalar_t>(), nullptr,
                                   out.data_ptr<scalar_t>(), xa.size(0), xa.size(1), transpose,
                                   stream);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(palfast, CUDA, m) { m.impl("graph_spmm", &graph_spmm_entry<&graph_spmm_cuda>); }

}  // namespace palfast::cuda
