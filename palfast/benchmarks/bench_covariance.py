"""VICReg and Barlow Twins fwd+bwd: palfast vs the official formulas in eager PyTorch.

Workload: two views z_a, z_b of n images, each ``[n, D]`` (n is the official
losses' batch size; the official VICReg ImageNet setting is n = 2048, D = 8192).
Implementations, all in the same process:

* ``official_eager``: the official two-view loss written as in the papers'
  pseudo-code (facebookresearch/vicreg, facebookresearch/barlowtwins): D×D
  covariance / cross-correlation matrices, autograd backward. The baseline.
* ``palfast_two_view``: ``palfast.nn.VICRegLoss()(z_a, z_b)`` (resp.
  ``BarlowTwinsLoss``): the *same* loss value, with the squared Frobenius norms
  taken through n×n Gram matrices when n < D.
* ``palfast_graph``: the PAL graph form on ``cat(z_a, z_b)`` with
  ``PairGraph.from_views(n, 2)`` (2n rows). A different loss (statistics over the
  pooled rows, see the docstrings), timed because it is what PAL training calls.

Run ``palfast bench --only covariance [--quick] [--filter vicreg]``, or
``python bench/bench_covariance.py`` from a checkout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import palfast

from .harness import Case

DIMS = [256, 2048, 8192]
BATCHES = [256, 2048]


def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    return m[~torch.eye(m.shape[0], dtype=torch.bool, device=m.device)]


def official_vicreg(x, y, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    """VICReg, Bardes et al. 2022 (Algorithm 1), per-view variance and covariance."""
    n, d = x.shape
    repr_loss = F.mse_loss(x, y)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (n - 1)
    cov_y = (y.T @ y) / (n - 1)
    cov_loss = _off_diagonal(cov_x).pow(2).sum() / d + _off_diagonal(cov_y).pow(2).sum() / d
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss


def official_barlow_twins(z1, z2, lambd=5e-3):
    """Barlow Twins, Zbontar et al. 2021 (Algorithm 1): BatchNorm1d(affine=False) per view."""
    n, d = z1.shape
    bn = torch.nn.BatchNorm1d(d, affine=False).to(device=z1.device, dtype=z1.dtype)
    c = bn(z1).T @ bn(z2) / n
    return (torch.diagonal(c) - 1).pow(2).sum() + lambd * _off_diagonal(c).pow(2).sum()


def _views(n: int, d: int, device: str):
    gen = torch.Generator(device=device).manual_seed(n * 31 + d)
    z_a = torch.randn(n, d, device=device, generator=gen)
    z_b = z_a + 0.5 * torch.randn(n, d, device=device, generator=gen)
    return z_a, z_b


def _step(loss_fn, *leaves):
    def run():
        for t in leaves:
            t.grad = None
        loss_fn(*leaves).backward()
    return run


def _impls(loss: str, n: int, d: int, device: str) -> dict:
    official = {"vicreg": official_vicreg, "barlow_twins": official_barlow_twins}[loss]
    module = {"vicreg": palfast.nn.VICRegLoss, "barlow_twins": palfast.nn.BarlowTwinsLoss}[loss]
    graph_fn = {"vicreg": palfast.vicreg, "barlow_twins": palfast.barlow_twins}[loss]

    def two_leaves():
        return [t.requires_grad_() for t in _views(n, d, device)]

    def make_official():
        return _step(official, *two_leaves())

    def make_two_view():
        return _step(module(), *two_leaves())

    def make_graph():
        z = torch.cat(_views(n, d, device)).requires_grad_()
        g = palfast.PairGraph.from_views(n, 2, device=device)
        return _step(lambda x: graph_fn(x, g), z)

    return {"official_eager": make_official, "palfast_two_view": make_two_view,
            "palfast_graph": make_graph}


def cases(quick: bool = False, device: str = "cpu") -> list[Case]:
    dims, batches = ([256, 2048], [256]) if quick else (DIMS, BATCHES)
    out = []
    for loss in ("vicreg", "barlow_twins"):
        for d in dims:
            for n in batches:
                out.append(Case("bench_covariance", f"{loss} n={n} D={d} float32",
                                {"loss": loss, "N": n, "D": d, "dtype": "float32"},
                                _impls(loss, n, d, device), "official_eager", device))
    return out

