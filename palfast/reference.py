"""Naive pure-PyTorch references, written from the formulas in docs/api.md.

They build the dense N×N graph and similarity matrices, so they are only for
small N: tests compare every kernel against them in float64, benchmarks use
them as the "naive eager" baseline, and they document the maths in one screen.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .graph import PairGraph

__all__ = [
    "info_nce",
    "reduce_rows",
    "vicreg",
    "barlow_twins",
    "spectral_contrastive",
    "vic2",
    "vicreg_two_view_official",
    "barlow_twins_two_view_official",
]


def reduce_rows(rows: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """Mean over rows where ``mask`` holds (0 with zero gradient when none), sum, or none."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / mask.sum().clamp_min(1)


def _dense_negatives(graph: PairGraph, like: torch.Tensor) -> torch.Tensor:
    """graph.negatives as a dense [N, N] matrix (zeros when there are none)."""
    if graph.negatives is None:
        return torch.zeros_like(like)
    return graph.negatives.to_dense(torch.float64).to(device=like.device, dtype=like.dtype)


def info_nce(
    z: torch.Tensor,
    graph: PairGraph,
    *,
    temperature: float = 0.1,
    normalize: bool = True,
    reduction: str = "mean",
    unknown_weight: float = 1.0,
) -> torch.Tensor:
    """docs/api.md:  ℓ_i = −(1/W_i) Σ_{j≠i} w_ij [s_ij − log Σ_{k≠i} ω_ik exp(s_ik)]  for W_i > 0,
    ω_ik = 1 when k is a positive or a known negative of i (w_ik > 0 or w⁻_ik > 0), else
    λ = ``unknown_weight``."""
    n = z.shape[0]
    u = F.normalize(z, dim=1) if normalize else z
    s = u @ u.T / temperature
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    w = graph.to_dense(torch.float64).to(device=z.device, dtype=s.dtype).masked_fill(eye, 0)
    wi = w.sum(1)
    has_pos = wi > 0
    known = (w > 0) | (_dense_negatives(graph, w) > 0)
    # log ω (0 on rows without positives, whose ℓ_i is 0 anyway: no −inf there)
    log_lam = math.log(unknown_weight) if unknown_weight > 0 else float("-inf")
    log_omega = torch.zeros_like(s).masked_fill(~(known | ~has_pos[:, None]), log_lam)
    lse = torch.logsumexp((s + log_omega).masked_fill(eye, float("-inf")), dim=1)
    pos = (w * s.masked_fill(eye, 0)).sum(1) / wi.clamp_min(torch.finfo(s.dtype).tiny)
    rows = torch.where(has_pos, lse - pos, torch.zeros_like(lse))
    return reduce_rows(rows, has_pos, reduction)


# ------------------------------------------------------------ covariance losses
def _dense_graph(graph: PairGraph, z: torch.Tensor) -> torch.Tensor:
    return graph.to_dense(z.dtype).to(z.device)


def _pairwise_sq_dist(z: torch.Tensor) -> torch.Tensor:
    """‖z_i − z_j‖² as an [N, N] matrix, from the differences (no cancellation)."""
    return (z[:, None, :] - z[None, :, :]).square().sum(-1)


def vicreg(
    z: torch.Tensor,
    graph: PairGraph,
    *,
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    eps: float = 1e-4,
) -> torch.Tensor:
    """docs/api.md: sim·Σ w‖z_i − z_j‖²/(D|G|) + std·(1/D)Σ relu(1 − sqrt(Var_k + eps))
    + cov·(1/D)Σ_{k≠l} C_kl², C = (z − z̄)ᵀ(z − z̄)/(N − 1); inv = 0 when |G| = 0."""
    n, d = z.shape
    w = _dense_graph(graph, z)
    total = w.sum()
    inv = (w * _pairwise_sq_dist(z)).sum() / (d * total) if total > 0 else z.new_zeros(())
    zc = z - z.mean(0)
    c = zc.T @ zc / (n - 1)
    var = F.relu(1 - torch.sqrt(torch.diagonal(c) + eps)).mean()
    cov = (c - torch.diag(torch.diagonal(c))).square().sum() / d
    return sim_coeff * inv + std_coeff * var + cov_coeff * cov


def barlow_twins(z: torch.Tensor, graph: PairGraph, *, lambd: float = 5e-3, eps: float = 1e-5) -> torch.Tensor:
    """docs/api.md: ẑ = (z − mean)/sqrt(biased var + eps), C = ẑᵀGẑ/|G| (0 when |G| = 0),
    Σ_k (1 − C_kk)² + λ Σ_{k≠l} C_kl²."""
    zhat = (z - z.mean(0)) / torch.sqrt(z.var(0, correction=0) + eps)
    w = _dense_graph(graph, z)
    total = w.sum()
    c = zhat.T @ w @ zhat / total if total > 0 else zhat.T @ zhat * 0
    on = (1 - torch.diagonal(c)).square().sum()
    off = (c - torch.diag(torch.diagonal(c))).square().sum()
    return on + lambd * off


def spectral_contrastive(z: torch.Tensor, graph: PairGraph, *, negative_weight: float = 1.0) -> torch.Tensor:
    """docs/api.md: −(2/|G|) Σ w_ij⟨z_i, z_j⟩ + (1/(N(N−1))) Σ_{i≠j}⟨z_i, z_j⟩²
    (each term 0 when |G| = 0, resp. N = 1), with the signed w = w⁺ − β w⁻ and
    |G| = Σ|w| = |G⁺| + β|G⁻| when the graph has known negatives (β = negative_weight)."""
    n = z.shape[0]
    w_pos = _dense_graph(graph, z)
    w_neg = negative_weight * _dense_negatives(graph, w_pos)
    w = w_pos - w_neg
    total = w_pos.sum() + w_neg.sum()
    s = z @ z.T
    pos = -2 * (w * s).sum() / total if total > 0 else z.new_zeros(())
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    neg = s.masked_fill(eye, 0).square().sum() / (n * (n - 1)) if n > 1 else z.new_zeros(())
    return pos + neg


def vic2(z: torch.Tensor, graph: PairGraph, *, beta: float = 1.0, n_views: int = 1) -> torch.Tensor:
    """PAL's VIC²: β Σ w‖z_i − z_j‖²/|G| + tr((AᵀA/n_a − I)(BᵀB/n_b − I)), A the first
    ⌊n/2⌋ images of every view block (n = N/n_views), B the others."""
    n_rows, d = z.shape
    n = n_rows // n_views
    w = _dense_graph(graph, z)
    total = w.sum()
    inv = (w * _pairwise_sq_dist(z)).sum() / total if total > 0 else z.new_zeros(())
    image = torch.arange(n_rows, device=z.device) % n
    a, b = z[image < n // 2], z[image >= n // 2]
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    ortho = torch.trace((a.T @ a / a.shape[0] - eye) @ (b.T @ b / b.shape[0] - eye))
    return beta * inv + ortho


# ------------------------------------------------------------ official two-view losses
# Written as in the authors' pseudo-code, not from docs/api.md: the tests check
# palfast.nn.VICRegLoss / BarlowTwinsLoss against them, and
# palfast/benchmarks/bench_covariance.py times them as the "official eager" baseline.
def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    return m[~torch.eye(m.shape[0], dtype=torch.bool, device=m.device)]


def vicreg_two_view_official(
    z_a: torch.Tensor, z_b: torch.Tensor, *, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0
) -> torch.Tensor:
    """VICReg on two views as in Bardes et al. (2022), Algorithm 1, and
    facebookresearch/vicreg (main_vicreg.py, ``VICReg.forward``): per-view variance
    (eps 1e-4) and covariance, mse invariance."""
    n, d = z_a.shape
    repr_loss = F.mse_loss(z_a, z_b)
    x = z_a - z_a.mean(dim=0)
    y = z_b - z_b.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (n - 1)
    cov_y = (y.T @ y) / (n - 1)
    cov_loss = _off_diagonal(cov_x).pow(2).sum() / d + _off_diagonal(cov_y).pow(2).sum() / d
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss


def barlow_twins_two_view_official(z_a: torch.Tensor, z_b: torch.Tensor, *, lambd: float = 5e-3) -> torch.Tensor:
    """Barlow Twins on two views as in Zbontar et al. (2021), Algorithm 1, and
    facebookresearch/barlowtwins (main.py, ``BarlowTwins.forward``): each view through
    BatchNorm1d(affine=False), C = bn(z_a)ᵀ bn(z_b)/N, Σ (C_kk − 1)² + λ Σ_{k≠l} C_kl²."""
    n, d = z_a.shape
    bn = torch.nn.BatchNorm1d(d, affine=False).to(device=z_a.device, dtype=z_a.dtype)
    c = bn(z_a).T @ bn(z_b) / n
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = _off_diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag
