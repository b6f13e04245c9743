"""What every loss of :mod:`palfast.losses` (and :mod:`palfast.nn`) shares: the
argument checks, run once before any kernel, the accumulation dtype, and the
plumbing of ``gather`` (docs/distributed.md) and of the two-view forms.

NaN/Inf in z propagate to a NaN loss like PyTorch's losses; ``check_finite=True``
raises ``ValueError`` instead (one host sync).
"""

from __future__ import annotations

import torch

from .. import _ops
from .. import distributed as _dist
from .._checks import FLOAT_DTYPES, check_bool, check_tensor
from ..graph import PairGraph


def acc(z: torch.Tensor) -> torch.Tensor:
    """z in the accumulation dtype: float32 for 16-bit z, else unchanged."""
    return z if z.dtype in (torch.float32, torch.float64) else z.float()


def check_finite_values(op: str, name: str, z: torch.Tensor, check_finite: bool) -> None:
    """``ValueError`` naming ``name`` when ``check_finite`` and z holds NaN or Inf."""
    if check_finite and not bool(torch.isfinite(z).all()):
        raise ValueError(f"{op}: {name} must be finite (check_finite=True), got NaN or Inf entries")


def check_gather(op: str, gather) -> bool:
    """``gather`` (True, False or None: on when torch.distributed has more than one
    rank) as a bool (:func:`palfast.distributed.resolve_gather`)."""
    return _dist.resolve_gather(None if gather is None else check_bool(op, "gather", gather))


def check_z(op: str, z, graph, check_finite, n_global: bool = False) -> torch.Tensor:
    """z: a float [N >= 1, D >= 1] tensor; graph: an unchanged PairGraph over its rows
    (over the global batch when ``n_global``). Returns the 0-dim zero of
    ``graph.check_unchanged``, which the loss adds to its result (:func:`with_check`).

    An empty batch (N = 0) is refused rather than given a loss of 0: an empty
    batch is almost always a data-loading bug (docs/api.md, "Edge cases")."""
    check_finite = check_bool(op, "check_finite", check_finite)
    check_tensor(op, "z", z, min_rows=1, dtypes=FLOAT_DTYPES)
    if not isinstance(graph, PairGraph):
        raise TypeError(
            f"{op}: graph must be a palfast.PairGraph, got {type(graph).__name__}. "
            "Build one with PairGraph.from_views / from_labels / from_edges"
        )
    if not n_global and graph.num_nodes != z.shape[0]:
        raise ValueError(
            f"{op}: graph must have one node per row of z ({z.shape[0]}), got a graph over {graph.num_nodes} nodes"
        )
    if graph.device != z.device:
        raise ValueError(f"{op}: graph must be on z's device ({z.device}), got {graph.device}; use graph.to(z.device)")
    unchanged = graph.check_unchanged(op)
    check_finite_values(op, "z", z, check_finite)
    return unchanged


def with_check(out: torch.Tensor, unchanged: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out`` in ``dtype``, plus the zero of the graph check: the result depends on the
    check, so a compiled graph cannot drop it (PairGraph.check_unchanged)."""
    return (out + unchanged.to(out.dtype)).to(dtype)


def check_rows(op: str, name: str, z: torch.Tensor, minimum: int, why: str) -> None:
    """``ValueError`` when z has fewer than ``minimum`` rows (``why`` says why)."""
    if z.shape[0] < minimum:
        raise ValueError(f"{op}: {name} must have at least {minimum} rows ({why}), got shape {tuple(z.shape)}")


def global_rows(op: str, z, graph, check_finite: bool, gather) -> tuple[torch.Tensor, torch.Tensor]:
    """Check z and, under torch.distributed (``gather``), return all ranks' rows (and
    the zero of the graph check, for :func:`with_check`).

    The covariance losses then compute the global loss on the gathered rows on
    every rank: the gather's backward sums each rank's gradient into the owner,
    i.e. world × the single-process gradient, which DDP's averaging turns back
    into the exact single-process gradient. Statistics are O(D²) (or the Gram
    side O(N²) when N < D), never more than the single-process loss uses."""
    gather = check_gather(op, gather)
    unchanged = check_z(op, z, graph, check_finite, n_global=gather)
    if gather:
        z, _, _ = _dist.all_gather_rows(z, graph.num_nodes)
    return z, unchanged


def dirichlet_mean(x: torch.Tensor, graph: PairGraph) -> torch.Tensor:
    """Σ_ij w_ij ‖x_i − x_j‖² / |G|, or 0 (with zero gradient) for an empty graph."""
    if graph.total_weight <= 0:
        return x.new_zeros(())
    return _ops.graph_dirichlet(x, *graph.kernel_args()) / graph.total_weight


def no_overflow_nan(op: str, z: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """``loss``, or ``ValueError`` naming z when it is NaN although z is finite.

    The covariance losses sum squares and fourth powers of z's entries in float32
    (float64 for float64 z); in float32 squared inner products overflow from
    |z| ≈ 1e9 (spectral_contrastive, vic2), squares from ≈ 1e19, and inf − inf gives
    NaN where the exact loss is merely large (docs/api.md, "Numerics"). A loss
    that legitimately overflows to ±inf is returned as such. One host sync (one
    scalar); skipped under torch.compile, where such a loss stays NaN."""
    if torch.compiler.is_compiling() or not bool(torch.isnan(loss)):
        return loss
    x = z.detach()
    if not bool(torch.isfinite(x).all()):
        return loss  # NaN/Inf in z: NaN loss, like PyTorch's losses (check_finite)
    peak = float(torch.maximum(x.amax(), -x.amin()))
    acc_dtype = str(_ops._acc_dtype(z)).removeprefix("torch.")
    raise ValueError(
        f"{op}: z is too large for {acc_dtype} accumulation (largest |z| = "
        f"{peak:g}): its sums of squares overflow and the loss would be NaN; scale z "
        "down (normalise it), or pass z.double()"
    )


# ------------------------------------------------------------ two-view forms
def check_two_views(op: str, z_a, z_b, min_rows: int, check_finite, names: tuple[str, str] = ("z_a", "z_b")) -> None:
    """z_a, z_b: two float [n >= min_rows, D] tensors of one shape, dtype and device
    (finite when ``check_finite``), called ``names`` in errors."""
    check_finite = check_bool(op, "check_finite", check_finite)
    a, b = names
    if not isinstance(z_b, torch.Tensor):
        raise TypeError(f"{op}: {b} must be a torch.Tensor (or pass a PairGraph), got {type(z_b).__name__}")
    for name, t in zip(names, (z_a, z_b)):
        check_tensor(op, name, t, min_rows=min_rows, dtypes=FLOAT_DTYPES)
    if z_a.shape != z_b.shape:
        raise ValueError(
            f"{op}: {a} and {b} must both be [n, D] with the same shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}"
        )
    if z_a.dtype != z_b.dtype or z_a.device != z_b.device:
        raise ValueError(
            f"{op}: {b} must have {a}'s dtype and device ({z_a.dtype}, {z_a.device}), got {z_b.dtype}, {z_b.device}"
        )
    for name, t in zip(names, (z_a, z_b)):
        check_finite_values(op, name, t, check_finite)


def two_views(op: str, z_a, z_b, min_rows: int, check_finite, gather) -> tuple[torch.Tensor, torch.Tensor]:
    """Check z_a and z_b (:func:`check_two_views`) and, under torch.distributed
    (``gather``), return every rank's views (:func:`gathered_views`); else z_a, z_b."""
    check_two_views(op, z_a, z_b, min_rows, check_finite)
    if check_gather(op, gather):
        z_a, z_b = gathered_views(z_a, z_b)
    return z_a, z_b


def stacked_views(z_a, z_b, gather: bool) -> tuple[torch.Tensor, PairGraph]:
    """cat(z_a, z_b) and the graph that pairs each image's two views: row i with row
    i + n. Gathered (``gather``), this rank's rows are one block of the global batch,
    whose rank blocks are cat(z_a, z_b) each, so the graph pairs i with i + n_r inside
    every rank's block (n_r that rank's images)."""
    z = torch.cat([z_a, z_b])
    if not gather:
        return z, PairGraph.from_views(z_a.shape[0], 2, device=z_a.device)
    counts = _dist.row_counts(z_a.shape[0], z_a.device)
    starts = [sum(counts[:r]) for r in range(len(counts))]
    image = torch.cat([torch.arange(s, s + c, device=z.device).repeat(2) for s, c in zip(starts, counts)])
    return z, PairGraph.from_labels(image)


def gathered_views(z_a, z_b) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's z_a and z_b (with gradient), each concatenated in rank order: the
    global two-view batch, on every rank. As for the covariance losses' gather, the
    loss of it is the global value on every rank; the gather's backward sums every
    rank's gradient into the owner (world × the single-process gradient), which DDP's
    averaging turns back into the single-process gradient."""
    counts = _dist.row_counts(z_a.shape[0], z_a.device)
    rows, _, _ = _dist.all_gather_rows(torch.cat([z_a, z_b]), 2 * sum(counts))
    blocks = rows.split([c for c in counts for _ in range(2)])  # a_0, b_0, a_1, b_1, ...
    return torch.cat(blocks[0::2]), torch.cat(blocks[1::2])
