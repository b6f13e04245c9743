"""Candidate pairs over the rows of every rank of a torch.distributed job (docs/active.md).

The loss collectives live in :mod:`palfast.distributed`; this module only adds the
k-NN search of active PAL on top of them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .._checks import check_int, check_tensor
from ..distributed import gather_rows_no_grad, is_distributed
from .candidates import candidate_pairs as local_candidate_pairs

__all__ = ["candidate_pairs"]


def candidate_pairs(embeddings: torch.Tensor, k: int = 10, *, store=None, backend: str = "auto",
                    src: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`palfast.active.candidate_pairs` over all ranks' rows, computed on rank ``src``.

    Every rank passes its local embeddings ``[n_r, D]``; they are gathered
    without gradient in rank order (global sample id = row of the concatenation),
    the k-NN search runs once on rank ``src`` (FAISS there, on its GPU when it has
    one) and the resulting ``(pairs [P, 2], sims [P])`` are broadcast, so every
    rank returns the same tensors. Only rank ``src`` needs the
    :class:`~palfast.active.RelationStore` (pass ``store=None`` elsewhere): keep
    one writer, and record the oracle's answers there. Without a process group
    of more than one rank it is :func:`palfast.active.candidate_pairs`.

    Example (inside a torchrun script)::

        pairs, sims = palfast.active.distributed.candidate_pairs(
            model(x_local).detach(), k=10, store=store if rank == 0 else None)
    """
    if not is_distributed():
        return local_candidate_pairs(embeddings, k, store=store, backend=backend)
    op = "palfast.active.distributed.candidate_pairs"
    check_tensor(op, "embeddings", embeddings)
    src = check_int(op, "src", src, 0, dist.get_world_size() - 1)
    device = embeddings.device
    everything = gather_rows_no_grad(embeddings)
    size = torch.zeros(1, dtype=torch.long, device=device)
    if dist.get_rank() == src:
        pairs, sims = local_candidate_pairs(everything, k, store=store, backend=backend)
        pairs, sims = pairs.to(device), sims.to(device=device, dtype=torch.float32)
        size[0] = pairs.shape[0]
    dist.broadcast(size, src)
    if dist.get_rank() != src:
        pairs = torch.empty(int(size), 2, dtype=torch.long, device=device)
        sims = torch.empty(int(size), dtype=torch.float32, device=device)
    dist.broadcast(pairs, src)
    dist.broadcast(sims, src)
    return pairs.cpu(), sims.cpu()
