// palfast::graph_spmm on the CPU: the op around graph_spmm_cpu.h (out = G·x or Gᵀ·x).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../graph_spmm.h"
#include "graph_spmm_cpu.h"

namespace palfast::cpu {
namespace {

// The kernel behind graph_spmm_entry (csrc/graph_spmm.h, which checks the arguments).
void graph_spmm_cpu(const char*, const GraphArgs& g, const at::Tensor& xa, at::Tensor& out,
                    bool transpose) {
  AT_DISPATCH_FLOATING_TYPES(xa.scalar_type(), "graph_spmm_cpu", [&] {
    graph_spmm<scalar_t>(g, xa.data_ptr<scalar_t>(), nullptr, out.data_ptr<scalar_t>(),
                         xa.size(0), xa.size(1), transpose);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(palfast, CPU, m) { m.impl("graph_spmm", &graph_spmm_entry<&graph_spmm_cpu>); }

}  // namespace palfast::cpu
