"""k nearest neighbours by cosine similarity, exact or approximate: the one k-NN of palfast.

Used by the candidate pairs of active PAL (:mod:`palfast.active.candidates`), the
k-NN classifier of :mod:`palfast.metrics` and the benchmarks.

Backends:

* ``"faiss"``: ``IndexFlatIP`` (exact inner-product search) on the L2-normalised
  float32 rows; a GPU index when the tensor is on CUDA and faiss was built with
  GPU support, fed through ``faiss.contrib.torch_utils`` (no host copy).
* ``"torch"``: exact ``q̂ k̂ᵀ`` + ``topk``, a block of query rows at a time so at
  most :data:`MAX_BLOCK` similarities exist at once, whatever N.
* ``"auto"``: faiss when it imports, else torch.

Indexes (``index=``; the torch backend is exact only):

* ``"exact"``: the flat search above, every similarity computed (N²·D for a self search).
* ``"ivf"``: FAISS ``IndexIVFFlat``: k-means into ``nlist`` lists (trained on
  :data:`TRAIN_ROWS_PER_LIST` sampled rows per list), a query scans its ``nprobe``
  nearest lists. Approximate; on the CPU even for CUDA tensors.
* ``"ivfpq"``: FAISS ``IndexIVFPQ``, the same lists with rows compressed to ``pq_m``
  bytes (8-bit codes) instead of 4·D: for when the index does not fit in memory.
  Similarities are then approximate too, and recall lower than ``"ivf"``'s.
* ``"hnsw"``: FAISS ``IndexHNSWFlat`` (:data:`HNSW_M` links per node), a query explores
  ``ef_search`` nodes. No training; slower to build than IVF.
* ``"auto"``: exact up to :data:`AUTO_EXACT_MAX_ROWS` indexed rows, IVF above (exact
  too when faiss is missing and ``backend="auto"``).

Rows are added to the approximate indexes :data:`ADD_CHUNK_ROWS` at a time, so the
index is the only full copy of the normalised rows beyond one chunk.

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

import math

import torch
import torch.nn.functional as F

from ._checks import check_choice, check_int, check_tensor

__all__ = ["ADD_CHUNK_ROWS", "AUTO_EXACT_MAX_ROWS", "BACKENDS", "DEFAULT_NPROBE",
           "DEFAULT_EF_SEARCH", "HNSW_M", "INDEXES", "MAX_BLOCK", "TRAIN_ROWS_PER_LIST",
           "default_nlist", "knn", "resolve_backend", "resolve_index", "unit_rows"]

BACKENDS = ("auto", "faiss", "torch")
INDEXES = ("auto", "exact", "ivf", "ivfpq", "hnsw")
#: ``index="auto"`` stays exact up to this many indexed rows: an exact self search is
#: N²·D multiply-adds, about 3 s for N = 20 000, D = 128 on one core (docs/active.md,
#: "Large pools"); above it IVF's training and coarse search pay for themselves.
AUTO_EXACT_MAX_ROWS = 20_000
#: Rows sampled per IVF list to train the k-means: FAISS warns below 39 per centroid
#: and samples at most 256 per centroid itself. Training costs nlist·rows·D per
#: iteration, so it grows as nlist²: the minimum keeps it below the search time.
TRAIN_ROWS_PER_LIST = 39
#: k-means iterations of the IVF training (FAISS's default is 25): the centroids only
#: partition the rows, recall is set by nprobe, and training time is linear in this.
TRAIN_ITERATIONS = 10
#: FAISS's own lower bound of training rows per centroid: ``nlist`` may not exceed
#: N / 39, so every list is trained on enough rows.
MIN_TRAIN_ROWS_PER_LIST = 39
#: Rows normalised and added to an approximate index at a time (32 MiB at D = 128).
ADD_CHUNK_ROWS = 1 << 16
#: Lists scanned per query: on 20 000 rows of 1000 classes (D = 128, noise as large as
#: the spread of the class centres, so the classes overlap) 16 of the default 566 lists
#: gave recall@10 = 0.97 against exact search, 8 gave 0.965 (docs/active.md, "Large
#: pools"); 16 leaves a margin for harder sets at under 3 % of the lists.
DEFAULT_NPROBE = 16
#: HNSW nodes explored per query (raised to k when smaller): recall@10 ≥ 0.95 on the same
#: sets; FAISS's default of 16 is tuned for k = 1.
DEFAULT_EF_SEARCH = 64
#: HNSW links per node (FAISS's recommended range is 16–64; 32 is its usual default).
HNSW_M = 32
#: Bits per IVF-PQ sub-quantizer code (one byte: 256 centroids per sub-space).
PQ_BITS = 8
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


def resolve_index(op: str, index, backend: str, n: int) -> str:
    """``"exact"``, ``"ivf"``, ``"ivfpq"`` or ``"hnsw"``: what ``index`` means for ``n``
    indexed rows and the resolved ``backend`` (``"faiss"`` or ``"torch"``)."""
    check_choice(op, "index", index, INDEXES)
    if index == "auto":
        return "ivf" if backend == "faiss" and n > AUTO_EXACT_MAX_ROWS else "exact"
    if index != "exact" and backend == "torch":
        try:
            import faiss  # noqa: F401
        except ImportError as e:
            raise ImportError(f"{op}: index={index!r} needs the faiss package (pip install "
                              "faiss-cpu); the torch backend is exact only "
                              "(index='exact' or 'auto')") from e
        raise ValueError(f"{op}: index={index!r} needs backend='faiss' or 'auto'; the torch "
                         "backend is exact only, got backend='torch'")
    return index


def default_nlist(n: int) -> int:
    """IVF lists for n rows: about 4·√n (FAISS's guideline is 4–16·√n; the low end
    keeps training short), at most n / :data:`MIN_TRAIN_ROWS_PER_LIST`, at least 1."""
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_TRAIN_ROWS_PER_LIST))


def _check_index_params(op: str, index: str, n: int, d: int, k: int, nlist, nprobe,
                        ef_search, pq_m):
    """Validated (nlist, nprobe, ef_search, pq_m) for ``index`` over n rows of width d;
    FAISS would abort the process on most of these, so nothing reaches it unchecked."""
    if index in ("ivf", "ivfpq"):
        if nlist is None:
            nlist = default_nlist(n)
        else:
            nlist = check_int(op, "nlist", nlist, 1)
            if nlist > n:
                raise ValueError(f"{op}: nlist must be <= N = {n} (rows indexed; each list "
                                 f"needs rows to train its centroid), got nlist={nlist}; "
                                 "lower nlist or leave it None for the default")
        if nprobe is None:
            nprobe = min(DEFAULT_NPROBE, nlist)
        else:
            nprobe = check_int(op, "nprobe", nprobe, 1)
            if nprobe > nlist:
                raise ValueError(f"{op}: nprobe must be <= nlist = {nlist} (lists scanned per "
                                 f"query), got nprobe={nprobe}")
    elif nlist is not None or nprobe is not None:
        raise ValueError(f"{op}: nlist and nprobe apply to index='ivf' or 'ivfpq' only, "
                         f"got index={index!r}")
    if index == "hnsw":
        ef_search = max(k, DEFAULT_EF_SEARCH) if ef_search is None else \
            check_int(op, "ef_search", ef_search, k)
    elif ef_search is not None:
        raise ValueError(f"{op}: ef_search applies to index='hnsw' only, got index={index!r}")
    if index == "ivfpq":
        pq_m = _default_pq_m(d) if pq_m is None else check_int(op, "pq_m", pq_m, 1, d)
        if d % pq_m:
            raise ValueError(f"{op}: pq_m must divide the width D = {d} (one sub-quantizer "
                             f"per D / pq_m columns), got pq_m={pq_m}")
        if n < (1 << PQ_BITS):
            raise ValueError(f"{op}: index='ivfpq' needs at least {1 << PQ_BITS} rows to train "
                             f"its {PQ_BITS}-bit codes, got N = {n}; use index='ivf'")
    elif pq_m is not None:
        raise ValueError(f"{op}: pq_m applies to index='ivfpq' only, got index={index!r}")
    return nlist, nprobe, ef_search, pq_m


def _default_pq_m(d: int) -> int:
    """Sub-quantizers of IVF-PQ: one per 4 columns (16 bytes per row at D = 64, 32 at
    D = 128), the largest divisor of d not above d / 4 so any width works."""
    return next(m for m in range(max(1, d // 4), 0, -1) if d % m == 0)


def _approx_index(keys: torch.Tensor, index: str, nlist, nprobe, ef_search, pq_m, gen_seed: int):
    """A FAISS inner-product index of kind ``index`` over ``keys`` ([N, D], any float
    dtype, not yet normalised): trained on a sample, filled in chunks."""
    import faiss
    import numpy as np

    n, d = keys.shape
    if index == "hnsw":
        built = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        built.hnsw.efSearch = ef_search
    else:
        quantizer = faiss.IndexFlatIP(d)
        if index == "ivf":
            built = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            built = faiss.IndexIVFPQ(quantizer, d, nlist, pq_m, PQ_BITS,
                                     faiss.METRIC_INNER_PRODUCT)
        n_train = min(n, max(nlist, 1 << PQ_BITS if index == "ivfpq" else 1) * TRAIN_ROWS_PER_LIST)
        gen = torch.Generator().manual_seed(gen_seed)
        sample = torch.randperm(n, generator=gen)[:n_train].sort().values
        built.cp.seed = gen_seed
        built.cp.niter = TRAIN_ITERATIONS
        built.train(np.ascontiguousarray(unit_rows(keys[sample].cpu()).numpy()))
        built.nprobe = nprobe
    for start in range(0, n, ADD_CHUNK_ROWS):
        built.add(np.ascontiguousarray(unit_rows(keys[start:start + ADD_CHUNK_ROWS].cpu()).numpy()))
    return built


def _approx_search(built, queries: torch.Tensor, k: int):
    """Search ``queries`` (normalised chunk by chunk) in a built index: (sims, nbrs) with
    −inf / −1 where the index found fewer than k rows."""
    import numpy as np

    sims, nbrs = [], []
    for start in range(0, queries.shape[0], ADD_CHUNK_ROWS):
        q = np.ascontiguousarray(unit_rows(queries[start:start + ADD_CHUNK_ROWS].cpu()).numpy())
        s, i = built.search(q, k)
        sims.append(torch.from_numpy(s))
        nbrs.append(torch.from_numpy(i).to(torch.long))
    sims, nbrs = torch.cat(sims), torch.cat(nbrs)
    return sims.masked_fill(nbrs < 0, float("-inf")), nbrs


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
        index: str = "exact", nlist: int | None = None, nprobe: int | None = None,
        ef_search: int | None = None, pq_m: int | None = None, seed: int = 0,
        op: str = "palfast.knn.knn", finite: bool = True):
    """The k most cosine-similar rows of ``keys`` for each row of ``x``.

    Args:
        x: ``[M, D]`` floating point queries, finite.
        k: neighbours per query; ``1 <= k < M`` when ``keys`` is None (the rows of x
            are searched, each row excluding itself), else ``1 <= k <= len(keys)``.
        keys: optional ``[N, D]`` rows to search among.
        backend: ``"auto"`` | ``"faiss"`` | ``"torch"``.
        index: ``"exact"`` (default) | ``"auto"`` | ``"ivf"`` | ``"ivfpq"`` | ``"hnsw"``
            (module docstring); all but ``"exact"`` need faiss.
        nlist: IVF lists, ``1 <= nlist <= N`` (default :func:`default_nlist`).
        nprobe: IVF lists scanned per query, ``1 <= nprobe <= nlist`` (default
            min(:data:`DEFAULT_NPROBE`, nlist)).
        ef_search: HNSW nodes explored per query, ``>= k`` (default
            max(k, :data:`DEFAULT_EF_SEARCH`)).
        pq_m: IVF-PQ bytes per row, dividing D (default about D / 4).
        seed: the IVF training sample and k-means seed (results are reproducible).
        op: the public name reported in error messages.
        finite: scan x and keys for NaN/Inf (False only when the caller already did).

    Returns:
        ``(sims FloatTensor [M, k], nbrs LongTensor [M, k])``, each row sorted by
        similarity, highest first, on x's device. An approximate index may find fewer
        than k rows for a query (IVF: the scanned lists hold too few): the missing
        places are ``nbrs = -1``, ``sims = -inf``, at the end of the row.
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
    n_keys = x.shape[0] if self_search else keys.shape[0]
    index = resolve_index(op, index, backend, n_keys)
    params = _check_index_params(op, index, n_keys, x.shape[1], k, nlist, nprobe, ef_search, pq_m)
    seed = check_int(op, "seed", seed, 0)
    if index != "exact":
        built = _approx_index(x if self_search else keys, index, *params, gen_seed=seed)
        if not self_search:
            sims, nbrs = _approx_search(built, x, k)
            return sims.to(x.device), nbrs.to(x.device)
        sims, nbrs = _approx_search(built, x, k + 1)
        return _drop_self(sims, nbrs, k, x.device)
    queries = unit_rows(x)
    keys = queries if self_search else unit_rows(keys).to(queries.device)
    if backend == "torch":
        return _torch_search(queries, keys, k, self_search)
    if not self_search:
        sims, nbrs = _faiss_search(queries, keys, k)
        return sims.to(x.device), nbrs.to(x.device)
    sims, nbrs = _faiss_search(queries, keys, k + 1)
    return _drop_self(sims, nbrs, k, x.device)


def _drop_self(sims: torch.Tensor, nbrs: torch.Tensor, k: int, device):
    """FAISS returns self among the k+1 hits (or not, with duplicate rows; an approximate
    index may also miss it): drop it, then keep the first k of the others, missing
    places (−1) last."""
    rows = torch.arange(nbrs.shape[0], device=nbrs.device)[:, None]
    keep = (nbrs != rows) & (nbrs >= 0)
    keep &= keep.cumsum(1) <= k
    order = torch.sort(keep.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :k]
    found = keep.gather(1, order)
    sims = sims.gather(1, order).masked_fill(~found, float("-inf"))
    nbrs = nbrs.gather(1, order).masked_fill(~found, -1)
    return sims.to(device), nbrs.to(device)
