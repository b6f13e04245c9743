"""Naive pure-PyTorch references, written from the formulas in SPEC.md.

They build the dense N×N graph and similarity matrices, so they are only for
small N: tests compare every kernel against them in float64, benchmarks use
them as the "naive eager" baseline, and they document the maths in one screen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .graph import PairGraph

__all__ = ["info_nce", "reduce_rows"]


def reduce_rows(rows: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """Mean over rows where ``mask`` holds (0 with zero gradient when none), sum, or none."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / mask.sum().clamp_min(1)


def info_nce(z: torch.Tensor, graph: PairGraph, *, temperature: float = 0.1,
             normalize: bool = True, reduction: str = "mean") -> torch.Tensor:
    """SPEC §3.1:  ℓ_i = −(1/W_i) Σ_{j≠i} w_ij [s_ij − log Σ_{k≠i} exp(s_ik)]  for W_i > 0."""
    n = z.shape[0]
    u = F.normalize(z, dim=1) if normalize else z
    s = u @ u.T / temperature
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    lse = torch.logsumexp(s.masked_fill(eye, float("-inf")), dim=1)
    w = graph.to_dense(torch.float64).to(device=z.device, dtype=s.dtype).masked_fill(eye, 0)
    wi = w.sum(1)
    has_pos = wi > 0
    pos = (w * s.masked_fill(eye, 0)).sum(1) / wi.clamp_min(torch.finfo(s.dtype).tiny)
    rows = torch.where(has_pos, lse - pos, torch.zeros_like(lse))
    return reduce_rows(rows, has_pos, reduction)
