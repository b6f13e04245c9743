"""Exact k nearest neighbours by cosine similarity: the one k-NN of palfast.

Used by the candidate pairs of active PAL (:mod:`palfast.active.candidates`), the
k-NN classifier of :mod:`palfast.metrics` and the benchmarks.

Backends:

* ``"faiss"``: ``IndexFlatIP`` (exact inner-product search) on the L2-normalised
  float32 rows; a GPU index when the tensor is on CUDA and faiss was built with
  GPU support, fed through ``faiss.contrib.torch_utils`` (no host copy).
* ``"torch"``: exact ``q̂ k̂ᵀ`` + ``topk``, a block of query rows at a time so at
  most :data:`MAX_BLOCK` similarities exist at once, whatever N.
* ``"auto"``: faiss when it imports, else torch.

Inputs are validated before FAISS sees them (FAISS asserts would abort the
process). Rows are scaled by their largest entry before normalising, so rows of
norm ~1e20 in float32 do not overflow when squared. All-zero rows have
similarity 0 with everything.

Example::

    >>> import torch
    >>> from palfast.knn import knn
    >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    >>> sims, nbrs = knn(x, 1, backend="torch")
    >>> nbrs.tolist()
    [[1], [0], [1]]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_choice, check_int, check_tensor

__all__ = ["BACKENDS", "MAX_BLOCK", "knn", "resolve_backend", "unit_rows"]

BACKENDS = ("auto", "faiss", "torch")
# Similarities the torch backend holds at once (2^24 float32 = 64 MiB), and the
# most query rows per block: bounded memory at any N, blocks big enough for BLAS.
MAX_BLOCK = 1 << 24
MAX_BLOCK_ROWS = 4096


def resolve_backend(op: str, backend) -> str:
    """``"faiss"`` or ``"torch"``: what ``backend`` means on this machine."""
    check_choice(op, "backend", backend, BACKENDS)
    if backend == "torch":
        return backend
    try:
        import faiss  # noqa: F401
    except ImportError as e:
        if backend == "faiss":
            raise ImportError(f"{op}: backend='faiss' needs the faiss package "
                              "(pip install faiss-cpu, or faiss-gpu)") from e
        return "torch"
    return "faiss"


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of x scaled to unit L2 norm in float32, contiguous (zero rows stay zero).

    Each row is first divided by its largest absolute entry, so squaring cannot
    overflow however large the row is."""
    x = x.detach().float()
    peak = x.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return F.normalize(x / peak, dim=1).contiguous()


def _faiss_search(queries: torch.Tensor, keys: torch.Tensor, k: int):
    import faiss
    import faiss.contrib.torch_utils  # noqa: F401  (lets faiss take torch tensors, no copy)

    d = keys.shape[1]
    if keys.is_cuda and hasattr(faiss, "StandardGpuResources"):
        res = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.device = keys.device.index if keys.device.index is not None else torch.cuda.current_device()
        index = faiss.GpuIndexFlatIP(res, d, cfg)
    else:
        keys, queries = keys.cpu(), queries.cpu()
        index = faiss.IndexFlatIP(d)
    index.add(keys)
    sims, nbrs = index.search(queries, k)
    return sims, nbrs.to(torch.long)


def _torch_search(queries: torch.Tensor, keys: torch.Tensor, k: int, exclude_self: bool):
    block = max(1, min(MAX_BLOCK_ROWS, MAX_BLOCK // keys.shape[0]))
    sims, nbrs = [], []
    for start in range(0, queries.shape[0], block):
        s = queries[start:start + block] @ keys.T
        if exclude_self:  # never one's own neighbour
            rows = torch.arange(s.shape[0], device=s.device)
            s[rows, rows + start] = float("-inf")
        v, i = s.topk(k, dim=1)
        sims.append(v)
        nbrs.append(i)
    return torch.cat(sims), torch.cat(nbrs)


def knn(x: torch.Tensor, k: int, *, keys: torch.Tensor | None = None, backend: str = "auto",
        op: str = "palfast.knn.knn", finite: bool = True):
    """The k most cosine-similar rows of ``keys`` for each row of ``x``.

    Args:
        x: ``[M, D]`` floating point queries, finite.
        k: neighbours per query; ``1 <= k < M`` when ``keys`` is None (the rows of x
            are searched, each row excluding itself), else ``1 <= k <= len(keys)``.
        keys: optional ``[N, D]`` rows to search among.
        backend: ``"auto"`` | ``"faiss"`` | ``"torch"``.
        op: the public name reported in error messages.
        finite: scan x and keys for NaN/Inf (False only when the caller already did).

    Returns:
        ``(sims FloatTensor [M, k], nbrs LongTensor [M, k])``, each row sorted by
        similarity, highest first, on x's device.
    """
    self_search = keys is None
    x = check_tensor(op, "embeddings" if self_search else "queries", x, min_rows=1, finite=finite)
    if self_search:
        k = check_int(op, "k", k)
        if not 1 <= k < x.shape[0]:
            raise ValueError(f"{op}: k must satisfy 1 <= k < N = {x.shape[0]} (number of rows), "
                             f"got k={k}")
    else:
        keys = check_tensor(op, "keys", keys, min_rows=1, finite=finite)
        if keys.shape[1] != x.shape[1]:
            raise ValueError(f"{op}: keys must have the queries' width D = {x.shape[1]}, "
                             f"got shape {tuple(keys.shape)}")
        k = check_int(op, "k", k, 1, keys.shape[0])
    backend = resolve_backend(op, backend)
    queries = unit_rows(x)
    keys = queries if self_search else unit_rows(keys).to(queries.device)
    if backend == "torch":
        return _torch_search(queries, keys, k, self_search)
    if not self_search:
        sims, nbrs = _faiss_search(queries, keys, k)
        return sims.to(x.device), nbrs.to(x.device)
    # FAISS returns self among the k+1 hits (or not, with duplicate rows): drop it,
    # then keep the first k of the others.
    sims, nbrs = _faiss_search(queries, keys, k + 1)
    rows = torch.arange(queries.shape[0], device=nbrs.device)[:, None]
    keep = (nbrs != rows) & (nbrs >= 0)
    keep &= keep.cumsum(1) <= k
    order = torch.sort(keep.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :k]
    return sims.gather(1, order).to(x.device), nbrs.gather(1, order).to(x.device)
