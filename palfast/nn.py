"""``torch.nn.Module`` wrappers of the losses in :mod:`palfast.functional`.

A module holds hyper-parameters only. Call it the PAL way, ``loss(z, graph)``
with a :class:`~palfast.PairGraph`, or as a two-view drop-in, ``loss(z_a, z_b)``
with two ``[n, D]`` tensors, which reproduces the usual library loss exactly
(docs/api.md, "Modules"; for VICReg, Barlow Twins and the spectral loss this is
``palfast.functional.<loss>_two_view``). Hyper-parameters are checked when the loss is called,
with the same messages as :mod:`palfast.functional`; ``check_finite=True`` is
honoured in both forms. ``gather`` means what it means for the functional losses
in both forms (docs/distributed.md); in the two-view form each rank passes its own
``z_a, z_b`` and, gathered, the loss is the two-view loss of the global batch.

:class:`NTXentLoss` and :class:`SupConLoss` take the arguments and return the
values of lightly's and pytorch-metric-learning's losses of those names
(docs/api.md, "Drop-in modules").
"""

from __future__ import annotations

import torch
from torch import nn

from . import distributed as _dist
from . import functional as F
from ._checks import FLOAT_DTYPES, as_long_vector, check_bool, check_number, check_tensor
from .graph import PairGraph
from .losses._common import (
    check_finite_values,
    check_gather,
    check_two_views,
    stacked_views,
    two_views,
)

__all__ = [
    "InfoNCELoss",
    "VICRegLoss",
    "BarlowTwinsLoss",
    "SpectralContrastiveLoss",
    "VIC2Loss",
    "NTXentLoss",
    "SupConLoss",
]


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

    def __init__(
        self,
        temperature: float = 0.1,
        normalize: bool = True,
        reduction: str = "mean",
        check_finite: bool = False,
        unknown_weight: float = 1.0,
        gather: bool | None = None,
    ):
        super().__init__()
        self.temperature = temperature
        self.normalize = normalize
        self.reduction = reduction
        self.unknown_weight = unknown_weight
        self.check_finite = check_finite
        self.gather = gather

    def forward(self, z: torch.Tensor, graph_or_z_b) -> torch.Tensor:
        gather = self.gather
        if not isinstance(graph_or_z_b, PairGraph):
            op = "palfast.nn.InfoNCELoss"
            check_two_views(op, z, graph_or_z_b, 1, self.check_finite)
            gather = check_gather(op, gather)
            z, graph_or_z_b = stacked_views(z, graph_or_z_b, gather)
        return F.info_nce(
            z,
            graph_or_z_b,
            temperature=self.temperature,
            normalize=self.normalize,
            reduction=self.reduction,
            unknown_weight=self.unknown_weight,
            check_finite=self.check_finite,
            gather=gather,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, normalize={self.normalize}, unknown_weight={self.unknown_weight}"


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

    def __init__(
        self,
        sim_coeff: float = 25.0,
        std_coeff: float = 25.0,
        cov_coeff: float = 1.0,
        eps: float = 1e-4,
        check_finite: bool = False,
        gather: bool | None = None,
    ):
        super().__init__()
        self.sim_coeff, self.std_coeff, self.cov_coeff = sim_coeff, std_coeff, cov_coeff
        self.eps = eps
        self.check_finite = check_finite
        self.gather = gather

    def forward(self, z: torch.Tensor, graph_or_z_b) -> torch.Tensor:
        kw = dict(sim_coeff=self.sim_coeff, std_coeff=self.std_coeff, cov_coeff=self.cov_coeff, eps=self.eps)
        if isinstance(graph_or_z_b, PairGraph):
            return F.vicreg(z, graph_or_z_b, check_finite=self.check_finite, gather=self.gather, **kw)
        return F.vicreg_two_view(z, graph_or_z_b, check_finite=self.check_finite, gather=self.gather, **kw)

    def extra_repr(self) -> str:
        return f"sim_coeff={self.sim_coeff}, std_coeff={self.std_coeff}, cov_coeff={self.cov_coeff}, eps={self.eps}"


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

    def __init__(self, lambd: float = 5e-3, eps: float = 1e-5, check_finite: bool = False, gather: bool | None = None):
        super().__init__()
        self.lambd, self.eps, self.check_finite = lambd, eps, check_finite
        self.gather = gather

    def forward(self, z: torch.Tensor, graph_or_z_b) -> torch.Tensor:
        if isinstance(graph_or_z_b, PairGraph):
            return F.barlow_twins(
                z, graph_or_z_b, lambd=self.lambd, eps=self.eps, check_finite=self.check_finite, gather=self.gather
            )
        return F.barlow_twins_two_view(
            z, graph_or_z_b, lambd=self.lambd, eps=self.eps, check_finite=self.check_finite, gather=self.gather
        )

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

    def __init__(self, check_finite: bool = False, negative_weight: float = 1.0, gather: bool | None = None):
        super().__init__()
        self.negative_weight = negative_weight
        self.check_finite = check_finite
        self.gather = gather

    def forward(self, z: torch.Tensor, graph_or_z_b) -> torch.Tensor:
        if isinstance(graph_or_z_b, PairGraph):
            return F.spectral_contrastive(
                z,
                graph_or_z_b,
                negative_weight=self.negative_weight,
                check_finite=self.check_finite,
                gather=self.gather,
            )
        # unused by the two-view form, but a bad value is a bug either way
        check_number("palfast.nn.SpectralContrastiveLoss", "negative_weight", self.negative_weight, 0.0)
        return F.spectral_contrastive_two_view(z, graph_or_z_b, check_finite=self.check_finite, gather=self.gather)

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

    def __init__(self, beta: float = 1.0, n_views: int = 1, check_finite: bool = False, gather: bool | None = None):
        super().__init__()
        self.beta, self.n_views, self.check_finite = beta, n_views, check_finite
        self.gather = gather

    def forward(self, z: torch.Tensor, graph_or_z_b) -> torch.Tensor:
        n_views, gather = self.n_views, self.gather
        if not isinstance(graph_or_z_b, PairGraph):
            op = "palfast.nn.VIC2Loss"
            # vic2 reads z as stacked view blocks: gather each view, then stack them
            z, graph_or_z_b = two_views(op, z, graph_or_z_b, 2, self.check_finite, gather)
            z, graph_or_z_b = stacked_views(z, graph_or_z_b, gather=False)
            n_views, gather = 2, False
        return F.vic2(z, graph_or_z_b, beta=self.beta, n_views=n_views, check_finite=self.check_finite, gather=gather)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, n_views={self.n_views}"


# ------------------------------------------------------------ drop-in modules
# The arguments and values of two libraries' losses of the same name, on info_nce's
# kernel (docs/api.md, "Drop-in modules"; tests/losses/test_nn_dropin.py compares them).


class NTXentLoss(nn.Module):
    r"""lightly's ``NTXentLoss`` (SimCLR's NT-Xent): ``NTXentLoss(temperature)(out0, out1)``.

    .. math::
        \ell = \frac{1}{2n}\sum_{i=1}^{2n} -\log\frac{e^{s_{i,p(i)}}}{\sum_{k\ne i} e^{s_{ik}}},
        \qquad s_{ik} = \cos(z_i, z_k)/\tau

    over the 2n rows ``z = cat(out0, out1)``, p(i) the other view of row i's image:
    lightly's value (its default τ is 0.5), = ``InfoNCELoss(temperature)(out0, out1)``.

    Args:
        temperature: τ > 0 (lightly also takes τ ≤ −1e-8; palfast does not).
        memory_bank_size: 0 only (lightly's default: the negatives are the batch's other
            rows). lightly's memory bank of past ``out1`` rows (MoCo) is not in palfast;
            any other value is a ``ValueError``.
        gather_distributed: as lightly's, gather every rank's rows as negatives when a
            process group of more than one rank is initialised. Each rank then returns
            the loss of the global batch (lightly: of its own rows, which average to
            it for equal batches); after DDP's averaging the gradients are the same.

    Example::

        >>> import torch, palfast
        >>> out0, out1 = torch.randn(4, 8), torch.randn(4, 8)
        >>> loss = palfast.nn.NTXentLoss(temperature=0.5)(out0, out1)
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size: int = 0, gather_distributed: bool = False):
        super().__init__()
        op = "palfast.nn.NTXentLoss"
        # checked here, as lightly does (temperature again by info_nce at each call)
        self.temperature = check_number(op, "temperature", temperature, 0.0, strict=True)
        if isinstance(memory_bank_size, bool) or not isinstance(memory_bank_size, int) or memory_bank_size != 0:
            raise ValueError(
                f"{op}: memory_bank_size must be 0 (the batch's other rows are "
                f"the negatives, as SimCLR), got {memory_bank_size!r}; palfast has "
                "no memory bank of past embeddings: use lightly's NTXentLoss for "
                "MoCo-style negatives"
            )
        self.memory_bank_size = 0
        self.gather_distributed = check_bool(op, "gather_distributed", gather_distributed)

    def forward(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        op = "palfast.nn.NTXentLoss"
        check_two_views(op, out0, out1, 1, False, names=("out0", "out1"))
        # lightly gathers only when there are ranks to gather from: gather=None does that
        gather = check_bool(op, "gather_distributed", self.gather_distributed)
        gather = check_gather(op, None if gather else False)
        z, graph = stacked_views(out0, out1, gather)
        return F.info_nce(z, graph, temperature=self.temperature, gather=gather)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"


class SupConLoss(nn.Module):
    r"""pytorch-metric-learning's ``SupConLoss``: ``SupConLoss(temperature)(embeddings, labels)``.

    .. math::
        \ell_i = -\frac{1}{|P_i|}\sum_{j\in P_i}\Big[s_{ij}
                  - \log\sum_{k\ne i} e^{s_{ik}}\Big],\qquad s_{ik} = \cos(z_i, z_k)/\tau

    P_i the other rows of row i's label (any integer is a class, −1 included). As
    pytorch-metric-learning: the loss is the mean of the ℓ_i > 0 (rows without
    positives have ℓ_i = 0 and are left out), and 0 with zero gradient when no row
    is > 0 or the batch has no pair of different labels.

    Args:
        temperature: τ > 0.
        gather: False (default) = this rank's batch, as pytorch-metric-learning. True,
            or None (on when a process group of more than one rank is initialised):
            every rank's embeddings and labels form the batch, and every rank returns
            its loss (docs/distributed.md).
        check_finite: raise ``ValueError`` on NaN/Inf in the embeddings.

    Example::

        >>> import torch, palfast
        >>> z, y = torch.randn(8, 16), torch.tensor([0, 0, 1, 1, 2, 2, 3, 5])
        >>> loss = palfast.nn.SupConLoss(temperature=0.1)(z, y)
    """

    def __init__(self, temperature: float = 0.1, *, gather: bool | None = False, check_finite: bool = False):
        super().__init__()
        self.temperature, self.gather, self.check_finite = temperature, gather, check_finite

    def forward(
        self, embeddings: torch.Tensor, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None
    ) -> torch.Tensor:
        op = "palfast.nn.SupConLoss"
        for name, value in (("indices_tuple", indices_tuple), ("ref_emb", ref_emb), ("ref_labels", ref_labels)):
            if value is not None:
                raise ValueError(
                    f"{op}: {name} must be None (palfast's SupConLoss uses every "
                    f"pair of the batch, by labels), got {type(value).__name__}; "
                    "call it as loss(embeddings, labels)"
                )
        check_tensor(op, "embeddings", embeddings, min_rows=1, dtypes=FLOAT_DTYPES)
        check_finite_values(op, "embeddings", embeddings, check_bool(op, "check_finite", self.check_finite))
        temperature = check_number(op, "temperature", self.temperature, 0.0, strict=True)
        if labels is None:
            raise TypeError(
                f"{op}: labels must be an [N] = [{embeddings.shape[0]}] integer tensor of class labels, got None"
            )
        y = as_long_vector(op, "labels", labels).to(embeddings.device)
        if y.shape != embeddings.shape[:1]:
            raise ValueError(
                f"{op}: labels must be an [N] = [{embeddings.shape[0]}] vector, one "
                f"per row of embeddings, got shape {tuple(y.shape)}"
            )
        gather = check_gather(op, self.gather)
        classes = torch.unique(_dist.gather_rows_no_grad(y) if gather else y, return_inverse=True)[1]
        rows = F.info_nce(
            embeddings, PairGraph.from_labels(classes), temperature=temperature, reduction="none", gather=gather
        )
        rows = rows.double() if rows.dtype == torch.float64 else rows.float()
        kept = rows > 0  # pytorch-metric-learning's AvgNonZeroReducer
        total, count = torch.where(kept, rows, torch.zeros_like(rows)).sum(), kept.sum()
        if gather:
            total, count = _dist.global_value(total), _dist.all_reduce_sum(count)
        some = (count > 0) & (classes != classes[0]).any()  # a positive and a negative pair
        loss = torch.where(some, total / count.clamp_min(1), torch.zeros_like(total))
        return loss.to(embeddings.dtype)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather={self.gather}"
