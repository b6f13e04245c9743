"""Graph-weighted self-supervised losses (SPEC §3), stateless.

Every loss takes ``(z, graph, *, ...)`` where ``z [N, D]`` are embeddings (views
of one image are separate rows) and ``graph`` is a :class:`palfast.PairGraph`
over the N rows. Arguments are checked here, once, before any kernel runs.
NaN/Inf in ``z`` propagate to a NaN loss like PyTorch's losses; pass
``check_finite=True`` to get a ``ValueError`` instead (it costs a host sync).
"""

from __future__ import annotations

import math

import torch

from . import _ops
from . import distributed as _dist
from .graph import PairGraph

__all__ = ["info_nce"]

_REDUCTIONS = ("mean", "sum", "none")


def _check_z(op: str, z, graph, check_finite: bool, n_global: bool = False) -> None:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{op}: z must be a torch.Tensor, got {type(z).__name__}")
    if z.dim() != 2:
        raise ValueError(f"{op}: z must be a 2-D tensor [N, D], got shape {tuple(z.shape)}")
    if z.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: z must be float32, float64, float16 or bfloat16, got {z.dtype}")
    if not isinstance(graph, PairGraph):
        raise TypeError(f"{op}: graph must be a palfast.PairGraph, got {type(graph).__name__}. "
                        "Build one with PairGraph.from_views / from_labels / from_edges")
    if not n_global and graph.num_nodes != z.shape[0]:
        raise ValueError(f"{op}: graph must have one node per row of z ({z.shape[0]}), "
                         f"got a graph over {graph.num_nodes} nodes")
    if graph.device != z.device:
        raise ValueError(f"{op}: graph must be on z's device ({z.device}), got {graph.device}; "
                         "use graph.to(z.device)")
    if check_finite and not bool(torch.isfinite(z).all()):
        raise ValueError(f"{op}: z must be finite (check_finite=True), got NaN or Inf entries")


def _check_positive(op: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{op}: {name} must be a finite number > 0, got {value}")
    return float(value)


def _check_reduction(op: str, reduction) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def info_nce(z: torch.Tensor, graph: PairGraph, *, temperature: float = 0.1,
             normalize: bool = True, reduction: str = "mean",
             check_finite: bool = False, gather: bool | None = None) -> torch.Tensor:
    r"""Graph-weighted InfoNCE (SupCon's L_out with weights), SPEC §3.1.

    .. math::
        \ell_i = -\frac{1}{W_i}\sum_{j\ne i} w_{ij}\Big[s_{ij}
                 - \log\sum_{k\ne i} e^{s_{ik}}\Big],\qquad
        s_{ij} = \langle \hat z_i, \hat z_j\rangle / \tau

    for rows with W_i = Σ_j w_ij > 0. ``reduction="mean"`` averages over those rows
    (0.0 with zero gradient when there are none), ``"sum"`` adds them, ``"none"``
    returns ``[N]`` with 0 for rows without positives. With
    ``PairGraph.from_views(n, 2)`` this is SimCLR's NT-Xent; with ``from_labels``
    it is SupCon. The kernel never builds the N×N matrix: memory is O(N·D + E).

    Args:
        z: ``[N, D]`` float32/float64/float16/bfloat16 embeddings.
        graph: :class:`PairGraph` over the N rows, on z's device.
        temperature: τ > 0.
        normalize: cosine similarity (True) or raw dot products (False).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.
        check_finite: raise ``ValueError`` on NaN/Inf in z (else they give NaN).
        gather: under torch.distributed (default: on when world size > 1) z holds
            this rank's rows and ``graph`` is over the global batch; see
            :mod:`palfast.distributed`. The value is the global loss on every rank;
            ``reduction="none"`` returns this rank's rows only.

    Returns:
        A scalar (or ``[N]`` for ``"none"``) in z's dtype, computed in float32
        (float64 for float64 z).

    Example::

        >>> import torch, palfast
        >>> z = torch.randn(8, 16, requires_grad=True)
        >>> loss = palfast.info_nce(z, palfast.PairGraph.from_views(4, 2), temperature=0.5)
        >>> loss.backward()
    """
    op = "palfast.info_nce"
    gather = _dist.resolve_gather(gather)
    _check_z(op, z, graph, check_finite, n_global=gather)
    temperature = _check_positive(op, "temperature", temperature)
    _check_reduction(op, reduction)
    keys, begin, end = (_dist.all_gather_rows(z, graph.num_nodes) if gather
                        else (z, 0, z.shape[0]))
    rows, _ = _ops.ops.info_nce(keys, *graph.kernel_args(), temperature, bool(normalize),
                                begin, end)
    if reduction == "none":
        return rows[begin:end].to(z.dtype)
    out = rows.sum()
    if reduction == "mean":
        out = out / max(graph.num_anchors, 1)
    if gather:
        out = _dist.global_value(out)
    return out.to(z.dtype)
