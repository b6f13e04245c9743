// palfast::barlow_twins_xcorr: device-generic host code (contract:
// csrc/barlow_twins_xcorr.h).
//
// All its work is GEMMs (ATen's: MKL/OpenBLAS on the CPU, cuBLAS on CUDA),
// O(N·D) elementwise passes, and products with the graph, which go through the
// dispatcher to palfast::graph_spmm (CPU and CUDA kernels of their own). So
// one implementation serves every device: it is registered for
// CompositeExplicitAutograd, below autograd (palfast/_ops.py registers the
// autograd formula and the fake kernel). When N < D it works on N×N Gram
// matrices instead of the D×D cross-correlation (csrc/sq_xcorr.cpp explains why).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "barlow_twins_xcorr.h"
#include "gram.h"

namespace palfast {
namespace {

using SpmmFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&, c10::ArrayRef<double>,
                          c10::ArrayRef<int64_t>, const at::Tensor&, bool);

// G·x (Gᵀ·x) through the dispatcher, so the device's own SpMM kernel runs.
at::Tensor spmm(const at::Tensor& x, const GraphArgs& g, bool transpose) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("palfast::graph_spmm", "")
                             .typed<SpmmFn>();
  return op.call(x, g.indptr, g.indices, g.weights, g.t_indptr, g.t_indices, g.t_weights,
                 g.labels, g.label_weights, g.label_classes, g.pos_weight, transpose);
}

std::tuple<at::Tensor, at::Tensor> barlow_twins_xcorr(
    const at::Tensor& zhat, const at::Tensor& indptr, const at::Tensor& indices,
    const at::Tensor& weights, const at::Tensor& t_indptr, const at::Tensor& t_indices,
    const at::Tensor& t_weights, const at::Tensor& labels, at::ArrayRef<double> label_weights,
    at::ArrayRef<int64_t> label_classes, const at::Tensor& pos_weight, double lambd,
    double scale, bool gram) {
  const GraphArgs g = make_graph_args(indptr, indices, weights, t_indptr, t_indices, t_weights,
                                      labels, label_weights, label_classes, pos_weight);
  check_barlow_twins_xcorr("palfast.barlow_twins_xcorr", zhat, g, lambd, scale);
  const at::Tensor z = zhat.to(acc_dtype(zhat)).contiguous();
  const int64_t n = z.size(0);
  const at::Tensor y = spmm(z, g, /*transpose=*/false);  // G ẑ
  const at::Tensor c = (z * y).sum(0).mul_(scale);      // C_kk, O(N·D)
  at::Tensor loss = (1 - c).square().sum();
  if (gram) {
    // ‖ẑᵀGẑ‖² = <K, G K Gᵀ>, K = ẑẑᵀ; G K Gᵀ = G (G K)ᵀ as K is symmetric.
    at::Tensor aux = at::empty({2, n, n}, z.options());
    const at::Tensor k = aux[0];
    gram_out(k, z);
    aux[1].copy_(spmm(spmm(k, g, false).t().contiguous(), g, false));
    const at::Tensor off = (k * aux[1]).sum().mul_(scale * scale) - c.square().sum();
    loss = loss + lambd * off;
    return {loss, aux};
  }
  at::Tensor cc = at::mm(z.t(), y).mul_(scale);
  cc.diagonal().zero_();  // exact off-diagonal sum, even when C ≈ I
  loss = loss + lambd * cc.square().sum();
  return {loss, cc.unsqueeze(0)};
}

at::Tensor barlow_twins_xcorr_backward(
    const at::Tensor& grad, const at::Tensor& zhat, const at::Tensor& indptr,
    const at::Tensor& indices, const at::Tensor& weights, const at::Tensor& t_indptr,
    const at::Tensor& t_indices, const at::Tensor& t_weights, const at::Tensor& labels,
    at::ArrayRef<double> label_weights, at::ArrayRef<int64_t> label_classes,
    const at::Tensor& pos_weight, const at::Tensor& aux, double lambd, double scale, bool gram) {
  const char* op = "palfast.barlow_twins_xcorr_backward";
  const GraphArgs g = make_graph_args(indptr, indices, weights, t_indptr, t_indices, t_weights,
                                      labels, label_weights, label_classes, pos_weight);
  check_barlow_twins_xcorr(op, zhat, g, lambd, scale);
  check_scalar_grad(op, grad, zhat);
  const at::Tensor z = zhat.to(acc_dtype(zhat)).contiguous();
  const int64_t n = z.size(0), d = z.size(1);
  const int64_t want0 = gram ? 2 : 1, want1 = gram ? n : d;
  PALFAST_CHECK(aux.dim() == 3 && aux.size(0) == want0 && aux.size(1) == want1 &&
                    aux.size(2) == want1 && aux.scalar_type() == z.scalar_type(),
                op, ": aux must be the [", want0, ", ", want1, ", ", want1, "] ", z.scalar_type(),
                " tensor returned by barlow_twins_xcorr with gram=", gram ? "True" : "False",
                ", got ", aux.sizes(), " ", aux.scalar_type());
  const at::Tensor y = spmm(z, g, false);
  const at::Tensor c = (z * y).sum(0).mul_(scale);
  const at::Tensor h = (c - 1).mul_(2);  // ∂/∂C_kk of Σ (1 − C_kk)²
  at::Tensor dz;
  if (gram) {
    // ∂/∂ẑ of scale²<K, G K Gᵀ> is 2 scale² (G K Gᵀ + Gᵀ K G) ẑ; the diagonal
    // terms enter through C_kk = scale Σ_i ẑ_ik (Gẑ)_ik.
    const at::Tensor k = aux[0], gkg = aux[1];
    at::Tensor m = spmm(spmm(k, g, true).t().contiguous(), g, true);  // Gᵀ K G
    m.add_(gkg);
    dz = at::mm(m, z).mul_(2 * lambd * scale * scale);
    m.reset();
    at::Tensor t = spmm(z, g, true);  // (Gẑ + Gᵀẑ) ∘ h, h_k = ∂(diagonal terms)/∂C_kk
    t.add_(y).mul_((h - c * (2 * lambd)).mul_(scale));
    dz.add_(t);
  } else {
    at::Tensor dc = aux[0].mul(2 * lambd);  // aux has a zero diagonal
    dc.diagonal().copy_(h);
    dz = at::mm(y, dc.t()).mul_(scale);
    dz.add_(spmm(at::mm(z, dc).mul_(scale), g, true));
  }
  return dz.mul_(grad.to(dz.scalar_type())).to(zhat.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(palfast, CompositeExplicitAutograd, m) {
  m.impl("barlow_twins_xcorr", &barlow_twins_xcorr);
  m.impl("barlow_twins_xcorr_backward", &barlow_twins_xcorr_backward);
}

}  // namespace palfast
