// palfast::sq_xcorr and palfast::barlow_twins: device-generic host code.
//
// All their work is GEMMs (ATen's, i.e. MKL/OpenBLAS on the CPU and cuBLAS on
// CUDA), O(N·D) elementwise passes, and products with the graph, which go
// through the dispatcher to palfast::graph_spmm (CPU and CUDA kernels of their
// own). So one implementation serves every device: it is registered for
// CompositeExplicitAutograd, below autograd (palfast/_ops.py registers the
// autograd formulas and the fake kernels).
//
// The trick that makes these losses cheap when N < D (SPEC §3.2, the usual SSL
// regime: batch 2048, projector 8192): the squared Frobenius norm of a D×D
// cross-correlation equals that of products of N×N Gram matrices,
//   ‖pᵀq‖_F² = tr(pᵀq qᵀp) = Σ_ij (p pᵀ)_ij (q qᵀ)_ij,
// so forward and backward cost O(N²·D) instead of O(N·D²) and hold N×N, not
// D×D, matrices. The diagonal Σ_k (pᵀq)_kk² is O(N·D) on its own.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>

#include "covariance.h"

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

// x xᵀ into out [M, M]. K is symmetric, so only the block rows' parts on and
// right of the diagonal are multiplied (one GEMM per block row, about half the
// FLOPs of at::mm) and the strictly lower blocks are copied from their mirror.
void gram_out(at::Tensor out, const at::Tensor& x) {
  constexpr int64_t kBlock = 512;
  const int64_t m = x.size(0);
  if (m <= kBlock) {
    at::mm_out(out, x, x.t());
    return;
  }
  for (int64_t i0 = 0; i0 < m; i0 += kBlock) {
    const int64_t ni = std::min(kBlock, m - i0);
    at::Tensor right = out.narrow(0, i0, ni).narrow(1, i0, m - i0);
    at::mm_out(right, x.narrow(0, i0, ni), x.narrow(0, i0, m - i0).t());
  }
  for (int64_t i0 = 0; i0 + kBlock < m; i0 += kBlock) {
    const int64_t ni = std::min(kBlock, m - i0), rest = m - i0 - ni;
    out.narrow(0, i0 + ni, rest).narrow(1, i0, ni).copy_(
        out.narrow(0, i0, ni).narrow(1, i0 + ni, rest).t());
  }
}

// ------------------------------------------------------------------ sq_xcorr
at::ScalarType pair_acc(const at::Tensor& p, const c10::optional<at::Tensor>& q) {
  if (acc_dtype(p) == at::kDouble || (q.has_value() && acc_dtype(*q) == at::kDouble))
    return at::kDouble;
  return at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> sq_xcorr(const at::Tensor& p_in,
                                            const c10::optional<at::Tensor>& q_in,
                                            bool offdiag) {
  check_sq_xcorr("palfast.sq_xcorr", p_in, q_in, offdiag);
  const bool self = !q_in.has_value();
  const auto acc = pair_acc(p_in, q_in);
  const at::Tensor p = p_in.to(acc);
  const at::Tensor q = self ? p : q_in->to(acc);
  const int64_t m = p.size(0), a = p.size(1), b = q.size(1);
  if (sq_xcorr_use_gram(m, a, b, self)) {
    at::Tensor aux = at::empty({self ? 1 : 2, m, m}, p.options());
    gram_out(aux[0], p);
    if (!self) gram_out(aux[1], q);
    at::Tensor value = (aux[0] * aux[aux.size(0) - 1]).sum();
    // Σ_k C_kk² with C_kk = Σ_i p_ik q_ik: O(M·a), no a×b matrix.
    if (offdiag) value = value - (p * q).sum(0).square().sum();
    return {value, aux};
  }
  at::Tensor c = at::mm(p.t(), q);
  // Zeroing the diagonal (rather than subtracting Σ C_kk²) keeps the
  // off-diagonal sum exact when the diagonal dominates (a whitened batch).
  if (offdiag) c.diagonal().zero_();
  return {c.square().sum(), c.unsqueeze(0)};
}

std::tuple<at::Tensor, at::Tensor> sq_xcorr_backward(const at::Tensor& grad,
                                                     const at::Tensor& p_in,
                                                     const c10::optional<at::Tensor>& q_in,
                                                     const at::Tensor& aux, bool offdiag) {
  const char* op = "palfast.sq_xcorr_backward";
  check_sq_xcorr(op, p_in, q_in, offdiag);
  check_scalar_grad(op, grad, p_in);
  const bool self = !q_in.has_value();
  const auto acc = pair_acc(p_in, q_in);
  const at::Tensor p = p_in.to(acc);
  const at::Tensor q = self ? p : q_in->to(acc);
  const int64_t m = p.size(0), a = p.size(1), b = q.size(1);
  const bool gram = sq_xcorr_use_gram(m, a, b, self);
  const int64_t want0 = gram ? (self ? 1 : 2) : 1;
  const int64_t want1 = gram ? m : a, want2 = gram ? m : b;
  PALFAST_CHECK(aux.dim() == 3 && aux.size(0) == want0 && aux.size(1) == want1 &&
                    aux.size(2) == want2 && aux.scalar_type() == acc,
                op, ": aux must be the [", want0, ", ", want1, ", ", want2, "] ", acc,
                " tensor returned by sq_xcorr, got ", aux.sizes(), " ", aux.scalar_type());
  const at::Tensor g = grad.to(acc);
  at::Tensor dp, dq;
  if (gram && self) {  // v = ‖K‖² − Σ d², K = p pᵀ, d_k = Σ_i p_ik²
    dp = at::mm(aux[0], p);
    if (offdiag) dp.sub_(p * p.square().sum(0));
    dp.mul_(g * 4);
  } else if (gram) {  // v = <Kp, Kq> − Σ d², d_k = Σ_i p_ik q_ik
    dp = at::mm(aux[1], p);
    dq = at::mm(aux[0], q);
    if (offdiag) {
      const at::Tensor d = (p * q).sum(0);
      dp.sub_(q * d);
      dq.sub_(p * d);
    }
    dp.mul_(g * 2);
    dq.mul_(g * 2);
  } else if (self) {  // v = ‖C‖² (C symmetric, diagonal already zeroed when offdiag)
    dp = at::mm(p, aux[0]).mul_(g * 4);
  } else {
    dp = at::mm(q, aux[0].t()).mul_(g * 2);
    dq = at::mm(p, aux[0]).mul_(g * 2);
  }
  return {dp.to(p_in.scalar_type()),
          self ? at::empty({0}, p_in.options()) : dq.to(q_in->scalar_type())};
}

// -------------------------------------------------------------- barlow_twins
GraphArgs graph_args(const at::Tensor& indptr, const at::Tensor& indices,
                     const at::Tensor& weights, const at::Tensor& t_indptr,
                     const at::Tensor& t_indices, const at::Tensor& t_weights,
                     const at::Tensor& labels, at::ArrayRef<double> label_weights,
                     at::ArrayRef<int64_t> label_classes, const at::Tensor& pos_weight) {
  return make_graph_args(indptr, indices, weights, t_indptr, t_indices, t_weights, labels,
                         label_weights, label_classes, pos_weight);
}

std::tuple<at::Tensor, at::Tensor> barlow_twins(
    const at::Tensor& zhat, const at::Tensor& indptr, const at::Tensor& indices,
    const at::Tensor& weights, const at::Tensor& t_indptr, const at::Tensor& t_indices,
    const at::Tensor& t_weights, const at::Tensor& labels, at::ArrayRef<double> label_weights,
    at::ArrayRef<int64_t> label_classes, const at::Tensor& pos_weight, double lambd,
    double scale) {
  const GraphArgs g = graph_args(indptr, indices, weights, t_indptr, t_indices, t_weights, labels,
                                 label_weights, label_classes, pos_weight);
  check_barlow_twins("palfast.barlow_twins", zhat, g, lambd, scale);
  const at::Tensor z = zhat.to(acc_dtype(zhat)).contiguous();
  const int64_t n = z.size(0), d = z.size(1);
  const at::Tensor y = spmm(z, g, /*transpose=*/false);  // G ẑ
  const at::Tensor c = (z * y).sum(0).mul_(scale);      // C_kk, O(N·D)
  at::Tensor loss = (1 - c).square().sum();
  if (barlow_use_gram(n, d)) {
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

at::Tensor barlow_twins_backward(
    const at::Tensor& grad, const at::Tensor& zhat, const at::Tensor& indptr,
    const at::Tensor& indices, const at::Tensor& weights, const at::Tensor& t_indptr,
    const at::Tensor& t_indices, const at::Tensor& t_weights, const at::Tensor& labels,
    at::ArrayRef<double> label_weights, at::ArrayRef<int64_t> label_classes,
    const at::Tensor& pos_weight, const at::Tensor& aux, double lambd, double scale) {
  const char* op = "palfast.barlow_twins_backward";
  const GraphArgs g = graph_args(indptr, indices, weights, t_indptr, t_indices, t_weights, labels,
                                 label_weights, label_classes, pos_weight);
  check_barlow_twins(op, zhat, g, lambd, scale);
  check_scalar_grad(op, grad, zhat);
  const at::Tensor z = zhat.to(acc_dtype(zhat)).contiguous();
  const int64_t n = z.size(0), d = z.size(1);
  const bool gram = barlow_use_gram(n, d);
  const int64_t want0 = gram ? 2 : 1, want1 = gram ? n : d;
  PALFAST_CHECK(aux.dim() == 3 && aux.size(0) == want0 && aux.size(1) == want1 &&
                    aux.size(2) == want1 && aux.scalar_type() == z.scalar_type(),
                op, ": aux must be the [", want0, ", ", want1, ", ", want1, "] ",
                z.scalar_type(), " tensor returned by barlow_twins, got ", aux.sizes(), " ",
                aux.scalar_type());
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

// Composite: the same host code on every device (see the top of this file).
TORCH_LIBRARY_IMPL(palfast, CompositeExplicitAutograd, m) {
  m.impl("sq_xcorr", &sq_xcorr);
  m.impl("sq_xcorr_backward", &sq_xcorr_backward);
  m.impl("barlow_twins", &barlow_twins);
  m.impl("barlow_twins_backward", &barlow_twins_backward);
}

}  // namespace palfast
