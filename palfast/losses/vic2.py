"""PAL's VIC² loss (:func:`vic2`): a graph invariance term plus an unbiased
estimate of ‖E[zzᵀ] − I‖²_F, from two independent halves of the batch or, on a
fixed pool of images, from the finite-pool estimator (docs/api.md, "vic2: the
orthogonality term")."""

from __future__ import annotations

import torch

from .. import _ops
from .._checks import check_int, check_number
from ..graph import PairGraph
from ._common import acc, dirichlet_mean, global_rows, no_overflow_nan, with_check

__all__ = ["vic2"]


def _orthogonality_halves(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """tr((AᵀA/n_a − I)(BᵀB/n_b − I)), unbiased for ‖E[zzᵀ] − I‖_F² when A ⟂ B."""
    na, nb, d = a.shape[0], b.shape[0], a.shape[1]
    cross = _ops.sq_xcorr(a.T, b.T, False)[0]  # ‖A Bᵀ‖² = <AᵀA, BᵀB>
    return cross / (na * nb) - a.square().sum() / na - b.square().sum() / nb + d


def _orthogonality_pool(blocks: torch.Tensor, pool: int) -> torch.Tensor:
    """vic2's pool estimator of ‖(1/P) Σ_pool X_i − I‖² (docs/api.md, "vic2: the
    orthogonality term") from ``blocks [V, n, D]`` (view v of image i) and the pool
    size P ≥ n."""
    v, n, d = blocks.shape
    x = blocks.reshape(-1, d)
    s_sq = _ops.sq_xcorr(x, None, False)[0] / v**2  # ‖S‖², S = ZᵀZ / V
    grams = torch.einsum("vnd,wnd->nvw", blocks, blocks)  # z_ivᵀ z_iw
    own_sq = grams.square().sum() / v**2  # Σ_i ‖X_i‖²
    trace = x.square().sum() / v  # tr S
    return (pool - 1) / (pool * n * (n - 1)) * (s_sq - own_sq) + own_sq / (pool * n) - 2 * trace / n + d


def vic2(
    z: torch.Tensor,
    graph: PairGraph,
    *,
    beta: float = 1.0,
    n_views: int = 1,
    pool_size: int | None = None,
    check_finite: bool = False,
    gather: bool | None = None,
) -> torch.Tensor:
    r"""PAL's VIC² loss (Cabannes et al. 2023) with an unbiased orthogonality term.

    .. math::
        \mathcal L = \beta\,\frac{1}{|G|}\sum_{ij} w_{ij}\|z_i - z_j\|^2
                     + \big\|\mathbb E[z z^\top] - I\big\|_F^2

    The invariance term is the graph's mean over positive pairs (0 for an empty graph;
    no 1/D, unlike :func:`vicreg`). The second term, a square of an expectation, is
    estimated without bias (its plug-in value is biased) from two independent halves
    of the images, or on a fixed pool with ``pool_size``; it can be negative. Why,
    the formulas and their bounds: docs/api.md#vic2-the-orthogonality-term.

    Args:
        z, graph: ``[N, D]`` float embeddings; a :class:`PairGraph` over its rows.
        beta: weight >= 0 of the invariance term.
        n_views: z is ``n_views`` stacked blocks of n >= 2 images (row ``i + v·n`` is
            view v of image i; the halves never split an image's views).
        pool_size: None = an infinite population (halves); P = the images come from
            a fixed pool of P >= n (n global if gathered).
        check_finite, gather: as for every loss (:mod:`palfast.functional`).

    Example::

        >>> import torch, palfast
        >>> z = torch.randn(8, 16, requires_grad=True)   # cat(z_a, z_b): n_views=2
        >>> palfast.vic2(z, palfast.PairGraph.from_views(4, 2), n_views=2).backward()
    """
    op = "palfast.vic2"
    z, unchanged = global_rows(op, z, graph, check_finite, gather)
    beta = check_number(op, "beta", beta, 0.0)
    n_views = check_int(op, "n_views", n_views, 1)
    if z.shape[0] % n_views:
        raise ValueError(
            f"{op}: z must have a multiple of n_views = {n_views} rows "
            f"(stacked view blocks), got shape {tuple(z.shape)}"
        )
    x = acc(z)
    n, d = x.shape[0] // n_views, x.shape[1]
    if n < 2:
        raise ValueError(
            f"{op}: z must hold at least 2 images per view block (two independent "
            f"halves), got shape {tuple(z.shape)} with n_views={n_views}"
        )
    blocks = x.reshape(n_views, n, d)
    if pool_size is not None:
        pool_size = check_int(op, "pool_size", pool_size, n)
        ortho = _orthogonality_pool(blocks, pool_size)
    else:
        ortho = _orthogonality_halves(blocks[:, : n // 2].reshape(-1, d), blocks[:, n // 2 :].reshape(-1, d))
    return no_overflow_nan(op, z, with_check(beta * dirichlet_mean(x, graph) + ortho, unchanged, z.dtype))
