"""torch.distributed support for the losses (docs/distributed.md).

Each rank passes its local rows ``z [n_r, D]`` and a graph over the **global**
batch: rank r's rows are global rows ``offset_r .. offset_r + n_r`` with
``offset_r = Σ_{q<r} n_q`` (ranks in order). A loss called with ``gather`` then

* gathers every rank's rows **with gradient** (:func:`all_gather_rows`; its
  backward sums each slice's gradient over ranks and hands it to the owner);
* ``info_nce``: uses the local rows as anchors and all rows as keys (the kernel
  skips pairs of two non-anchor rows, so a rank does ~1/world of the work and
  nobody holds an N×N matrix); the covariance losses compute their statistics
  over the gathered rows, on every rank;
* returns the single-process value of the global batch on every rank, with a
  gradient scaled by the world size (``info_nce`` through :func:`global_value`, the
  covariance losses through the gather's backward), so that after DDP averages
  gradients over ranks the parameters get exactly the single-process gradient.

Collectives used here: ``all_gather`` (:func:`row_counts`, :func:`all_gather_rows`,
:func:`gather_rows_no_grad`), ``all_reduce`` (the gather's backward,
:func:`all_reduce_sum`, :func:`global_value`) and ``barrier``
(:func:`exit_process`); all work with gloo (CPU) and NCCL alike. The sharded
candidate search (:mod:`palfast.active.distributed`) adds ``gather`` and
``broadcast``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_rows",
    "all_reduce_sum",
    "exit_process",
    "gather_rows_no_grad",
    "global_value",
    "is_distributed",
    "resolve_gather",
    "row_counts",
]


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def resolve_gather(gather) -> bool:
    """``gather=None`` means: on when :func:`is_distributed`."""
    if gather is None:
        return is_distributed()
    if gather and not is_distributed():
        raise ValueError(
            "gather=True needs an initialised torch.distributed process group with "
            "world size > 1 (call torch.distributed.init_process_group first)"
        )
    return bool(gather)


def row_counts(n_local: int, device) -> list[int]:
    """Every rank's number of rows, in rank order (one ``all_gather`` of one int64
    on ``device``; every rank must call it)."""
    # Always exchanged (one tiny collective): guessing an equal split from local
    # sizes could make ranks disagree on whether to communicate, and hang.
    world = dist.get_world_size()
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([n_local], dtype=torch.long, device=device))
    return [int(c) for c in counts]


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, counts):
        rank, biggest = dist.get_rank(), max(counts)
        padded = z.new_zeros(biggest, *z.shape[1:])
        padded[: z.shape[0]] = z
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous())
        ctx.counts, ctx.rank = counts, rank
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss touches every slice: sum them
        begin = sum(ctx.counts[: ctx.rank])
        return grad[begin : begin + ctx.counts[ctx.rank]], None


def all_gather_rows(z: torch.Tensor, n_global: int) -> tuple[torch.Tensor, int, int]:
    """Concatenate every rank's rows (with gradient). Returns ``(z_all, begin, end)``,
    the rows ``[begin, end)`` of ``z_all`` being this rank's ``z``."""
    counts = row_counts(z.shape[0], z.device)
    if sum(counts) != n_global:
        raise ValueError(
            f"graph must be over the global batch: the ranks hold {sum(counts)} rows "
            f"({counts}) but the graph has {n_global} nodes"
        )
    begin = sum(counts[: dist.get_rank()])
    return _AllGatherRows.apply(z, counts), begin, begin + z.shape[0]


def gather_rows_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``x``, concatenated in rank order, without gradient."""
    with torch.no_grad():
        return _AllGatherRows.apply(x.detach(), row_counts(x.shape[0], x.device))


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ over ranks with an autograd-aware backward (the gradient of a sum is summed too)."""
    return _AllReduceSum.apply(x)


def global_value(local_part: torch.Tensor) -> torch.Tensor:
    """Σ_r local_part_r as the value, ``world · local_part`` as the gradient path.

    DDP averages gradients over ranks; scaling by the world size turns that
    average back into the single-process gradient of the global loss."""
    world = dist.get_world_size()
    total = local_part.detach().clone()
    dist.all_reduce(total)
    scaled = world * local_part
    return scaled + (total - scaled).detach()


def exit_process(code: int = 0) -> None:
    """End this rank now, without the abort that gloo can hit at interpreter exit.

    Waits for every rank (a barrier), destroys the process group, flushes stdout
    and stderr and calls ``os._exit(code)``. Call it last, once results are
    saved: atexit handlers and ``finally`` blocks do not run after it.

    Why: a gloo process group has no shutdown, so its worker threads outlive
    ``destroy_process_group()``. A collective issued inside ``backward()`` (DDP's
    bucket all-reduce, palfast's all-gather backward) captures the caller's
    thread-local state, which holds Python objects; when the last reference to
    that work is dropped on a gloo thread while the main thread is in
    ``Py_FinalizeEx``, the decref waits for the GIL, CPython ends the thread with
    a forced unwind, and the unwind through a ``noexcept`` destructor calls
    ``std::terminate`` ("terminate called without an active exception", SIGABRT).
    Plain DDP on gloo without palfast aborts the same way; ``os._exit`` skips
    interpreter finalization, so nothing can race with it (docs/distributed.md).
    """
    import os
    import sys

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears gloo down while another still sends
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
