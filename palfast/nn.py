"""``torch.nn.Module`` wrappers of the losses in :mod:`palfast.functional`.

A module holds hyper-parameters only. Call it the PAL way, ``loss(z, graph)``
with a :class:`~palfast.PairGraph`, or as a two-view drop-in, ``loss(z_a, z_b)``
with two ``[n, D]`` tensors, which reproduces the usual library loss exactly
(SPEC §3.5).
"""

from __future__ import annotations

import torch
from torch import nn

from . import functional as F
from .graph import PairGraph

__all__ = ["InfoNCELoss"]


def _two_views(op: str, z_a, z_b) -> tuple[torch.Tensor, PairGraph]:
    """cat(z_a, z_b) and the views graph that pairs row i with row i + n."""
    for name, t in (("z_a", z_a), ("z_b", z_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if z_a.shape != z_b.shape or z_a.dim() != 2:
        raise ValueError(f"{op}: z_a and z_b must both be [n, D] with the same shape, got "
                         f"{tuple(z_a.shape)} and {tuple(z_b.shape)}")
    if z_a.shape[0] < 1:
        raise ValueError(f"{op}: z_a must have at least one row, got shape {tuple(z_a.shape)}")
    return torch.cat([z_a, z_b]), PairGraph.from_views(z_a.shape[0], 2, device=z_a.device)


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
                 reduction: str = "mean", check_finite: bool = False):
        super().__init__()
        self.temperature = temperature
        self.normalize = normalize
        self.reduction = reduction
        self.check_finite = check_finite

    def forward(self, z: torch.Tensor, graph_or_z_b) -> torch.Tensor:
        if not isinstance(graph_or_z_b, PairGraph):
            z, graph_or_z_b = _two_views("palfast.nn.InfoNCELoss", z, graph_or_z_b)
        return F.info_nce(z, graph_or_z_b, temperature=self.temperature,
                          normalize=self.normalize, reduction=self.reduction,
                          check_finite=self.check_finite)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, normalize={self.normalize}"
