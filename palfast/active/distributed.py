"""Candidate pairs over the rows of every rank of a torch.distributed job, the database
sharded across the ranks (docs/distributed.md, "Candidate pairs over ranks").

The loss collectives live in :mod:`palfast.distributed`; this module adds the k-NN
search of active PAL on top of them, the way FAISS ``IndexShards`` splits one search
over several indexes, but over the process group: each rank indexes its own rows,
every rank's queries reach every shard, and each query's top-k is merged from the
shards' top-k lists on one rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .._checks import check_int
from ..distributed import is_distributed
from ..knn import (
    as_rows,
    build_index,
    check_index_params,
    chunk_rows,
    drop_self,
    resolve_backend,
    resolve_index,
    unit_rows,
)
from .candidates import candidate_pairs as local_candidate_pairs
from .candidates import pairs_from_knn

__all__ = ["candidate_pairs"]

_OP = "palfast.active.distributed.candidate_pairs"


def candidate_pairs(
    embeddings,
    k: int = 10,
    *,
    store=None,
    backend: str = "auto",
    src: int = 0,
    index: str = "auto",
    nlist: int | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`palfast.active.candidate_pairs` over all ranks' rows, the search sharded.

    Every rank passes its local embeddings ``[n_r, D]`` (``n_r`` may be 0; a tensor or
    a memory-mapped array, as :func:`palfast.active.candidate_pairs` takes); global
    sample id = row of the concatenation in rank order. Then, as FAISS
    ``IndexShards`` does across devices:

    1. each rank builds the index ``index`` over its own rows only (exact, or IVF /
       IVF-PQ / HNSW per shard; ``nlist``, ``nprobe``, ``ef_search`` apply to each
       shard, the default ``nlist`` from the shard's own size; ``"auto"`` decides by
       the global N, so every shard uses the same kind);
    2. the queries (every rank's rows, normalised by their owner) reach every shard
       by an all-gather, :func:`palfast.knn.chunk_rows` / world rows per rank per
       round, so no rank ever holds more than one round of queries;
    3. each shard returns each query's top-(k + 1) among its rows with global ids,
       gathered on rank ``src``, which merges them into the query's top-k (the k + 1
       highest similarities of all shards, its own row dropped);
    4. rank ``src`` builds the pairs from the merged k-NN graph and drops those its
       :class:`~palfast.active.RelationStore` knows (only ``src`` needs the store:
       pass ``store=None`` elsewhere; keep one writer, and record the oracle's
       answers there), and broadcasts ``(pairs [P, 2], sims [P])``: every rank
       returns the same tensors.

    With the exact index the merged graph is the single-process one (a rank's
    top-(k + 1) contains every global top-k neighbour it holds), so the pairs are
    :func:`palfast.active.candidate_pairs`' up to the rounding of the similarities.
    Memory: each rank holds its shard's index and one round of queries; rank ``src``
    also holds the ``[N, k]`` graph. Traffic: every rank receives all N·D float32
    query values and sends N·(k + 1) results to ``src``. Without a process group of
    more than one rank it is :func:`palfast.active.candidate_pairs`.

    Bad arguments raise on every rank (never one rank alone, which would leave the
    others waiting in a collective): a rank whose embeddings are invalid raises its
    own error, the others a ValueError naming it.

    Example (inside a torchrun script)::

        pairs, sims = palfast.active.distributed.candidate_pairs(
            model(x_local).detach(), k=10, store=store if rank == 0 else None)
    """
    if not is_distributed():
        return local_candidate_pairs(
            embeddings, k, store=store, backend=backend, index=index, nlist=nlist, nprobe=nprobe, ef_search=ef_search
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    src = check_int(_OP, "src", src, 0, world - 1)
    x, counts, d = _agree_on_rows(embeddings)
    n = sum(counts)
    k = check_int(_OP, "k", k)
    if not 1 <= k < n:
        raise ValueError(f"{_OP}: k must satisfy 1 <= k < N = {n} (rows of all ranks), got k={k}")
    seed = check_int(_OP, "seed", seed, 0)
    backend = resolve_backend(_OP, backend)
    index = resolve_index(_OP, index, backend, n)
    # Every rank checks every shard's parameters, so a bad one raises everywhere.
    params = {}
    for r, n_r in enumerate(counts):
        if n_r:
            try:
                params[r] = check_index_params(_OP, index, n_r, d, k, nlist, nprobe, ef_search, None)
            except ValueError as e:
                raise ValueError(f"{e} (here N is the {n_r} rows of rank {r}'s shard)") from None
    comm = _comm_device(x)
    built = build_index(x, backend, index, params[rank], seed) if counts[rank] else None
    offsets = [sum(counts[:r]) for r in range(world)]
    per_round = max(1, chunk_rows(d) // world)  # one round of all ranks' queries: one chunk
    is_src = rank == src
    if is_src:
        all_sims = torch.full((n, k), float("-inf"))
        all_nbrs = torch.full((n, k), -1, dtype=torch.long)
    for start in range(0, max(counts), per_round):
        takes = [max(0, min(per_round, c - start)) for c in counts]
        mine = torch.zeros(per_round, d, dtype=torch.float32, device=comm)
        if takes[rank]:
            mine[: takes[rank]] = unit_rows(x[start : start + takes[rank]], comm)
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine)
        queries = torch.cat([p[:t] for p, t in zip(parts, takes)])
        sims, nbrs = _shard_top(built, queries, k + 1, offsets[rank], comm)
        got_s = [torch.empty_like(sims) for _ in range(world)] if is_src else None
        got_n = [torch.empty_like(nbrs) for _ in range(world)] if is_src else None
        dist.gather(sims, got_s, dst=src)
        dist.gather(nbrs, got_n, dst=src)
        if is_src:
            rows = torch.cat([torch.arange(t) + offsets[r] + start for r, t in enumerate(takes)])
            s, i = _merge(torch.cat(got_s, 1).cpu(), torch.cat(got_n, 1).cpu(), k + 1)
            all_sims[rows], all_nbrs[rows] = drop_self(s, i, k, "cpu", rows)
    size = torch.zeros(1, dtype=torch.long, device=comm)
    if is_src:
        pairs, sims = pairs_from_knn(all_sims, all_nbrs, torch.arange(n), store)
        pairs, sims = pairs.to(comm), sims.to(device=comm, dtype=torch.float32)
        size[0] = pairs.shape[0]
    dist.broadcast(size, src)
    if not is_src:
        pairs = torch.empty(int(size), 2, dtype=torch.long, device=comm)
        sims = torch.empty(int(size), dtype=torch.float32, device=comm)
    dist.broadcast(pairs, src)
    dist.broadcast(sims, src)
    return pairs.cpu(), sims.cpu()


def _comm_device(x: torch.Tensor) -> torch.device:
    """Where collective buffers live: x's GPU, the current GPU under NCCL (which takes
    CUDA tensors only), else the CPU."""
    if x.is_cuda:
        return x.device
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree_on_rows(embeddings):
    """This rank's rows (validated, finite), every rank's row count, and the common
    width D; raises on every rank if any rank's rows are invalid or widths differ."""
    try:
        x, err = as_rows(_OP, "embeddings", embeddings, finite=True), None
    except (TypeError, ValueError) as e:
        x, err = None, e
    device = (
        _comm_device(x)
        if x is not None
        else (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        )
    )
    mine = torch.tensor(
        [err is None, 0 if x is None else x.shape[0], 0 if x is None else x.shape[1]], dtype=torch.long, device=device
    )
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    ok, counts, widths = (list(v) for v in zip(*(e.cpu().tolist() for e in every)))
    if err is not None:
        raise err
    if not all(ok):
        bad = [r for r, good in enumerate(ok) if not good]
        raise ValueError(f"{_OP}: embeddings of rank(s) {bad} are invalid (their own error says why); no rank searched")
    used = {w for w, c in zip(widths, counts) if c}
    if len(used) > 1:
        raise ValueError(
            f"{_OP}: embeddings must have the same width D on every rank, got widths {widths} (rows per rank {counts})"
        )
    if not sum(counts):
        raise ValueError(f"{_OP}: embeddings must hold at least 2 rows over all ranks, got 0")
    return x, counts, used.pop()


def _shard_top(built, queries: torch.Tensor, k: int, offset: int, device):
    """This shard's top-k of ``queries`` with global ids, padded to k columns with
    −inf / −1 when the shard holds fewer rows (or none)."""
    m = queries.shape[0]
    sims = torch.full((m, k), float("-inf"), device=device)
    nbrs = torch.full((m, k), -1, dtype=torch.long, device=device)
    if built is not None and m:
        kk = min(k, built.n)
        s, i = built.search(queries, kk, normalized=True)
        sims[:, :kk] = s.to(device)
        nbrs[:, :kk] = torch.where(i >= 0, i + offset, i).to(device)
    return sims, nbrs


def _merge(sims: torch.Tensor, nbrs: torch.Tensor, k: int):
    """Each row's k highest similarities of the shards' lists laid side by side (in
    rank order; the stable sort keeps equal similarities in that order), missing
    places (−inf / −1) last."""
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]
    return sims.gather(1, order), nbrs.gather(1, order)
