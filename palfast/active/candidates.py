"""Candidate pairs from k nearest neighbours by cosine similarity (SPEC §4).

``candidate_pairs(x, k)`` returns every unordered pair {i, j} such that j is one of
the k nearest neighbours of i or i one of j's (cosine similarity, self excluded),
once, as ``i < j``, minus the pairs the store already knows (answered or implied),
sorted by similarity, highest first (ties by (i, j) for determinism).

Backends:

* ``"faiss"``: ``IndexFlatIP`` (exact inner-product search) on the L2-normalised
  float32 rows; a GPU index when the tensor is on CUDA and faiss was built with
  GPU support, fed through ``faiss.contrib.torch_utils`` (no host copy).
* ``"torch"``: exact ``x̂ x̂ᵀ`` + ``topk``, a block of query rows at a time so at
  most ~2²⁴ similarities (64 MiB) exist at once, whatever N.
* ``"auto"``: faiss when it imports, else torch.

Inputs are validated before FAISS sees them (FAISS asserts would abort the
process): a 2-D floating tensor with N ≥ 2 finite rows, ``1 ≤ k < N``.
All-zero rows have similarity 0 with everything.

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
import torch.nn.functional as F

__all__ = ["candidate_pairs", "knn"]

_BACKENDS = ("auto", "faiss", "torch")
_MAX_BLOCK = 1 << 24  # similarities held at once by the torch backend


def _check_embeddings(op: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: embeddings must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{op}: embeddings must be a 2-D tensor [N, D], got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{op}: embeddings must be floating point, got {x.dtype}")
    if x.shape[1] < 1:
        raise ValueError(f"{op}: embeddings must have D >= 1 columns, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(1).sum())
        raise ValueError(f"{op}: embeddings must be finite, got {bad} rows with NaN or Inf")
    return x


def _check_k(op: str, k, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{op}: k must be an int, got {type(k).__name__}")
    if k < 1 or k >= n:
        raise ValueError(f"{op}: k must satisfy 1 <= k < N = {n} (number of rows), got k={k}")
    return k


def _check_backend(op: str, backend) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"{op}: backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return backend
    try:
        import faiss  # noqa: F401
    except ImportError as e:
        if backend == "faiss":
            raise ImportError(f"{op}: backend='faiss' needs the faiss package "
                              "(faiss-cpu or faiss-gpu)") from e
        return "torch"
    return "faiss"


def _faiss_search(xn: torch.Tensor, k: int):
    import faiss
    import faiss.contrib.torch_utils  # lets faiss take torch tensors directly (no copy)

    d = xn.shape[1]
    if xn.is_cuda and hasattr(faiss, "StandardGpuResources"):
        res = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.device = xn.device.index if xn.device.index is not None else torch.cuda.current_device()
        index = faiss.GpuIndexFlatIP(res, d, cfg)
    else:
        xn = xn.cpu()
        index = faiss.IndexFlatIP(d)
    index.add(xn)
    sims, nbrs = index.search(xn, k)
    return sims.to(xn.device), nbrs.to(device=xn.device, dtype=torch.long)


def _torch_search(xn: torch.Tensor, k: int):
    n = xn.shape[0]
    block = max(1, min(4096, _MAX_BLOCK // n))
    sims, nbrs = [], []
    for start in range(0, n, block):
        s = xn[start:start + block] @ xn.T
        rows = torch.arange(s.shape[0], device=xn.device)
        s[rows, rows + start] = float("-inf")  # never one's own neighbour
        v, i = s.topk(k, dim=1)
        sims.append(v)
        nbrs.append(i)
    return torch.cat(sims), torch.cat(nbrs)


def knn(embeddings: torch.Tensor, k: int, *, backend: str = "auto"):
    """The k nearest neighbours of each row by cosine similarity, self excluded.

    Returns ``(sims FloatTensor [N, k], nbrs LongTensor [N, k])``, each row sorted by
    similarity, highest first, on the embeddings' device."""
    op = "palfast.active.knn"
    x = _check_embeddings(op, embeddings)
    k = _check_k(op, k, x.shape[0])
    backend = _check_backend(op, backend)
    xn = F.normalize(x.detach().float(), dim=1).contiguous()
    if backend == "torch":
        return _torch_search(xn, k)
    # FAISS returns self among the k+1 hits (or not, with duplicate rows): drop it,
    # then keep the first k of the others.
    sims, nbrs = _faiss_search(xn, k + 1)
    rows = torch.arange(xn.shape[0], device=nbrs.device)[:, None]
    keep = (nbrs != rows) & (nbrs >= 0)
    keep &= keep.cumsum(1) <= k
    order = torch.sort(keep.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :k]
    return sims.gather(1, order).to(xn.device), nbrs.gather(1, order).to(xn.device)


def candidate_pairs(embeddings: torch.Tensor, k: int = 10, *, store=None, backend: str = "auto",
                    ids=None):
    """Unordered k-NN pairs by cosine similarity, unknown to ``store``, most similar first.

    Args:
        embeddings: ``[N, D]`` floating point; row r is sample ``ids[r]``.
        k: neighbours per row, ``1 <= k < N``.
        store: optional :class:`RelationStore`; pairs it knows (answered, or implied by
            transitivity / cannot-link) are dropped.
        backend: ``"auto"`` | ``"faiss"`` | ``"torch"`` (see the module docstring).
        ids: optional ``[N]`` distinct sample ids of the rows (default ``arange(N)``).

    Returns:
        ``pairs`` LongTensor ``[P, 2]`` of sample ids with ``pairs[:, 0] < pairs[:, 1]``,
        and ``sims`` FloatTensor ``[P]`` (cosine similarity), sorted by ``sims``
        descending; both on CPU. P ≤ N·k.
    """
    op = "palfast.active.candidate_pairs"
    x = _check_embeddings(op, embeddings)
    n = x.shape[0]
    k = _check_k(op, k, n)
    backend = _check_backend(op, backend)
    row_ids = _check_ids(op, ids, n)
    sims, nbrs = knn(x, k, backend=backend)
    sims, nbrs = sims.cpu(), nbrs.cpu()
    a = torch.arange(n).repeat_interleave(k)
    b = nbrs.reshape(-1)
    s = sims.reshape(-1)
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


def _check_ids(op: str, ids, n: int) -> torch.Tensor:
    if ids is None:
        return torch.arange(n)
    t = torch.as_tensor(ids)
    if t.shape != (n,):
        raise ValueError(f"{op}: ids must be a [N] = [{n}] tensor (one sample id per row), "
                         f"got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{op}: ids must hold integer sample ids, got {t.dtype}")
    t = t.to(device="cpu", dtype=torch.long)
    if int(t.min()) < 0:
        raise ValueError(f"{op}: ids must be >= 0, got {int(t.min())}")
    if torch.unique(t).numel() != n:
        raise ValueError(f"{op}: ids must be distinct, got {n - torch.unique(t).numel()} repeats")
    return t
