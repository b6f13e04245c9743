"""Candidate pairs from k nearest neighbours by cosine similarity (docs/active.md).

``candidate_pairs(x, k)`` returns every unordered pair {i, j} such that j is one of
the k nearest neighbours of i or i one of j's (cosine similarity, self excluded),
once, as ``i < j``, minus the pairs the store already knows (answered or implied),
sorted by similarity, highest first (ties by (i, j) for determinism). The search
is :func:`palfast.knn.knn` (FAISS, or exact torch).

Example::

    >>> import torch
    >>> from palfast.active import candidate_pairs
    >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.3, 0.7]])
    >>> pairs, sims = candidate_pairs(x, k=1, backend="torch")
    >>> pairs.tolist(), [round(s, 3) for s in sims.tolist()]
    ([[0, 1], [2, 3]], [0.994, 0.919])
"""

from __future__ import annotations

import torch

from .._checks import check_id_vector, check_instance
from ..knn import as_rows, knn
from .store import RelationStore

__all__ = ["candidate_pairs", "check_ids", "pairs_from_knn"]


def candidate_pairs(
    embeddings,
    k: int = 10,
    *,
    store=None,
    backend: str = "auto",
    ids=None,
    index: str = "auto",
    nlist: int | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
):
    """Unordered k-NN pairs by cosine similarity, unknown to ``store``, most similar first.

    Args:
        embeddings: ``[N, D]`` floating point; row r is sample ``ids[r]``. A tensor, or a
            NumPy array, memory-mapped or not (``np.load(path, mmap_mode="r")``,
            ``np.memmap``; a ``torch.from_file`` tensor too): read
            :data:`palfast.knn.CHUNK_BYTES` at a time, never copied whole.
        k: neighbours per row, ``1 <= k < N``.
        store: optional :class:`RelationStore`; pairs it knows (answered, or implied by
            transitivity / cannot-link) are dropped.
        backend: ``"auto"`` | ``"faiss"`` | ``"torch"`` (see :mod:`palfast.knn`).
        ids: optional ``[N]`` distinct sample ids of the rows (default ``arange(N)``).
        index / nlist / nprobe / ef_search: the k-NN index (:func:`palfast.knn.knn`):
            ``"auto"`` (default) is exact up to :data:`palfast.knn.AUTO_EXACT_MAX_ROWS`
            rows and ``"ivf-join"`` above (the IVF self search by GEMMs, torch only);
            ``"exact"``, ``"ivf-join"``, or the FAISS indexes ``"ivf"``, ``"ivfpq"``,
            ``"hnsw"``. With an approximate index the pairs are
            those of the approximate k-NN graph.

    Returns:
        ``pairs`` LongTensor ``[P, 2]`` of sample ids with ``pairs[:, 0] < pairs[:, 1]``,
        and ``sims`` FloatTensor ``[P]`` (cosine similarity), sorted by ``sims``
        descending; both on CPU. P ≤ N·k.
    """
    op = "palfast.active.candidate_pairs"
    # ids and store before the search, so a bad argument costs no search.
    if store is not None:
        check_instance(op, "store", store, RelationStore, "a palfast.active.RelationStore or None")
    embeddings = as_rows(op, "embeddings", embeddings, min_rows=1)
    row_ids = check_ids(op, ids, embeddings.shape[0])
    sims, nbrs = knn(
        embeddings, k, backend=backend, op=op, index=index, nlist=nlist, nprobe=nprobe, ef_search=ef_search
    )
    return pairs_from_knn(sims, nbrs, row_ids, store)


def pairs_from_knn(sims: torch.Tensor, nbrs: torch.Tensor, row_ids: torch.Tensor, store=None):
    """:func:`candidate_pairs` from a k-NN graph already searched (``sims``, ``nbrs``
    ``[N, k]`` of :func:`palfast.knn.knn`, ``-1`` = no neighbour): O(N·k log(N·k))."""
    n, k = nbrs.shape
    sims, nbrs = sims.cpu(), nbrs.cpu()
    a = torch.arange(n).repeat_interleave(k)
    b = nbrs.reshape(-1)
    s = sims.reshape(-1)
    found = b >= 0  # an approximate index may find fewer than k rows
    a, b, s = a[found], b[found], s[found]
    # i→j and j→i give the same unordered pair; keep it once (with the larger similarity,
    # the two only differ by float rounding).
    key = torch.minimum(a, b) * n + torch.maximum(a, b)
    key, inverse = torch.unique(key, return_inverse=True)
    best = torch.full((key.numel(),), float("-inf")).scatter_reduce(0, inverse, s, "amax")
    lo, hi = key // n, key % n
    pairs = torch.stack([row_ids[lo], row_ids[hi]], 1)
    pairs = torch.stack([pairs.min(1).values, pairs.max(1).values], 1)
    if store is not None:
        unknown = ~store.known_mask(pairs)
        pairs, best = pairs[unknown], best[unknown]
    # Sort by similarity (descending); the stable sort keeps ties in key order.
    order = torch.sort(-best, stable=True).indices
    return pairs[order].contiguous(), best[order].contiguous()


def check_ids(op: str, ids, n: int) -> torch.Tensor:
    if ids is None:
        return torch.arange(n)
    t = check_id_vector(op, "ids", ids, n, "sample id")
    if torch.unique(t).numel() != n:
        raise ValueError(f"{op}: ids must be distinct, got {n - torch.unique(t).numel()} repeats")
    return t
