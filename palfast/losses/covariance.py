"""The covariance losses (docs/api.md, "Losses"): VICReg, Barlow Twins and the
spectral contrastive loss in PAL's graph form, and their official two-view forms.

The custom ops do the parts that cost: the graph products (graph_spmm,
graph_dirichlet: CSR + class sums, never a dense G) and the squared Frobenius
norms of D×D cross-correlations (sq_xcorr, barlow_twins_xcorr: through N×N Gram
matrices when N < D). The O(N·D) rest (centring, standardising, the variance
hinge, diagonals) is plain PyTorch in float32 (float64 for float64 z).
"""

from __future__ import annotations

import math

import torch

from .. import _ops
from .._checks import check_number
from ..graph import PairGraph
from ._common import (
    acc,
    check_rows,
    dirichlet_mean,
    global_rows,
    no_overflow_nan,
    two_views,
    with_check,
)

__all__ = [
    "vicreg",
    "barlow_twins",
    "spectral_contrastive",
    "vicreg_two_view",
    "barlow_twins_two_view",
    "spectral_contrastive_two_view",
]


def _vicreg_coeffs(op: str, sim_coeff, std_coeff, cov_coeff, eps) -> tuple[float, ...]:
    """VICReg's three weights (finite, >= 0) and eps (finite, > 0)."""
    return (
        check_number(op, "sim_coeff", sim_coeff, 0.0),
        check_number(op, "std_coeff", std_coeff, 0.0),
        check_number(op, "cov_coeff", cov_coeff, 0.0),
        check_number(op, "eps", eps, 0.0, strict=True),
    )


def _barlow_twins_coeffs(op: str, lambd, eps) -> tuple[float, float]:
    """Barlow Twins' lambd (finite, >= 0) and eps (finite, > 0)."""
    return check_number(op, "lambd", lambd, 0.0), check_number(op, "eps", eps, 0.0, strict=True)


def _variance_covariance(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """VICReg's variance and covariance terms of one batch x [N >= 2, D]:
    (1/D) Σ_k relu(1 − sqrt(Var_k + eps)) and (1/D) Σ_{k≠l} C_kl², C the unbiased covariance."""
    n, d = x.shape
    a = (x - x.mean(0)).mul_(1 / math.sqrt(n - 1))  # C = aᵀa
    var = a.square().sum(0)
    var_term = torch.relu(1 - torch.sqrt(var + eps)).mean()
    cov_term = _ops.sq_xcorr(a, None, True)[0] / d
    return var_term, cov_term


def _standardize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Columns to mean 0, biased variance 1: BatchNorm1d(affine=False) in training mode
    (the same fused ATen op, which saves only the column statistics for backward)."""
    if x.shape[0] == 1:  # batch_norm refuses one row; its columns are all 0 after centring
        return (x - x.mean(0)) * eps**-0.5
    return torch.nn.functional.batch_norm(x, None, None, training=True, momentum=0.0, eps=eps)


def _variance_overflows(x: torch.Tensor) -> torch.Tensor:
    """Whether a column's sum of squares may overflow x's dtype: N · max|x|² > its
    largest float (a device bool; no host sync)."""
    d = x.detach()
    peak = torch.maximum(d.amax(), -d.amin())
    return peak.square() * x.shape[0] > torch.finfo(x.dtype).max


def vicreg(
    z: torch.Tensor,
    graph: PairGraph,
    *,
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    eps: float = 1e-4,
    check_finite: bool = False,
    gather: bool | None = None,
) -> torch.Tensor:
    r"""Graph-weighted VICReg (Bardes et al. 2022 in PAL's graph form), docs/api.md.

    .. math::
        \mathrm{inv} = \frac{1}{D\,|G|}\sum_{ij} w_{ij}\|z_i - z_j\|^2,\quad
        \mathrm{var} = \frac1D\sum_k \mathrm{relu}\big(1 - \sqrt{\mathrm{Var}_k(z) + \epsilon}\big),\quad
        \mathrm{cov} = \frac1D\sum_{k\ne l} C_{kl}^2

    with the unbiased variance and covariance ``C = (z − z̄)ᵀ(z − z̄)/(N − 1)`` over
    all N >= 2 rows; loss = sim_coeff·inv + std_coeff·var + cov_coeff·cov; inv = 0 for
    an empty graph. Time O(N·D·min(N, D)), memory O(N·D + min(N, D)²). Known negatives
    are ignored; :func:`vicreg_two_view` is the official two-view loss (both:
    docs/api.md#covariance-losses-in-detail).

    Args:
        z, graph: ``[N, D]`` float embeddings; a :class:`PairGraph` over its rows.
        sim_coeff, std_coeff, cov_coeff: weights >= 0 of the three terms.
        eps: > 0, added to the variance under the square root.
        check_finite, gather: as for every loss (:mod:`palfast.functional`).

    Example::

        >>> import torch, palfast
        >>> z = torch.randn(8, 32, requires_grad=True)
        >>> palfast.vicreg(z, palfast.PairGraph.from_views(4, 2)).backward()
    """
    op = "palfast.vicreg"
    z, unchanged = global_rows(op, z, graph, check_finite, gather)
    sim_coeff, std_coeff, cov_coeff, eps = _vicreg_coeffs(op, sim_coeff, std_coeff, cov_coeff, eps)
    check_rows(op, "z", z, 2, "the unbiased variance over N − 1 needs two")
    x = acc(z)
    inv = dirichlet_mean(x, graph) / z.shape[1]
    var, cov = _variance_covariance(x, eps)
    loss = with_check(sim_coeff * inv + std_coeff * var + cov_coeff * cov, unchanged, z.dtype)
    return no_overflow_nan(op, z, loss)


def barlow_twins(
    z: torch.Tensor,
    graph: PairGraph,
    *,
    lambd: float = 5e-3,
    eps: float = 1e-5,
    check_finite: bool = False,
    gather: bool | None = None,
) -> torch.Tensor:
    r"""Graph-weighted Barlow Twins (Zbontar et al. 2021 in PAL's graph form), docs/api.md.

    .. math::
        C = \frac{\hat z^\top G \hat z}{|G|},\qquad
        \mathcal L = \sum_k (1 - C_{kk})^2 + \lambda \sum_{k\ne l} C_{kl}^2

    where ẑ standardises each column of z over the N rows (``BatchNorm1d(affine=False)``:
    mean 0, biased variance 1, ``eps`` added). G enters through sparse products only,
    the off-diagonal sum through the N×N Gram matrix when N < D. |G| = 0 gives D.
    Known negatives are ignored; :func:`barlow_twins_two_view` is the official
    two-view loss (both: docs/api.md#covariance-losses-in-detail).

    Args:
        z, graph: ``[N, D]`` float embeddings; a :class:`PairGraph` over its rows.
        lambd: λ >= 0, weight of the off-diagonal (redundancy) term.
        eps: > 0, BatchNorm's epsilon.
        check_finite, gather: as for every loss (:mod:`palfast.functional`).

    Example::

        >>> import torch, palfast
        >>> labels = torch.tensor([0, 0, 1, 1, -1, 2, 2, 2])   # -1: unknown
        >>> z = torch.randn(8, 32, requires_grad=True)
        >>> palfast.barlow_twins(z, palfast.PairGraph.from_labels(labels)).backward()
    """
    op = "palfast.barlow_twins"
    z, unchanged = global_rows(op, z, graph, check_finite, gather)
    lambd, eps = _barlow_twins_coeffs(op, lambd, eps)
    zhat = _standardize(acc(z), eps)
    if graph.total_weight <= 0:
        return with_check(zhat.sum() * 0 + z.shape[1], unchanged, z.dtype)
    loss, _ = _ops.barlow_twins_xcorr(zhat, graph.kernel_args(), lambd, 1.0 / graph.total_weight)
    # An overflowing column variance standardises the column to 0: a plausible, wrong
    # finite loss. NaN instead, which _no_overflow_nan turns into a ValueError.
    loss = torch.where(_variance_overflows(acc(z)), torch.full_like(loss, float("nan")), loss)
    return no_overflow_nan(op, z, with_check(loss, unchanged, z.dtype))


def spectral_contrastive(
    z: torch.Tensor,
    graph: PairGraph,
    *,
    negative_weight: float = 1.0,
    check_finite: bool = False,
    gather: bool | None = None,
) -> torch.Tensor:
    r"""Graph-weighted spectral contrastive loss (HaoChen et al. 2021), docs/api.md.

    .. math::
        \mathcal L = -\frac{2}{|G|}\sum_{ij} w_{ij}\langle z_i, z_j\rangle
                     + \frac{1}{N(N-1)}\sum_{i\ne j}\langle z_i, z_j\rangle^2

    The first term is ``<z, G z>`` (one SpMM); the second is
    ``‖zᵀz‖_F² − Σ_i ‖z_i‖⁴`` on the D×D side when D < N, else the N×N side. An
    empty graph drops the first term; N = 1 the second. With ``graph.negatives`` the
    graph is signed, ``w = w⁺ − β w⁻`` and ``|G| = |G⁺| + β|G⁻|``;
    :func:`spectral_contrastive_two_view` is HaoChen's two-view loss (both:
    docs/api.md#covariance-losses-in-detail).

    Args:
        z, graph: ``[N, D]`` float embeddings; a :class:`PairGraph` over its rows.
        negative_weight: β >= 0, the weight of ``graph.negatives`` in the signed graph.
        check_finite, gather: as for every loss (:mod:`palfast.functional`).

    Example::

        >>> import torch, palfast
        >>> z = torch.randn(8, 32, requires_grad=True)
        >>> palfast.spectral_contrastive(z, palfast.PairGraph.from_views(4, 2)).backward()
    """
    op = "palfast.spectral_contrastive"
    z, unchanged = global_rows(op, z, graph, check_finite, gather)
    negative_weight = check_number(op, "negative_weight", negative_weight, 0.0)
    x = acc(z)
    n = x.shape[0]
    loss = x.sum() * 0  # stays connected to z when both terms drop out
    signed = [(1.0, graph)]
    if graph.negatives is not None and negative_weight > 0:
        signed.append((-negative_weight, graph.negatives))
    total = sum(abs(a) * g.total_weight for a, g in signed)
    for a, g in signed:
        if g.total_weight > 0:
            gx = _ops.graph_spmm(x, *g.kernel_args(), False)
            loss = loss - 2.0 * a / total * (x * gx).sum()
    if n > 1:
        loss = loss + _ops.sq_xcorr(x.T, None, True)[0] / (n * (n - 1))
    return no_overflow_nan(op, z, with_check(loss, unchanged, z.dtype))


# ------------------------------------------------------------ two-view forms
# The official losses of two views z_a, z_b (per-view statistics), on the same ops;
# palfast.nn's VICRegLoss, BarlowTwinsLoss and SpectralContrastiveLoss called as
# loss(z_a, z_b) are these.


def vicreg_two_view(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    *,
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    eps: float = 1e-4,
    check_finite: bool = False,
    gather: bool | None = None,
) -> torch.Tensor:
    """Official VICReg (facebookresearch/vicreg) of two views ``z_a, z_b [n >= 2, D]``:
    ``sim·mse(z_a, z_b) + std·(v(z_a) + v(z_b))/2 + cov·(c(z_a) + c(z_b))``, ``v`` and
    ``c`` :func:`vicreg`'s variance and covariance terms of one view. Arguments as for
    :func:`vicreg`; gathered, it is the loss of every rank's views (docs/api.md#two-view-forms).

    Example::

        >>> import torch, palfast
        >>> z_a, z_b = torch.randn(16, 64), torch.randn(16, 64)
        >>> loss = palfast.functional.vicreg_two_view(z_a, z_b)
    """
    op = "palfast.vicreg_two_view"
    sim_coeff, std_coeff, cov_coeff, eps = _vicreg_coeffs(op, sim_coeff, std_coeff, cov_coeff, eps)
    z_a, z_b = two_views(op, z_a, z_b, 2, check_finite, gather)
    xa, xb = acc(z_a), acc(z_b)
    var_a, cov_a = _variance_covariance(xa, eps)
    var_b, cov_b = _variance_covariance(xb, eps)
    loss = (
        sim_coeff * torch.nn.functional.mse_loss(xa, xb) + std_coeff * (var_a + var_b) / 2 + cov_coeff * (cov_a + cov_b)
    )
    return loss.to(z_a.dtype)


def barlow_twins_two_view(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    *,
    lambd: float = 5e-3,
    eps: float = 1e-5,
    check_finite: bool = False,
    gather: bool | None = None,
) -> torch.Tensor:
    """Official Barlow Twins of two views ``z_a, z_b [n, D]``: ``c = bn(z_a)ᵀ bn(z_b)/n``
    with ``BatchNorm1d(affine=False)`` per view, ``Σ (1 − c_kk)² + λ Σ_{k≠l} c_kl²`` (the
    official default λ is 0.0051). Arguments as for :func:`barlow_twins`; gathered, it is
    the loss of every rank's views (docs/api.md#two-view-forms).

    Example::

        >>> import torch, palfast
        >>> z_a, z_b = torch.randn(16, 64), torch.randn(16, 64)
        >>> loss = palfast.functional.barlow_twins_two_view(z_a, z_b, lambd=0.0051)
    """
    op = "palfast.barlow_twins_two_view"
    lambd, eps = _barlow_twins_coeffs(op, lambd, eps)
    z_a, z_b = two_views(op, z_a, z_b, 1, check_finite, gather)
    pa, pb = _standardize(acc(z_a), eps), _standardize(acc(z_b), eps)
    n = pa.shape[0]
    on = (1 - (pa * pb).sum(0) / n).square().sum()
    off = _ops.sq_xcorr(pa, pb, True)[0] / (n * n)
    return (on + lambd * off).to(z_a.dtype)


def spectral_contrastive_two_view(
    z_a: torch.Tensor, z_b: torch.Tensor, *, check_finite: bool = False, gather: bool | None = None
) -> torch.Tensor:
    """HaoChen et al.'s spectral contrastive loss of two views ``z_a, z_b [n, D]``:
    ``−2 E_i⟨a_i, b_i⟩ + E_{i≠j}⟨a_i, b_j⟩²`` (negatives are the other images' other
    view). ``check_finite`` and ``gather`` as for :func:`spectral_contrastive`;
    gathered, it is the loss of every rank's views (docs/api.md#two-view-forms).

    Example::

        >>> import torch, palfast
        >>> z_a, z_b = torch.randn(16, 64), torch.randn(16, 64)
        >>> loss = palfast.functional.spectral_contrastive_two_view(z_a, z_b)
    """
    op = "palfast.spectral_contrastive_two_view"
    z_a, z_b = two_views(op, z_a, z_b, 1, check_finite, gather)
    xa, xb = acc(z_a), acc(z_b)
    n = xa.shape[0]
    loss = -2 * (xa * xb).sum() / n
    if n > 1:
        loss = loss + _ops.sq_xcorr(xa.T, xb.T, True)[0] / (n * (n - 1))
    return loss.to(z_a.dtype)
