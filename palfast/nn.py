"""``torch.nn.Module`` wrappers of the losses in :mod:`palfast.functional`.

A module holds hyper-parameters only. Call it the PAL way, ``loss(z, graph)``
with a :class:`~palfast.PairGraph`, or as a two-view drop-in, ``loss(z_a, z_b)``
with two ``[n, D]`` tensors, which reproduces the usual library loss exactly
(docs/api.md, "Modules"). Hyper-parameters are checked when the loss is called,
with the same messages as :mod:`palfast.functional`; ``check_finite=True`` is
honoured in both forms.
"""

from __future__ import annotations

import torch
from torch import nn

from . import functional as F
from ._checks import FLOAT_DTYPES, check_bool, check_number, check_tensor
from .graph import PairGraph

__all__ = [
    "InfoNCELoss", "VICRegLoss", "BarlowTwinsLoss", "SpectralContrastiveLoss", "VIC2Loss",
]


def _two_views(z_a, z_b) -> tuple[torch.Tensor, PairGraph]:
    """cat(z_a, z_b) and the views graph that pairs row i with row i + n (checked views)."""
    return torch.cat([z_a, z_b]), PairGraph.from_views(z_a.shape[0], 2, device=z_a.device)


def _check_two_views(op: str, z_a, z_b, min_rows: int, check_finite) -> None:
    """z_a, z_b: two float [n >= min_rows, D] tensors of one shape, dtype and device
    (finite when ``check_finite``)."""
    check_finite = check_bool(op, "check_finite", check_finite)
    if not isinstance(z_b, torch.Tensor):
        raise TypeError(f"{op}: z_b must be a torch.Tensor (or pass a PairGraph), "
                        f"got {type(z_b).__name__}")
    for name, t in (("z_a", z_a), ("z_b", z_b)):
        check_tensor(op, name, t, min_rows=min_rows, dtypes=FLOAT_DTYPES)
    if z_a.shape != z_b.shape:
        raise ValueError(f"{op}: z_a and z_b must both be [n, D] with the same shape, got "
                         f"{tuple(z_a.shape)} and {tuple(z_b.shape)}")
    if z_a.dtype != z_b.dtype or z_a.device != z_b.device:
        raise ValueError(f"{op}: z_b must have z_a's dtype and device ({z_a.dtype}, "
                         f"{z_a.device}), got {z_b.dtype}, {z_b.device}")
    for name, t in (("z_a", z_a), ("z_b", z_b)):
        F._check_finite(op, name, t, check_finite)


class InfoNCELoss(nn.Module):
    """Graph-weighted InfoNCE (:func:`palfast.functional.info_nce`).

    ``InfoNCELoss()(z, graph)``, or ``InfoNCELoss()(z_a, z_b)`` = NT-Xent (SimCLR,
    lightly's ``NTXentLoss``) over ``cat(z_a, z_b)`` with ``PairGraph.from_views(n, 2)``.

    Example::

        >>> import torch, palfast
        >>> loss_fn = palfast.nn.InfoNCELoss(temperature=0.2)
        >>> z_a, z_b = torch.randn(4, 8), torch.randn(4, 8)
        >>> loss = loss_fn(z_a, z_b)
    """

    def __init__(self, temperature: float = 0.1, normalize: bool = True,
                 reduction: str = "mean", check_finite: bool = False,
                 unknown_weight: float = 1.0):
        super().__init__()
        self.temperature = temperature
        self.normalize = normalize
        self.reduction = reduction
        self.unknown_weight = unknown_weight
        self.check_finite = check_finite

    def forward(self, z: torch.Tensor, graph_or_z_b) -> torch.Tensor:
        if not isinstance(graph_or_z_b, PairGraph):
            _check_two_views("palfast.nn.InfoNCELoss", z, graph_or_z_b, 1, self.check_finite)
            z, graph_or_z_b = _two_views(z, graph_or_z_b)
        return F.info_nce(z, graph_or_z_b, temperature=self.temperature,
                          normalize=self.normalize, reduction=self.reduction,
                          unknown_weight=self.unknown_weight, check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, normalize={self.normalize}, "
                f"unknown_weight={self.unknown_weight}")


# ------------------------------------------------------------ covariance losses
class VICRegLoss(nn.Module):
    """VICReg (:func:`palfast.functional.vicreg`).

    ``VICRegLoss()(z, graph)`` is the graph form. ``VICRegLoss()(z_a, z_b)`` is the
    official VICReg (facebookresearch/vicreg) exactly, with per-view statistics:
    ``sim·mse(z_a, z_b) + std·(v(z_a) + v(z_b))/2 + cov·(c(z_a) + c(z_b))``, where
    ``v`` is the mean of ``relu(1 − sqrt(Var + eps))`` and ``c`` the off-diagonal
    squared covariance over D, each of one view. (The graph form with
    ``from_views(n, 2)`` shares the invariance term but pools the 2n rows for v and c.)

    Example::

        >>> import torch, palfast
        >>> z_a, z_b = torch.randn(16, 64), torch.randn(16, 64)
        >>> loss = palfast.nn.VICRegLoss()(z_a, z_b)
    """

    def __init__(self, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0,
                 eps: float = 1e-4, check_finite: bool = False):
        super().__init__()
        self.sim_coeff, self.std_coeff, self.cov_coeff = sim_coeff, std_coeff, cov_coeff
        self.eps = eps
        self.check_finite = check_finite

    def forward(self, z: torch.Tensor, graph_or_z_b) -> torch.Tensor:
        kw = dict(sim_coeff=self.sim_coeff, std_coeff=self.std_coeff, cov_coeff=self.cov_coeff,
                  eps=self.eps)
        if isinstance(graph_or_z_b, PairGraph):
            return F.vicreg(z, graph_or_z_b, check_finite=self.check_finite, **kw)
        op = "palfast.nn.VICRegLoss"
        _check_two_views(op, z, graph_or_z_b, 2, self.check_finite)
        sim, std, cov, eps = F._vicreg_coeffs(op, **kw)
        return F._vicreg_two_view(z, graph_or_z_b, sim_coeff=sim, std_coeff=std, cov_coeff=cov,
                                  eps=eps)

    def extra_repr(self) -> str:
        return (f"sim_coeff={self.sim_coeff}, std_coeff={self.std_coeff}, "
                f"cov_coeff={self.cov_coeff}, eps={self.eps}")


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins (:func:`palfast.functional.barlow_twins`).

    ``BarlowTwinsLoss()(z, graph)`` is the graph form. ``BarlowTwinsLoss()(z_a, z_b)``
    is the official Barlow Twins exactly: ``c = bn(z_a)ᵀ bn(z_b) / n`` with
    ``BatchNorm1d(affine=False)`` per view, ``Σ (1 − c_kk)² + lambd Σ_{k≠l} c_kl²``
    (the official code's default lambd is 0.0051; palfast's is 5e-3, docs/api.md).

    Example::

        >>> import torch, palfast
        >>> z_a, z_b = torch.randn(16, 64), torch.randn(16, 64)
        >>> loss = palfast.nn.BarlowTwinsLoss(lambd=0.0051)(z_a, z_b)
    """

    def __init__(self, lambd: float = 5e-3, eps: float = 1e-5, check_finite: bool = False):
        super().__init__()
        self.lambd, self.eps, self.check_finite = lambd, eps, check_finite

    def forward(self, z: torch.Tensor, graph_or_z_b) -> torch.Tensor:
        if isinstance(graph_or_z_b, PairGraph):
            return F.barlow_twins(z, graph_or_z_b, lambd=self.lambd, eps=self.eps,
                                  check_finite=self.check_finite)
        op = "palfast.nn.BarlowTwinsLoss"
        _check_two_views(op, z, graph_or_z_b, 1, self.check_finite)
        lambd, eps = F._barlow_twins_coeffs(op, self.lambd, self.eps)
        return F._barlow_twins_two_view(z, graph_or_z_b, lambd=lambd, eps=eps)

    def extra_repr(self) -> str:
        return f"lambd={self.lambd}, eps={self.eps}"


class SpectralContrastiveLoss(nn.Module):
    """Spectral contrastive loss (:func:`palfast.functional.spectral_contrastive`).

    ``SpectralContrastiveLoss()(z, graph)`` is the graph form;
    ``SpectralContrastiveLoss()(z_a, z_b)`` is HaoChen et al.'s two-view loss
    ``−2 E_i⟨a_i, b_i⟩ + E_{i≠j}⟨a_i, b_j⟩²`` (negatives are the other images'
    other view). ``negative_weight`` weighs a graph's known negatives (graph form only).

    Example::

        >>> import torch, palfast
        >>> z_a, z_b = torch.randn(16, 64), torch.randn(16, 64)
        >>> loss = palfast.nn.SpectralContrastiveLoss()(z_a, z_b)
    """

    def __init__(self, check_finite: bool = False, negative_weight: float = 1.0):
        super().__init__()
        self.negative_weight = negative_weight
        self.check_finite = check_finite

    def forward(self, z: torch.Tensor, graph_or_z_b) -> torch.Tensor:
        if isinstance(graph_or_z_b, PairGraph):
            return F.spectral_contrastive(z, graph_or_z_b, negative_weight=self.negative_weight,
                                          check_finite=self.check_finite)
        op = "palfast.nn.SpectralContrastiveLoss"
        _check_two_views(op, z, graph_or_z_b, 1, self.check_finite)
        # unused by the two-view form, but a bad value is a bug either way
        check_number(op, "negative_weight", self.negative_weight, 0.0)
        return F._spectral_contrastive_two_view(z, graph_or_z_b)

    def extra_repr(self) -> str:
        return f"negative_weight={self.negative_weight}"


class VIC2Loss(nn.Module):
    """PAL's VIC² (:func:`palfast.functional.vic2`).

    ``VIC2Loss()(z, graph)`` is the graph form (pass ``n_views`` for stacked views);
    ``VIC2Loss()(z_a, z_b)`` is ``vic2(cat(z_a, z_b), from_views(n, 2), n_views=2)``.

    Example::

        >>> import torch, palfast
        >>> z_a, z_b = torch.randn(16, 8), torch.randn(16, 8)
        >>> loss = palfast.nn.VIC2Loss(beta=1.0)(z_a, z_b)
    """

    def __init__(self, beta: float = 1.0, n_views: int = 1, check_finite: bool = False):
        super().__init__()
        self.beta, self.n_views, self.check_finite = beta, n_views, check_finite

    def forward(self, z: torch.Tensor, graph_or_z_b) -> torch.Tensor:
        n_views = self.n_views
        if not isinstance(graph_or_z_b, PairGraph):
            _check_two_views("palfast.nn.VIC2Loss", z, graph_or_z_b, 2, self.check_finite)
            z, graph_or_z_b = _two_views(z, graph_or_z_b)
            n_views = 2
        return F.vic2(z, graph_or_z_b, beta=self.beta, n_views=n_views,
                      check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, n_views={self.n_views}"
