// palfast::sq_xcorr: device-generic host code (contract: csrc/sq_xcorr.h).
//
// All its work is GEMMs (ATen's: MKL/OpenBLAS on the CPU, cuBLAS on CUDA) and
// O(M·(a + b)) elementwise passes, so one implementation serves every device:
// it is registered for CompositeExplicitAutograd, below autograd
// (palfast/_ops.py registers the autograd formula and the fake kernel).
//
// The trick that makes the covariance losses cheap when M < a (the usual SSL
// regime: batch 2048, projector 8192): the squared Frobenius norm of an a×b
// cross-correlation equals that of products of M×M Gram matrices,
//   ‖pᵀq‖_F² = tr(pᵀq qᵀp) = Σ_ij (p pᵀ)_ij (q qᵀ)_ij,
// so forward and backward cost O(M²·(a + b)) instead of O(M·a·b) and hold M×M,
// not a×b, matrices. The diagonal Σ_k (pᵀq)_kk² is O(M·a) on its own.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "gram.h"
#include "sq_xcorr.h"

namespace palfast {
namespace {

std::tuple<at::Tensor, at::Tensor> sq_xcorr(const at::Tensor& p_in,
                                            const c10::optional<at::Tensor>& q_in,
                                            bool offdiag, bool gram) {
  check_sq_xcorr("palfast.sq_xcorr", p_in, q_in, offdiag);
  const bool self = !q_in.has_value();
  const auto acc = sq_xcorr_acc_dtype(p_in, q_in);
  const at::Tensor p = p_in.to(acc);
  const at::Tensor q = self ? p : q_in->to(acc);
  const int64_t m = p.size(0);
  if (gram) {
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
                                                     const at::Tensor& aux, bool offdiag,
                                                     bool gram) {
  const char* op = "palfast.sq_xcorr_backward";
  check_sq_xcorr(op, p_in, q_in, offdiag);
  check_scalar_grad(op, grad, p_in);
  const bool self = !q_in.has_value();
  const auto acc = sq_xcorr_acc_dtype(p_in, q_in);
  const at::Tensor p = p_in.to(acc);
  const at::Tensor q = self ? p : q_in->to(acc);
  check_sq_xcorr_aux(op, aux, p_in, q_in, gram);
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

}  // namespace

TORCH_LIBRARY_IMPL(palfast, CompositeExplicitAutograd, m) {
  m.impl("sq_xcorr", &sq_xcorr);
  m.impl("sq_xcorr_backward", &sq_xcorr_backward);
}

}  // namespace palfast
