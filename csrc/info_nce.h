// palfast::info_nce — shape contract and argument checks (docs/api.md, "info_nce").
//
//   z [N, D] float32/float64/float16/bfloat16, graph over N rows.
//   forward  -> loss_rows [N], lse [N]  (float64 when z is float64, else float32)
//   backward(grad_rows [N]) -> grad_z [N, D] (z's dtype)
//
//   s_ij = <u_i, u_j> / temperature,  u = normalize ? z / max(|z|, kNormFloor) : z
//   lse_i = log Σ_{k≠i} exp(s_ik)
//   loss_i = lse_i − (1/W_i) Σ_{j≠i} w_ij s_ij   (0 when W_i = 0)
//   for anchor rows i in [anchor_begin, anchor_end); other rows: loss 0, lse +inf.
#pragma once

#include <cmath>
#include <tuple>

#include "graph.h"

namespace palfast {

// The normalisation floor: u_i = z_i / max(‖z_i‖, kNormFloor), so an all-zero
// row gives u_i = 0 instead of 0/0; 1e-12 is torch.nn.functional.normalize's eps,
// so palfast.reference (which calls it) agrees. Used by the CPU and CUDA kernels.
constexpr double kNormFloor = 1e-12;

// float16's largest finite value: gradients beyond it saturate (grad_in_dtype).
constexpr double kHalfMax = 65504.0;

inline at::ScalarType info_nce_acc_dtype(const at::Tensor& z) {
  return z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The gradient in z's dtype. A row with ‖z_i‖ <= kNormFloor gets du_i / kNormFloor (as
// torch.nn.functional.normalize), which is beyond float16's range: saturate it to
// the largest finite value rather than return inf (NaN stays NaN).
inline at::Tensor grad_in_dtype(const at::Tensor& du, at::ScalarType dtype) {
  if (dtype == at::kHalf) return du.clamp(-kHalfMax, kHalfMax).to(dtype);
  return du.to(dtype);
}

inline void check_info_nce(const char* op, const at::Tensor& z, const GraphArgs& g,
                           double temperature, int64_t anchor_begin, int64_t anchor_end) {
  check_embeddings(op, z);
  check_graph(op, g, z);
  PALFAST_CHECK(std::isfinite(temperature) && temperature > 0, op,
                ": temperature must be a finite number > 0, got ", temperature);
  PALFAST_CHECK(0 <= anchor_begin && anchor_begin <= anchor_end && anchor_end <= z.size(0), op,
                ": anchor rows must satisfy 0 <= anchor_begin <= anchor_end <= N = ", z.size(0),
                ", got [", anchor_begin, ", ", anchor_end, ")");
}

inline void check_info_nce_backward(const char* op, const at::Tensor& grad_rows,
                                    const at::Tensor& z, const GraphArgs& g,
                                    const at::Tensor& lse, double temperature,
                                    int64_t anchor_begin, int64_t anchor_end) {
  check_info_nce(op, z, g, temperature, anchor_begin, anchor_end);
  check_1d(op, "lse", lse, info_nce_acc_dtype(z), z.size(0));
  check_1d(op, "grad_rows", grad_rows, info_nce_acc_dtype(z), z.size(0));
  check_same_device(op, "lse", lse, z);
  check_same_device(op, "grad_rows", grad_rows, z);
}

constexpr const char* kInfoNceOp = "palfast.info_nce";
constexpr const char* kInfoNceBackwardOp = "palfast.info_nce_backward";

// A device's kernels (info_nce_cpu / info_nce_cuda and their backward), called
// with arguments already checked.
using InfoNceImpl = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor& z, const GraphArgs& g,
                                                           double temperature, bool normalize,
                                                           int64_t anchor_begin,
                                                           int64_t anchor_end);
using InfoNceBackwardImpl = at::Tensor (*)(const at::Tensor& grad_rows, const at::Tensor& z,
                                           const GraphArgs& g, const at::Tensor& lse,
                                           double temperature, bool normalize,
                                           int64_t anchor_begin, int64_t anchor_end);

// The ops' entry points for every device (m.impl("info_nce", &info_nce_entry<...>)):
// the schema's flat arguments, the checks, then the device's kernels.
template <InfoNceImpl kImpl>
std::tuple<at::Tensor, at::Tensor> info_nce_entry(const at::Tensor& z, PALFAST_GRAPH_PARAMS,
                                                  double temperature, bool normalize,
                                                  int64_t anchor_begin, int64_t anchor_end) {
  const GraphArgs g = make_graph_args(PALFAST_GRAPH_NAMES);
  check_info_nce(kInfoNceOp, z, g, temperature, anchor_begin, anchor_end);
  return kImpl(z, g, temperature, normalize, anchor_begin, anchor_end);
}

template <InfoNceBackwardImpl kImpl>
at::Tensor info_nce_backward_entry(const at::Tensor& grad_rows, const at::Tensor& z,
                                   PALFAST_GRAPH_PARAMS, const at::Tensor& lse,
                                   double temperature, bool normalize, int64_t anchor_begin,
                                   int64_t anchor_end) {
  const GraphArgs g = make_graph_args(PALFAST_GRAPH_NAMES);
  check_info_nce_backward(kInfoNceBackwardOp, grad_rows, z, g, lse, temperature, anchor_begin,
                          anchor_end);
  return kImpl(grad_rows, z, g, lse, temperature, normalize, anchor_begin, anchor_end);
}

}  // namespace palfast
