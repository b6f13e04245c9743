"""k nearest neighbours by cosine similarity, exact or approximate: the one k-NN of palfast.

Used by the candidate pairs of active PAL (:mod:`palfast.active.candidates`), the
k-NN classifier of :mod:`palfast.metrics` and the benchmarks.

Backends:

* ``"faiss"``: ``IndexFlatIP`` (exact inner-product search) on the L2-normalised
  float32 rows; a GPU index when the tensor is on CUDA and faiss was built with
  GPU support, fed through ``faiss.contrib.torch_utils`` (no host copy).
* ``"torch"``: exact ``q̂ k̂ᵀ`` + ``topk``, a block of query rows at a time so at
  most :data:`MAX_BLOCK` similarities exist at once, whatever N; above
  ``MAX_BLOCK / MIN_BLOCK_ROWS`` keys the keys are split into blocks too and each query
  row's running top-k is merged block by block.
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
* ``"ivf-join"`` (self search only, ``keys=None``; torch only, no faiss needed, any
  backend): the IVF search of every row among the others, regrouped by list. Centroids
  by spherical k-means on a sample (:data:`TRAIN_ITERATIONS` iterations,
  :data:`TRAIN_ROWS_PER_LIST` rows per list, at most :data:`JOIN_MAX_TRAIN_ROWS`);
  every row's ``nprobe`` nearest lists by one GEMM with the centroids; the unit rows
  sorted by list; then for each list one GEMM of the rows that probe it against its
  members, a top-k per (row, list), and a final top-k of each row's ``nprobe · k``.
  Candidates and recall are those of ``"ivf"`` with the same lists and ``nprobe`` (a
  row probes its own nearest lists, not its list's), but the work is BLAS GEMMs, not
  FAISS's per-query scans, run as whole tasks on torch's intra-op thread count of
  threads (:func:`_parallel`). Defaults: ``nlist`` as IVF (4·√N),
  ``nprobe`` = :data:`DEFAULT_JOIN_NPROBE`. Memory beyond ``"ivf"``'s: ``[N, nprobe, k]``
  partial results (8·nprobe·k bytes per row). Identical to the exact search (up to
  float32 rounding) when ``nprobe = nlist``.
* ``"auto"``: exact up to :data:`AUTO_EXACT_MAX_ROWS` indexed rows; above, ``"ivf-join"``
  for a self search (any backend), ``"ivf"`` for a search of ``keys`` (exact when faiss
  is missing and ``backend="auto"``).

Embeddings larger than RAM: ``x`` and ``keys`` may be a memory-mapped NumPy array
(``np.load(path, mmap_mode="r")``, ``np.memmap``) or a tensor over a file
(``torch.from_file``). Every pass over the rows (the NaN/Inf scan, normalising them
into the index, normalising the queries) reads :data:`CHUNK_BYTES` of rows at a time
(:func:`row_spans`), so the index (the normalised float32 rows of the exact search,
or the FAISS index) is the only full copy beyond one chunk.

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

from ._checks import check_choice, check_int, check_tensor, count_nonfinite_rows

__all__ = [
    "AUTO_EXACT_MAX_ROWS",
    "BACKENDS",
    "CHUNK_BYTES",
    "DEFAULT_NPROBE",
    "DEFAULT_EF_SEARCH",
    "DEFAULT_JOIN_NPROBE",
    "HNSW_M",
    "INDEXES",
    "MAX_BLOCK",
    "MIN_BLOCK_ROWS",
    "TRAIN_ROWS_PER_LIST",
    "as_rows",
    "build_index",
    "check_index_params",
    "chunk_rows",
    "default_nlist",
    "drop_self",
    "knn",
    "resolve_backend",
    "resolve_index",
    "row_spans",
    "unit_rows",
]

BACKENDS = ("auto", "faiss", "torch")
INDEXES = ("auto", "exact", "ivf", "ivfpq", "hnsw", "ivf-join")
#: ``index="auto"`` stays exact up to this many indexed rows: an exact self search is
#: N²·D multiply-adds, about 3 s for N = 20 000, D = 128 on one core (docs/active.md,
#: "Large pools"); above it IVF's training and coarse search pay for themselves.
AUTO_EXACT_MAX_ROWS = 20_000
#: Rows sampled per IVF list to train the k-means (FAISS IVF and ``"ivf-join"``), and the
#: fewest rows per list ``nlist`` may ask for (``nlist <= N / 39``): FAISS warns below 39
#: per centroid and samples at most 256 per centroid itself. Training costs nlist·rows·D
#: per iteration, so it grows as nlist²: the minimum keeps it below the search time.
TRAIN_ROWS_PER_LIST = 39
#: k-means iterations of the IVF training, FAISS IVF's and ``"ivf-join"``'s (FAISS's
#: default is 25): the centroids only partition the rows, recall is set by nprobe, and
#: training time is linear in this. For ``"ivf-join"`` on 10⁵ rows of 1000 overlapping
#: classes (bench_active's set with noise 1.0), 5 iterations on 16 rows per list lowered
#: recall@10 from 0.99 to 0.93.
TRAIN_ITERATIONS = 10
#: Bytes of float32 rows read, normalised and added (or searched) at a time: the one
#: transient copy of the embeddings when they are memory-mapped. 32 MiB (65 536 rows at
#: D = 128) keeps it small beside any index worth building, while each chunk is still
#: one large BLAS / FAISS call (per-chunk overhead well under 1 %).
CHUNK_BYTES = 1 << 25
#: Lists scanned per query: on 20 000 rows of 1000 classes (D = 128, noise as large as
#: the spread of the class centres, so the classes overlap) 16 of the default 566 lists
#: gave recall@10 = 0.97 against exact search, 8 gave 0.965 (docs/active.md, "Large
#: pools"); 16 leaves a margin for harder sets at under 3 % of the lists.
DEFAULT_NPROBE = 16
#: ``"ivf-join"`` trains on TRAIN_ROWS_PER_LIST rows per list, but at most this many:
#: training costs iterations · rows · nlist similarities, which would grow as nlist²
#: (20 CPU-s of a 10⁶-row search with 2000 lists at 39 rows per list); 2¹⁶ rows keep it
#: to a few seconds at 10⁶ rows.
JOIN_MAX_TRAIN_ROWS = 1 << 16
#: ``"ivf-join"``: lists probed per row (its nlist default is IVF's, 4·√N). On the
#: overlapping 20 000-row set of tests/test_knn.py (1000 classes of 20 rows, D = 128,
#: noise 1.0) 8 of the 566 lists gave recall@10 = 0.973 (16: 0.98; FAISS IVF with the
#: same lists 0.975 and 0.981); coarser lists did worse at the same nprobe (400 lists:
#: 0.934). The join's cost is N · nprobe · N / nlist similarities, half that of 16.
DEFAULT_JOIN_NPROBE = 8
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
# Fewest query rows per block of the exact torch search: each key row read from memory
# then serves at least this many dot products (a GEMM, not a matrix-vector product).
# Blocks of MAX_BLOCK // N rows across all N keys fell below it from N = 65 536 (1 row
# from N = 2^24: every query row re-read all N keys); above, the keys are split instead.
MIN_BLOCK_ROWS = 256


def resolve_backend(op: str, backend) -> str:
    """``"faiss"`` or ``"torch"``: what ``backend`` means on this machine."""
    check_choice(op, "backend", backend, BACKENDS)
    if backend == "torch":
        return backend
    try:
        import faiss  # noqa: F401
    except ImportError as e:
        if backend == "faiss":
            raise ImportError(
                f"{op}: backend='faiss' needs the faiss package (pip install faiss-cpu, or faiss-gpu)"
            ) from e
        return "torch"
    return "faiss"


def resolve_index(op: str, index, backend: str, n: int, self_search: bool = False) -> str:
    """``"exact"``, ``"ivf"``, ``"ivfpq"``, ``"hnsw"`` or ``"ivf-join"``: what ``index``
    means for ``n`` indexed rows, the resolved ``backend`` (``"faiss"`` or ``"torch"``)
    and whether the indexed rows are the queries (``self_search``: ``keys=None``)."""
    check_choice(op, "index", index, INDEXES)
    if index == "ivf-join":  # torch only: any backend
        if not self_search:
            raise ValueError(
                f"{op}: index='ivf-join' searches the rows among themselves "
                "(keys=None) only; to search other keys use index='ivf'"
            )
        return index
    if index == "auto":
        if n <= AUTO_EXACT_MAX_ROWS:
            return "exact"
        if self_search:
            return "ivf-join"
        return "ivf" if backend == "faiss" else "exact"
    if index != "exact" and backend == "torch":
        try:
            import faiss  # noqa: F401
        except ImportError as e:
            raise ImportError(
                f"{op}: index={index!r} needs the faiss package (pip install "
                "faiss-cpu); the torch backend is exact only "
                "(index='exact' or 'auto')"
            ) from e
        raise ValueError(
            f"{op}: index={index!r} needs backend='faiss' or 'auto'; the torch "
            "backend is exact only, got backend='torch'"
        )
    return index


def default_nlist(n: int) -> int:
    """IVF lists for n rows: about 4·√n (FAISS's guideline is 4–16·√n; the low end
    keeps training short), at most n / :data:`TRAIN_ROWS_PER_LIST`, at least 1."""
    return max(1, min(round(4 * math.sqrt(n)), n // TRAIN_ROWS_PER_LIST))


def check_index_params(op: str, index: str, n: int, d: int, k: int, nlist, nprobe, ef_search, pq_m):
    """The index parameters of :func:`knn`, checked and with their defaults filled in:
    ``(nlist, nprobe, ef_search, pq_m)`` for ``index`` (resolved by :func:`resolve_index`:
    not ``"auto"``) over ``n`` indexed rows of width ``d``, searched for ``k`` neighbours.

    A parameter of another index (``nlist`` with ``"hnsw"``), ``nlist > n``,
    ``nprobe > nlist``, ``ef_search < k``, ``pq_m`` not dividing ``d`` and IVF-PQ on
    fewer than 256 rows raise ValueError naming ``op`` and the argument; FAISS would abort
    the process on most of these, so nothing reaches it unchecked. For callers that build
    on :func:`build_index` (``params=``) or search later, as :func:`knn` does.

    Example::

        >>> from palfast.knn import check_index_params
        >>> check_index_params("my_op", "ivf", 10_000, 128, 10, None, None, None, None)
        (256, 16, None, None)
    """
    if index in ("ivf", "ivfpq", "ivf-join"):
        if nlist is None:
            nlist = default_nlist(n)
        else:
            nlist = check_int(op, "nlist", nlist, 1)
            if nlist > n:
                raise ValueError(
                    f"{op}: nlist must be <= N = {n} (rows indexed; each list "
                    f"needs rows to train its centroid), got nlist={nlist}; "
                    "lower nlist or leave it None for the default"
                )
        if nprobe is None:
            nprobe = min(DEFAULT_JOIN_NPROBE if index == "ivf-join" else DEFAULT_NPROBE, nlist)
        else:
            nprobe = check_int(op, "nprobe", nprobe, 1)
            if nprobe > nlist:
                raise ValueError(
                    f"{op}: nprobe must be <= nlist = {nlist} (lists scanned per query), got nprobe={nprobe}"
                )
    elif nlist is not None or nprobe is not None:
        raise ValueError(
            f"{op}: nlist and nprobe apply to index='ivf', 'ivfpq' or 'ivf-join' only, got index={index!r}"
        )
    if index == "hnsw":
        ef_search = max(k, DEFAULT_EF_SEARCH) if ef_search is None else check_int(op, "ef_search", ef_search, k)
    elif ef_search is not None:
        raise ValueError(f"{op}: ef_search applies to index='hnsw' only, got index={index!r}")
    if index == "ivfpq":
        pq_m = _default_pq_m(d) if pq_m is None else check_int(op, "pq_m", pq_m, 1, d)
        if d % pq_m:
            raise ValueError(
                f"{op}: pq_m must divide the width D = {d} (one sub-quantizer per D / pq_m columns), got pq_m={pq_m}"
            )
        if n < (1 << PQ_BITS):
            raise ValueError(
                f"{op}: index='ivfpq' needs at least {1 << PQ_BITS} rows to train "
                f"its {PQ_BITS}-bit codes, got N = {n}; use index='ivf'"
            )
    elif pq_m is not None:
        raise ValueError(f"{op}: pq_m applies to index='ivfpq' only, got index={index!r}")
    return nlist, nprobe, ef_search, pq_m


def _default_pq_m(d: int) -> int:
    """Sub-quantizers of IVF-PQ: one per 4 columns (16 bytes per row at D = 64, 32 at
    D = 128), the largest divisor of d not above d / 4 so any width works."""
    return next(m for m in range(max(1, d // 4), 0, -1) if d % m == 0)


#: The smallest norm divided by (F.normalize's default eps): an all-zero row stays zero.
NORM_EPS = 1e-12
#: NumPy dtypes taken as embeddings (NumPy has no bfloat16).
_NUMPY_FLOATS = ("float16", "float32", "float64")


def as_rows(op: str, name: str, x, *, min_rows: int = 0, finite: bool = False) -> torch.Tensor:
    """``x`` as a 2-D floating point tensor ``[N, D]``, sharing its memory (no copy).

    Takes a torch.Tensor (a ``torch.from_file`` tensor too, once viewed as ``[N, D]``),
    or a NumPy array: in RAM, ``np.memmap`` or ``np.load(path, mmap_mode="r")``, of
    float16, float32 or float64. ``finite`` scans for NaN/Inf :data:`CHUNK_BYTES` of
    rows at a time, so a memory-mapped file is never copied whole."""
    if not isinstance(x, torch.Tensor):
        try:
            import numpy as np
        except ImportError:  # no NumPy: nothing but a tensor can be given
            np = None
        if np is None or not isinstance(x, np.ndarray):
            raise TypeError(
                f"{op}: {name} must be a torch.Tensor or a NumPy array (for a file "
                "larger than RAM: np.load(path, mmap_mode='r')), got "
                f"{type(x).__name__}"
            )
        x = _from_numpy(op, name, x, "memory map" if isinstance(x, np.memmap) else "array")
    x = check_tensor(op, name, x, min_rows=min_rows)
    if finite:
        bad = count_nonfinite_rows(x, chunk_rows(x.shape[1]))
        if bad:
            raise ValueError(f"{op}: {name} must be finite, got {bad} rows with NaN or Inf")
    return x


def _from_numpy(op: str, name: str, a, kind: str) -> torch.Tensor:
    """A tensor view of NumPy array ``a`` (read-only maps stay read-only: palfast never
    writes to its inputs); ``kind`` names it in errors."""
    import warnings

    if a.ndim != 2:
        hint = (
            (
                " (np.memmap reads a flat file as 1-D: pass shape=(N, D), or save it with "
                "np.save and open it with np.load(path, mmap_mode='r'))"
            )
            if a.ndim == 1
            else ""
        )
        raise ValueError(f"{op}: {name} must be a 2-D {kind} [N, D], got shape {a.shape}{hint}")
    if a.dtype.name not in _NUMPY_FLOATS or not a.dtype.isnative:
        raise TypeError(
            f"{op}: {name} must be a {kind} of native-endian "
            f"{', '.join(_NUMPY_FLOATS)}, got dtype {a.dtype.str!r} ({a.dtype.name}); "
            "open a raw file with the dtype it was written with, or convert it"
        )
    if any(st < 0 for st in a.strides):
        raise ValueError(
            f"{op}: {name} must have non-negative strides (no reversed view), got "
            f"strides {a.strides}; pass a forward view or a copy"
        )
    with warnings.catch_warnings():
        # torch warns that a read-only array gives a tensor one may not write to;
        # nothing here writes to it.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def chunk_rows(d: int) -> int:
    """Rows of width ``d`` in :data:`CHUNK_BYTES` of float32 (at least 1)."""
    return max(1, CHUNK_BYTES // (4 * d))


def row_spans(x: torch.Tensor, rows: int | None = None):
    """``(start, stop)`` of consecutive row chunks of ``x``, :func:`chunk_rows` rows each
    unless ``rows`` is given."""
    step = chunk_rows(x.shape[1]) if rows is None else rows
    return [(a, min(a + step, x.shape[0])) for a in range(0, x.shape[0], step)]


def unit_rows(x: torch.Tensor, device=None) -> torch.Tensor:
    """Rows of x scaled to unit L2 norm in float32, contiguous (zero rows stay zero), on
    ``device`` (default x's).

    Each row is first divided by its largest absolute entry, so squaring cannot
    overflow however large the row is. Rows are copied into the result
    :data:`CHUNK_BYTES` at a time and normalised there in place, so nothing but the
    result (and, across devices, one chunk) is allocated, whatever x's size."""
    x = x.detach()
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device if device is None else device)
    for a, b in row_spans(x):
        _unit_into(out[a:b], x[a:b])
    return out


def _unit_into(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Write the unit rows of x into ``out`` (float32, contiguous) and return it; the
    same arithmetic as ``F.normalize(x / peak)``, without its temporaries."""
    out.copy_(x)
    peak = torch.linalg.vector_norm(out, float("inf"), dim=1, keepdim=True)
    out.div_(peak.clamp_min_(torch.finfo(torch.float32).tiny))
    return out.div_(torch.linalg.vector_norm(out, dim=1, keepdim=True).clamp_min_(NORM_EPS))


def _unit_chunk(x: torch.Tensor) -> torch.Tensor:
    """Unit rows of one chunk, in a new float32 tensor on x's device."""
    return _unit_into(torch.empty(x.shape, dtype=torch.float32, device=x.device), x)


class _Index:
    """Normalised rows of ``keys`` in a searchable index (:func:`build_index`)."""

    def __init__(self, kind: str, built, d: int, n: int):
        self.kind, self.built, self.d, self.n = kind, built, d, n

    def search(self, queries: torch.Tensor, k: int, *, normalized: bool = False):
        """Top-k ``(sims [M, k], nbrs [M, k])`` of ``queries`` ``[M, D]`` (raw rows,
        normalised here a chunk at a time; or unit float32 rows when ``normalized``), on
        the index's device for the torch index, else on the CPU; −inf / −1 where an
        approximate index found fewer than k rows. 1 <= k <= N."""
        if self.kind == "torch":
            return _torch_search(queries, self.built, k, None, normalized)
        import numpy as np

        if self.kind == "faiss-gpu":
            import faiss.contrib.torch_utils  # noqa: F401  (faiss takes torch tensors, no copy)

            q = queries if normalized else unit_rows(queries, self.built_device)
            sims, nbrs = self.built.search(q.to(self.built_device), k)
            return sims, nbrs.to(torch.long)
        sims, nbrs = [], []
        for a, b in row_spans(queries):
            q = queries[a:b].cpu() if normalized else _unit_chunk(queries[a:b].cpu())
            s, i = self.built.search(np.ascontiguousarray(q.numpy()), k)
            sims.append(torch.from_numpy(s))
            nbrs.append(torch.from_numpy(i).to(torch.long))
        sims, nbrs = torch.cat(sims), torch.cat(nbrs)
        return sims.masked_fill(nbrs < 0, float("-inf")), nbrs

    def search_self(self, k: int):
        """Every indexed row's top-k among the others (1 <= k < N), on the index's device."""
        if self.kind == "torch":
            return _torch_search(self.built, self.built, k, 0, True)
        raise NotImplementedError  # FAISS indexes: search(keys, k + 1) then drop_self


def build_index(
    keys: torch.Tensor, backend: str, index: str, params=(None, None, None, None), seed: int = 0, device=None
) -> _Index:
    """The k-NN index of :func:`knn` over ``keys`` ``[N, D]`` (validated by the caller:
    :func:`as_rows`, :func:`resolve_backend`, :func:`resolve_index`, and ``params`` =
    ``(nlist, nprobe, ef_search, pq_m)`` from ``check_index_params``). Rows are
    normalised into it :data:`CHUNK_BYTES` at a time; the exact torch index is held
    on ``device`` (default keys' device)."""
    n, d = keys.shape
    if index == "ivf-join":
        raise ValueError("build_index: index='ivf-join' builds no index; knn(x, k, index='ivf-join') runs it")
    if index != "exact":
        return _Index("faiss", _approx_index(keys, index, *params, gen_seed=seed), d, n)
    if backend == "torch":
        return _Index("torch", unit_rows(keys, device), d, n)
    import faiss

    if keys.is_cuda and hasattr(faiss, "StandardGpuResources"):
        import faiss.contrib.torch_utils  # noqa: F401

        res = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.device = keys.device.index if keys.device.index is not None else torch.cuda.current_device()
        built = faiss.GpuIndexFlatIP(res, d, cfg)
        built.add(unit_rows(keys))
        out = _Index("faiss-gpu", built, d, n)
        out.built_device, out.res = keys.device, res  # the resources must outlive the index
        return out
    built = faiss.IndexFlatIP(d)
    _add_chunks(built, keys)
    return _Index("faiss", built, d, n)


def _add_chunks(built, keys: torch.Tensor) -> None:
    """Normalise ``keys`` into the FAISS index ``built`` through one reused chunk buffer."""
    spans = row_spans(keys)
    buf = torch.empty(spans[0][1] - spans[0][0], keys.shape[1], dtype=torch.float32)
    for a, b in spans:
        built.add(_unit_into(buf[: b - a], keys[a:b]).numpy())


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
            built = faiss.IndexIVFPQ(quantizer, d, nlist, pq_m, PQ_BITS, faiss.METRIC_INNER_PRODUCT)
        n_train = min(n, max(nlist, 1 << PQ_BITS if index == "ivfpq" else 1) * TRAIN_ROWS_PER_LIST)
        gen = torch.Generator().manual_seed(gen_seed)
        sample = torch.randperm(n, generator=gen)[:n_train].sort().values
        built.cp.seed = gen_seed
        built.cp.niter = TRAIN_ITERATIONS
        built.train(np.ascontiguousarray(unit_rows(keys[sample].cpu()).numpy()))
        built.nprobe = nprobe
    _add_chunks(built, keys)
    return built


# ---------------------------------------------------------------------------------------
# "ivf-join": the IVF self search as one GEMM per list (module docstring).


def _spherical_kmeans(rows: torch.Tensor, nlist: int, iterations: int, gen: torch.Generator) -> torch.Tensor:
    """``[nlist, D]`` unit centroids of the unit ``rows`` (``[S, D]``, S >= nlist):
    started at ``nlist`` distinct rows drawn with ``gen``; each iteration assigns every
    row to its most similar centroid and moves each centroid to its rows' normalised
    mean (a centroid with no rows stays where it was)."""
    cent = rows[torch.randperm(rows.shape[0], generator=gen)[:nlist].to(rows.device)].clone()
    owner = torch.empty(rows.shape[0], dtype=torch.long, device=rows.device)

    def assign(span):
        owner[span[0] : span[1]] = (rows[span[0] : span[1]] @ cent.T).argmax(1)

    for _ in range(iterations):
        _parallel(assign, row_spans(rows, _block_rows(nlist)))
        sums = torch.zeros_like(cent).index_add_(0, owner, rows)
        filled = torch.bincount(owner, minlength=nlist)[:, None] > 0
        cent = torch.where(filled, _unit_into(sums, sums), cent)
    return cent


def _block_rows(cols: int) -> int:
    """Rows per block of a ``[rows, cols]`` similarity matrix: at most :data:`MAX_BLOCK`
    entries, at most :data:`MAX_BLOCK_ROWS` rows, at least one."""
    return max(1, min(MAX_BLOCK_ROWS, MAX_BLOCK // max(1, cols)))


def _parallel(fn, items) -> None:
    """``fn(item)`` for every item, on torch's intra-op thread count of Python threads,
    each running torch single-threaded (torch ops release the GIL): the many small GEMMs
    and top-k of the join gain more from whole tasks per core than from splitting each
    op, whose per-op thread hand-offs dominate when the cores are shared."""
    workers = torch.get_num_threads()
    if workers <= 1 or len(items) <= 1:
        for item in items:
            fn(item)
        return
    from concurrent.futures import ThreadPoolExecutor

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(fn, items):
                pass
    finally:
        torch.set_num_threads(workers)


def _ivf_join(x: torch.Tensor, k: int, nlist: int, nprobe: int, seed: int):
    """The ``"ivf-join"`` self search of the rows of ``x`` (module docstring): each row's
    top-k among the rows of its ``nprobe`` nearest lists, itself excluded.

    Every row is a query and a database row, so the per-query list scans of an IVF index
    are regrouped by list: list L's members (contiguous after sorting the unit rows by
    list) are compared in one GEMM with every row that probes L, and each row's running
    top-k is merged with that block's. The similarities, candidates and results are
    those of an IVF search with the same centroids and ``nprobe`` (up to float32
    rounding); the work is BLAS GEMMs instead of scans."""
    n, d = x.shape
    dev = x.device
    gen = torch.Generator().manual_seed(seed)
    # 1. Centroids: spherical k-means on a sample (sorted: a memory map is read forwards).
    n_train = min(n, max(nlist, min(nlist * TRAIN_ROWS_PER_LIST, JOIN_MAX_TRAIN_ROWS)))
    sample = torch.randperm(n, generator=gen)[:n_train].sort().values
    cent = _spherical_kmeans(unit_rows(x[sample], dev), nlist, TRAIN_ITERATIONS, gen)
    # 2. Every row's nprobe nearest lists, a chunk of rows at a time; the first is its list.
    probes = torch.empty(n, nprobe, dtype=torch.long, device=dev)

    def assign(span):
        a, b = span
        probes[a:b] = (_unit_chunk(x[a:b].to(dev)) @ cent.T).topk(nprobe, dim=1).indices

    _parallel(assign, row_spans(x, _block_rows(nlist)))
    # 3. The unit rows sorted by list, members of list L at xs[ptr[L]:ptr[L + 1]].
    perm = torch.sort(probes[:, 0], stable=True).indices  # xs row p is x row perm[p]
    pos = torch.empty_like(perm)
    pos[perm] = torch.arange(n, device=dev)
    ptr = torch.zeros(nlist + 1, dtype=torch.long, device=dev)
    ptr[1:] = torch.bincount(probes[:, 0], minlength=nlist).cumsum(0)
    xs = torch.empty(n, d, dtype=torch.float32, device=dev)
    for a, b in row_spans(x):
        xs[pos[a:b]] = _unit_chunk(x[a:b].to(dev))
    # 4. The rows probing each list: (row, probe) slots sorted by the list they probe.
    flat = probes[perm].reshape(-1)  # slot r * nprobe + j: xs row r's j-th list
    slots = torch.sort(flat, stable=True).indices
    qptr = torch.zeros(nlist + 1, dtype=torch.long, device=dev)
    qptr[1:] = torch.bincount(flat, minlength=nlist).cumsum(0)
    probes = flat = None  # freed here (a `del` would hide them from the closure above)
    # Each slot's top-k within its list (positions in xs), written by exactly one task:
    # the tasks share no output, so they run on parallel threads.
    buf_s = torch.full((n * nprobe, k), float("-inf"), device=dev)
    buf_i = torch.zeros(n * nprobe, k, dtype=torch.int32 if n < 2**31 else torch.long, device=dev)
    ptr_l, qptr_l = ptr.tolist(), qptr.tolist()

    def scan(lst: int):
        a, b = ptr_l[lst], ptr_l[lst + 1]
        members = xs[a:b]
        block = _block_rows(b - a)
        for s in range(qptr_l[lst], qptr_l[lst + 1], block):
            sl = slots[s : min(s + block, qptr_l[lst + 1])]
            rows = sl // nprobe
            sims = xs[rows] @ members.T
            own = ((rows >= a) & (rows < b)).nonzero().squeeze(1)  # never one's own neighbour
            sims[own, rows[own] - a] = float("-inf")
            v, i = sims.topk(min(k, b - a), dim=1)
            buf_s[sl, : v.shape[1]] = v
            buf_i[sl, : v.shape[1]] = (i + a).to(buf_i.dtype)

    _parallel(scan, [lst for lst in range(nlist) if ptr_l[lst] < ptr_l[lst + 1]])
    # 5. Each row's best k of its nprobe lists, in x's row order; −inf places (fewer
    # than k rows probed) are −1.
    buf_s, buf_i = buf_s.view(n, nprobe * k), buf_i.view(n, nprobe * k)
    sims = torch.empty(n, k, device=dev)
    nbrs = torch.empty(n, k, dtype=torch.long, device=dev)

    def merge(span):
        a, b = span
        rows = pos[a:b]
        v, j = buf_s[rows].topk(k, dim=1)
        sims[a:b] = v
        nbrs[a:b] = torch.where(torch.isneginf(v), -1, perm[buf_i[rows].gather(1, j).long()])

    _parallel(merge, row_spans(x, MAX_BLOCK_ROWS * 16))
    return sims, nbrs


def _torch_search(queries: torch.Tensor, keys: torch.Tensor, k: int, self_offset: int | None, normalized: bool):
    """Exact top-k of ``queries`` among the unit rows ``keys``, a block of queries at a
    time (normalised per block unless ``normalized``); ``self_offset``: query row r is
    key row r + self_offset, never its own neighbour."""
    n_keys = keys.shape[0]
    block = max(1, min(MAX_BLOCK_ROWS, MAX_BLOCK // n_keys))
    key_block = n_keys
    if block < MIN_BLOCK_ROWS:  # too few queries per pass over the keys: split the keys
        block = MIN_BLOCK_ROWS
        key_block = max(k, MAX_BLOCK // block)
    sims, nbrs = [], []
    for start in range(0, queries.shape[0], block):
        q = queries[start : start + block]
        q = q.to(keys.device) if normalized else _unit_chunk(q.to(keys.device))
        best = None
        for k0 in range(0, n_keys, key_block):
            s = q @ keys[k0 : k0 + key_block].T
            if self_offset is not None:  # never one's own neighbour (if in this key block)
                rows = torch.arange(s.shape[0], device=s.device)
                own = rows + (start + self_offset - k0)
                inside = (own >= 0) & (own < s.shape[1])
                own = own.clamp(0, s.shape[1] - 1)
                s[rows, own] = torch.where(inside, float("-inf"), s[rows, own])
            v, i = s.topk(min(k, s.shape[1]), dim=1)
            if best is None:
                best = v, i + k0
            else:  # merge this key block's top-k into the running one
                v, pos = torch.cat([best[0], v], dim=1).topk(k, dim=1)
                best = v, torch.cat([best[1], i + k0], dim=1).gather(1, pos)
        sims.append(best[0])
        nbrs.append(best[1])
    return torch.cat(sims), torch.cat(nbrs)


def knn(
    x,
    k: int,
    *,
    keys=None,
    backend: str = "auto",
    index: str = "exact",
    nlist: int | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
    pq_m: int | None = None,
    seed: int = 0,
    op: str = "palfast.knn.knn",
    finite: bool = True,
):
    """The k most cosine-similar rows of ``keys`` for each row of ``x``.

    Args:
        x: ``[M, D]`` floating point queries, finite: a tensor, or a NumPy array,
            memory-mapped or not (:func:`as_rows`; read in chunks, never copied whole).
        k: neighbours per query; ``1 <= k < M`` when ``keys`` is None (the rows of x
            are searched, each row excluding itself), else ``1 <= k <= len(keys)``.
        keys: optional ``[N, D]`` rows to search among (same kinds as ``x``).
        backend: ``"auto"`` | ``"faiss"`` | ``"torch"``.
        index: ``"exact"`` (default) | ``"auto"`` | ``"ivf"`` | ``"ivfpq"`` | ``"hnsw"`` |
            ``"ivf-join"`` (module docstring); ``"ivf"``, ``"ivfpq"`` and ``"hnsw"`` need
            faiss; ``"ivf-join"`` is for ``keys=None`` only.
        nlist: IVF lists, ``1 <= nlist <= N`` (default :func:`default_nlist`).
        nprobe: IVF lists scanned per query, ``1 <= nprobe <= nlist`` (default
            min(:data:`DEFAULT_NPROBE`, nlist); ``"ivf-join"``:
            min(:data:`DEFAULT_JOIN_NPROBE`, nlist)).
        ef_search: HNSW nodes explored per query, ``>= k`` (default
            max(k, :data:`DEFAULT_EF_SEARCH`)).
        pq_m: IVF-PQ bytes per row, dividing D (default about D / 4).
        seed: the IVF training sample and k-means seed (results are reproducible).
        op: the public name reported in error messages.
        finite: scan x and keys for NaN/Inf (False only when the caller already did).

    Returns:
        ``(sims FloatTensor [M, k], nbrs LongTensor [M, k])``, each row sorted by
        similarity, highest first, on x's device (CPU for a NumPy array). An
        approximate index may find fewer than k rows for a query (IVF: the scanned
        lists hold too few): the missing places are ``nbrs = -1``, ``sims = -inf``,
        at the end of the row.
    """
    self_search = keys is None
    x = as_rows(op, "embeddings" if self_search else "queries", x, min_rows=1, finite=finite)
    if self_search:
        k = check_int(op, "k", k)
        if not 1 <= k < x.shape[0]:
            raise ValueError(f"{op}: k must satisfy 1 <= k < N = {x.shape[0]} (number of rows), got k={k}")
    else:
        keys = as_rows(op, "keys", keys, min_rows=1, finite=finite)
        if keys.shape[1] != x.shape[1]:
            raise ValueError(f"{op}: keys must have the queries' width D = {x.shape[1]}, got shape {tuple(keys.shape)}")
        k = check_int(op, "k", k, 1, keys.shape[0])
    backend = resolve_backend(op, backend)
    n_keys = x.shape[0] if self_search else keys.shape[0]
    index = resolve_index(op, index, backend, n_keys, self_search)
    params = check_index_params(op, index, n_keys, x.shape[1], k, nlist, nprobe, ef_search, pq_m)
    seed = check_int(op, "seed", seed, 0)
    if index == "ivf-join":
        return _ivf_join(x, k, *params[:2], seed)
    if self_search:
        built = build_index(x, backend, index, params, seed)
        if built.kind == "torch":
            return built.search_self(k)
        sims, nbrs = built.search(x, k + 1)
        return drop_self(sims, nbrs, k, x.device)
    # The exact torch search runs on the queries' device.
    sims, nbrs = build_index(keys, backend, index, params, seed, x.device).search(x, k)
    return sims.to(x.device), nbrs.to(x.device)


def drop_self(sims: torch.Tensor, nbrs: torch.Tensor, k: int, device, rows=None):
    """The top-k of a ``k + 1`` search of the indexed rows themselves, without self.

    FAISS returns self among the k+1 hits (or not, with duplicate rows; an approximate
    index may also miss it): drop it, then keep the first k of the others, missing
    places (−1) last. ``rows`` ``[M]``: the index row of each query (default
    ``arange(M)``)."""
    if rows is None:
        rows = torch.arange(nbrs.shape[0], device=nbrs.device)
    keep = (nbrs != rows.to(nbrs.device)[:, None]) & (nbrs >= 0)
    keep &= keep.cumsum(1) <= k
    order = torch.sort(keep.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :k]
    found = keep.gather(1, order)
    sims = sims.gather(1, order).masked_fill(~found, float("-inf"))
    nbrs = nbrs.gather(1, order).masked_fill(~found, -1)
    return sims.to(device), nbrs.to(device)
