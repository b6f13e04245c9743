"""VICReg and Barlow Twins fwd+bwd: palfast vs the official formulas in eager PyTorch.

Workload: two views z_a, z_b of n images, each ``[n, D]`` (n is the official
losses' batch size; the official VICReg ImageNet setting is n = 2048, D = 8192).
Implementations, all in the same process:

* ``official_eager``: the official two-view loss written as in the papers'
  pseudo-code (``palfast.reference.vicreg_two_view_official`` /
  ``barlow_twins_two_view_official``, after facebookresearch/vicreg and
  facebookresearch/barlowtwins): D×D
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

import palfast
from palfast import reference

from .harness import Case

DIMS = [256, 2048, 8192]
BATCHES = [256, 2048]


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
    official = {"vicreg": reference.vicreg_two_view_official, "barlow_twins": reference.barlow_twins_two_view_official}[
        loss
    ]
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

    return {"official_eager": make_official, "palfast_two_view": make_two_view, "palfast_graph": make_graph}


def cases(quick: bool = False, device: str = "cpu") -> list[Case]:
    dims, batches = ([256, 2048], [256]) if quick else (DIMS, BATCHES)
    out = []
    for loss in ("vicreg", "barlow_twins"):
        for d in dims:
            for n in batches:
                out.append(
                    Case(
                        "bench_covariance",
                        f"{loss} n={n} D={d} float32",
                        {"loss": loss, "N": n, "D": d, "dtype": "float32"},
                        _impls(loss, n, d, device),
                        "official_eager",
                        device,
                    )
                )
    return out
