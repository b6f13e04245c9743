"""PairGraph: the similarity graph G of PAL over the N rows of a batch (docs/api.md, "PairGraph").

G_ij = w_ij ≥ 0 says "row i and row j are alike, with weight w_ij". It is the
sum of two parts, neither of which ever becomes an N×N matrix:

* explicit edges, stored as CSR (``indptr [N+1]``, ``indices [E]``, ``weights [E]``
  float32) plus the CSR of Gᵀ (the same tensors when G is symmetric);
* label sets: ``labels [L, N]`` compact class ids (−1 = unknown) with one weight
  per set; row i and j are positives with weight a_l when they share a class.
  Kernels use per-class sums, so a label graph costs O(N·D), not O(Σ n_c²·D).

``from_views(n, V)`` is a label set too (the class of row i + v·n is i).

A graph may also carry known negatives ("cannot-links"): ``graph.negatives`` is
``None`` or a PairGraph over the same rows whose edges are the pairs known to
differ, with weight > 0 saying how strongly (``graph.with_negatives(neg)``;
``RelationStore.graph(..., negatives=True)`` builds it from "no" answers). No
pair may be both positive and negative. Everything else in a PairGraph (degrees,
totals, ``kernel_args``, ``to_dense``) is about the positives; each loss says how
it uses the negatives (docs/api.md, "Known negatives").

All data-dependent validation (index ranges, weights 0 or in
[MIN_WEIGHT, MAX_WEIGHT], sizes up to MAX_NODES) happens here, with messages
naming the argument, and the derived fields (the transpose, degrees, totals) are
computed here from the defining ones, in ``PairGraph.__post_init__``, so neither a
constructor nor ``dataclasses.replace`` can produce them out of step. A graph keeps
a copy of its tensors; every loss compares them (``PairGraph.check_unchanged``) and
refuses a graph changed since, however it was changed (in place, ``.data``, a NumPy
view, ``object.__setattr__``). The ops re-check the index ranges in C++
(csrc/graph.h, ``check_graph_values``) because they can be called directly.
Weights that require grad are refused: the losses do not differentiate with
respect to the graph (docs/api.md, "Gradients").
Duplicate edges are summed (like ``torch.sparse`` coalescing); self-loops are
dropped (w_ii is ignored by every loss).

Example::

    >>> import torch, palfast
    >>> g = 0.5 * palfast.PairGraph.from_views(4, 2) + 0.5 * palfast.PairGraph.from_labels(
    ...     torch.tensor([0, 1, -1, 1, 0, 1, -1, 1]))
    >>> g.num_nodes, g.degree().tolist()
    (8, [1.0, 2.0, 0.5, 2.0, 1.0, 2.0, 0.5, 2.0])
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

from ._checks import as_long_vector, check_bool, check_device, check_int, check_number

__all__ = ["PairGraph", "MAX_NODES", "MIN_WEIGHT", "MAX_WEIGHT"]

#: Largest number of rows a graph may have (kernels index rows with 32-bit ints on
#: some paths, and a bigger batch could not hold its N×N similarities anyway).
MAX_NODES = 2**31 - 1
#: Non-zero weights (an edge after summing duplicates and scaling, a label set's
#: weight) must lie in [MIN_WEIGHT, MAX_WEIGHT]; so must the total weight |G|.
#: Smaller ones vanish in float32 (1/W_i, w_ij/W_i give 0/0 = NaN) and bigger
#: ones overflow float32 sums.
MIN_WEIGHT = 1e-30
MAX_WEIGHT = 1e30


def _real_weights(w, name: str, op: str) -> torch.Tensor:
    """``w`` as a float64 tensor, refusing complex values and tensors that require grad."""
    if isinstance(w, torch.Tensor) and w.requires_grad:
        raise ValueError(
            f"{op}: {name} must not require grad: palfast's losses do not "
            "differentiate with respect to the graph (docs/api.md, 'Gradients'); "
            "pass weights.detach()"
        )
    try:
        w = w if isinstance(w, torch.Tensor) else torch.as_tensor(np.asarray(w))
    except (RuntimeError, TypeError, ValueError) as e:
        raise TypeError(f"{op}: {name} must be a tensor of real numbers, got {w!r:.80}") from e
    if w.dtype.is_complex:
        raise TypeError(f"{op}: {name} must be real, got {w.dtype}")
    return w.to(torch.float64)


def _check_weights(w: torch.Tensor, name: str, op: str) -> None:
    """Finite, >= 0, and each non-zero one in [MIN_WEIGHT, MAX_WEIGHT]."""
    if w.numel() == 0:
        return
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{op}: {name} must be finite, got {int((~torch.isfinite(w)).sum())} non-finite")
    if bool((w < 0).any()):
        raise ValueError(f"{op}: {name} must be >= 0, got minimum {float(w.min())}")
    nz = w[w != 0]
    if nz.numel() and (float(nz.min()) < MIN_WEIGHT or float(nz.max()) > MAX_WEIGHT):
        raise ValueError(
            f"{op}: {name} must be 0 or in [MIN_WEIGHT, MAX_WEIGHT] = "
            f"[{MIN_WEIGHT:g}, {MAX_WEIGHT:g}] (duplicate edges summed, scale "
            f"applied), got non-zero values in [{float(nz.min()):g}, "
            f"{float(nz.max()):g}]"
        )


def _check_label_weight(a: float, name: str, op: str) -> float:
    a = check_number(op, name, a, 0.0)
    if a != 0 and not MIN_WEIGHT <= a <= MAX_WEIGHT:
        raise ValueError(
            f"{op}: {name} must be 0 or in [MIN_WEIGHT, MAX_WEIGHT] = [{MIN_WEIGHT:g}, {MAX_WEIGHT:g}], got {a:g}"
        )
    return a


def _check_nodes(op: str, name: str, n) -> int:
    return check_int(op, name, n, 1, MAX_NODES)


def _csr(rows: torch.Tensor, cols: torch.Tensor, w: torch.Tensor, n: int):
    """Coalesced CSR (duplicates summed in float64, zero weights dropped) of rows→cols;
    weights come back as float64 (checked, then stored as float32 by the caller)."""
    w = w.to(torch.float64)
    if rows.numel():
        key, inverse = torch.unique(rows * n + cols, return_inverse=True)
        w = torch.zeros(key.numel(), dtype=torch.float64, device=w.device).index_add_(0, inverse, w)
        keep = w > 0
        key, w = key[keep], w[keep]
        rows, cols = key // n, key % n
    counts = torch.bincount(rows, minlength=n)
    indptr = torch.zeros(n + 1, dtype=torch.long, device=rows.device)
    indptr[1:] = torch.cumsum(counts, 0)
    return indptr, cols.contiguous(), w.contiguous()


@dataclass(frozen=True, eq=False)
class PairGraph:
    """Immutable graph of positive pairs over ``num_nodes`` rows. Build it with a
    ``from_*`` constructor; combine with ``g1 + g2`` (union, weights summed) and
    ``a * g`` (scaling). See the module docstring for the storage layout.

    The fields before ``negatives`` define the graph; everything after it is derived
    from them in ``__post_init__``, so ``PairGraph(...)`` and ``dataclasses.replace(g,
    weights=...)`` validate their input and recompute the transpose, the degrees and
    the totals (``replace`` refuses the derived fields themselves). Each loss compares
    the tensors with the copy taken here and refuses a graph changed since
    (:meth:`check_unchanged`; docs/api.md, "What is checked")."""

    num_nodes: int
    indptr: torch.Tensor  # [N + 1] int64, row i's edges are indptr[i]:indptr[i + 1]
    indices: torch.Tensor  # [E] int64 columns, increasing within a row, no self-loops
    weights: torch.Tensor  # [E] float32, 0 or in [MIN_WEIGHT, MAX_WEIGHT]
    labels: torch.Tensor  # [L, N] int64 compact class ids, −1 unknown
    label_weights: tuple[float, ...]
    label_classes: tuple[int, ...]
    # Known negatives over the same rows (None: none known); see with_negatives.
    negatives: PairGraph | None = None
    # Derived (init=False): the CSR of Gᵀ (the same tensors when G is symmetric), ...
    t_indptr: torch.Tensor = field(init=False)
    t_indices: torch.Tensor = field(init=False)
    t_weights: torch.Tensor = field(init=False)
    pos_weight: torch.Tensor = field(init=False)  # [N] float64, W_i = Σ_{j≠i} w_ij
    num_anchors: int = field(init=False)  # rows with W_i > 0
    total_weight: float = field(init=False)  # |G| = Σ_ij w_ij
    symmetric: bool = field(init=False)  # G == Gᵀ (explicit edges; label sets always are)
    # What check_unchanged compares with: a copy of every tensor and the other fields.
    _snapshot: tuple = field(init=False, repr=False)

    def __post_init__(self):
        n, lw, lc = _check_fields(self)
        for name, value in (("num_nodes", n), ("label_weights", lw), ("label_classes", lc)):
            object.__setattr__(self, name, value)
        rows = _csr_rows(self.indptr, n)
        t_indptr, t_indices, t_weights = _transpose(rows, self.indices, self.weights, n)
        symmetric = (
            torch.equal(t_indptr, self.indptr)
            and torch.equal(t_indices, self.indices)
            and torch.equal(t_weights, self.weights)
        )
        if symmetric:  # one set of tensors for both sides
            t_indptr, t_indices, t_weights = self.indptr, self.indices, self.weights
        pos = torch.zeros(n, dtype=torch.float64, device=self.device)
        pos.index_add_(0, rows, self.weights.double())
        total = float(self.weights.double().sum())
        for y, a, c in zip(self.labels, lw, lc):
            known = y >= 0
            counts = torch.bincount(y[known], minlength=c).double()
            sizes = torch.zeros(n, dtype=torch.float64, device=self.device)
            sizes[known] = counts[y[known]]
            pos += a * (sizes - 1).clamp_min(0) * known
            total += a * float((counts * (counts - 1)).sum())
        if total > MAX_WEIGHT:
            raise ValueError(f"PairGraph: the total weight |G| must be <= MAX_WEIGHT = {MAX_WEIGHT:g}, got {total:g}")
        for name, value in (
            ("t_indptr", t_indptr),
            ("t_indices", t_indices),
            ("t_weights", t_weights),
            ("pos_weight", pos),
            ("num_anchors", int((pos > 0).sum())),
            ("total_weight", total),
            ("symmetric", bool(symmetric)),
        ):
            object.__setattr__(self, name, value)
        _check_negatives(self)
        self._take_snapshot()

    def _take_snapshot(self) -> None:
        copies = {}  # a tensor shared by two fields (a symmetric graph's sides) is copied once
        tensors = tuple(copies.setdefault(id(getattr(self, f)), getattr(self, f).clone()) for f in _TENSOR_FIELDS)
        object.__setattr__(self, "_snapshot", (tensors, tuple(getattr(self, f) for f in _OTHER_FIELDS)))

    def __reduce__(self):  # pickle, copy, deepcopy: rebuilt (and re-validated) from its definition
        return (type(self), tuple(getattr(self, f.name) for f in fields(self) if f.init))

    def check_unchanged(self, op: str = "PairGraph.check_unchanged", name: str = "graph") -> torch.Tensor:
        """Raise ``ValueError`` if this graph (or its negatives) was changed after it was
        built: any tensor's values, shape, dtype or device (in place, through ``.data``,
        a NumPy view, or ``object.__setattr__``) or any other field; and if one of its
        tensors requires grad. Every loss calls it before its kernels run, also under
        ``torch.compile`` (the comparison is the custom op ``palfast::graph_unchanged``,
        which a compiled graph keeps). Costs one comparison of each tensor with its copy,
        O(E + N·L), and on a GPU one host sync.

        Returns a 0-dim zero that the losses add to their result, so that no compiler
        can drop the check as unused."""
        from . import _ops  # the op lives with the others; _ops does not import this module

        current, snapshot, names = self._check_fields_unchanged(op, name)
        return _ops.graph_unchanged(current, snapshot, " ".join(names), op)

    def _check_fields_unchanged(self, op: str, name: str) -> tuple[list, list, list]:
        """The non-tensor checks of check_unchanged; returns the tensors to compare
        (this graph's and its negatives'), their copies and their names."""
        tensors, others = self._snapshot
        for f, before in zip(_OTHER_FIELDS, others):
            now = getattr(self, f)
            if (now is not before) if f == "negatives" else (now != before):
                raise ValueError(
                    f"{op}: {name} must not be changed after it is built, got "
                    f"changes to {name}.{f} ({before!r} -> {now!r}); build a new "
                    "PairGraph"
                )
        for f in _TENSOR_FIELDS:
            if getattr(self, f).requires_grad:
                raise ValueError(
                    f"{op}: {name}.{f} must not require grad: palfast's losses do "
                    "not differentiate with respect to the graph (docs/api.md, "
                    "'Gradients')"
                )
        current = [getattr(self, f) for f in _TENSOR_FIELDS]
        snapshot = list(tensors)
        names = [f"{name}.{f}" for f in _TENSOR_FIELDS]
        if self.negatives is not None:
            c, s, n = self.negatives._check_fields_unchanged(op, f"{name}.negatives")
            current, snapshot, names = current + c, snapshot + s, names + n
        return current, snapshot, names

    # ------------------------------------------------------------------ build
    @classmethod
    def _build(cls, n, rows, cols, w, labels, label_weights, label_classes):
        device = rows.device
        off = rows != cols  # w_ii is ignored
        rows, cols, w = rows[off], cols[off], w[off]
        indptr, indices, weights = _csr(rows, cols, w, n)
        _check_weights(weights, "edge weights", "PairGraph")
        labels = labels.to(device=device, dtype=torch.long).reshape(-1, n)
        return cls(
            n,
            indptr,
            indices,
            weights.to(torch.float32),
            labels,
            tuple(float(a) for a in label_weights),
            tuple(int(c) for c in label_classes),
        )

    @staticmethod
    def _empty_edges(device=None):
        e = torch.zeros(0, dtype=torch.long, device=device)
        return e, e, torch.zeros(0, dtype=torch.float32, device=device)

    @classmethod
    def from_labels(cls, labels, weight: float = 1.0) -> PairGraph:
        """Rows with the same label are positives (weight ``weight``); label −1 = unknown.

        ``labels`` is an int tensor [N]. Labels are kept as class ids, never expanded
        into Σ n_c² edges."""
        op = "PairGraph.from_labels"
        y = as_long_vector(op, "labels", labels)
        if y.numel() and int(y.min()) < -1:
            raise ValueError(f"{op}: labels must be >= -1 (-1 = unknown), got {int(y.min())}")
        check_int(op, "len(labels)", y.numel(), 1, MAX_NODES)
        weight = _check_label_weight(weight, "weight", op)
        known = y >= 0
        compact = torch.full_like(y, -1)
        classes = 0
        if bool(known.any()):
            uniq, inv = torch.unique(y[known], return_inverse=True)
            compact[known] = inv
            classes = uniq.numel()
        r, c, w = cls._empty_edges(y.device)
        return cls._build(y.numel(), r, c, w, compact[None], (float(weight),), (classes,))

    @classmethod
    def from_views(cls, n: int, n_views: int = 2, *, device=None) -> PairGraph:
        """Rows ``i + v*n`` (v = 0..n_views−1) are mutual positives: SimCLR / multi-crop
        with ``z = torch.cat([view_0, ..., view_{V-1}])``."""
        op = "PairGraph.from_views"
        n = _check_nodes(op, "n", n)
        device = None if device is None else check_device(op, "device", device)
        n_views = check_int(op, "n_views", n_views, 1)
        if n * n_views > MAX_NODES:
            raise ValueError(
                f"{op}: n * n_views must be <= MAX_NODES = {MAX_NODES}, got {n} * {n_views} = {n * n_views}"
            )
        y = torch.arange(n, device=device).repeat(n_views)
        r, c, w = cls._empty_edges(device)
        return cls._build(n * n_views, r, c, w, y[None], (1.0,), (n,))

    @classmethod
    def from_edges(cls, src, dst, weights=None, *, num_nodes: int, symmetric: bool = True):
        """Explicit positive pairs ``src[e] → dst[e]`` with optional ``weights`` (default 1).

        ``symmetric=True`` also adds ``dst → src`` with the same weight. Duplicate
        edges are summed; self-loops are dropped."""
        op = "PairGraph.from_edges"
        num_nodes = _check_nodes(op, "num_nodes", num_nodes)
        symmetric = check_bool(op, "symmetric", symmetric)
        s = as_long_vector(op, "src", src)
        d = as_long_vector(op, "dst", dst).to(s.device)
        if s.numel() != d.numel():
            raise ValueError(f"{op}: src and dst must have the same length, got {s.numel()} and {d.numel()}")
        for t, name in ((s, "src"), (d, "dst")):
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_nodes):
                raise ValueError(
                    f"{op}: {name} must be in [0, num_nodes={num_nodes}), got values "
                    f"in [{int(t.min())}, {int(t.max())}]"
                )
        if weights is None:
            w = torch.ones(s.numel(), dtype=torch.float64, device=s.device)
        else:
            w = _real_weights(weights, "weights", op).to(s.device)
            if w.shape != s.shape:
                raise ValueError(f"{op}: weights must have shape {tuple(s.shape)} like src, got {tuple(w.shape)}")
            _check_weights(w, "weights", op)
        if symmetric:
            s, d, w = torch.cat([s, d]), torch.cat([d, s]), torch.cat([w, w])
        y = torch.zeros(0, num_nodes, dtype=torch.long, device=s.device)
        return cls._build(num_nodes, s, d, w, y, (), ())

    @classmethod
    def from_dense(cls, W) -> PairGraph:
        """Dense ``[N, N]`` non-negative weights (small N, tests). The diagonal is ignored."""
        op = "PairGraph.from_dense"
        W = _real_weights(W, "W", op)
        if W.dim() != 2 or W.shape[0] != W.shape[1]:
            raise ValueError(f"{op}: W must be a square [N, N] matrix, got shape {tuple(W.shape)}")
        _check_nodes(op, "N", W.shape[0])
        _check_weights(W, "W", op)
        r, c = W.nonzero(as_tuple=True)
        y = torch.zeros(0, W.shape[0], dtype=torch.long, device=W.device)
        return cls._build(W.shape[0], r, c, W[r, c], y, (), ())

    # ------------------------------------------------------------- algebra
    def __add__(self, other: PairGraph) -> PairGraph:
        if not isinstance(other, PairGraph):
            return NotImplemented
        if other.num_nodes != self.num_nodes:
            raise ValueError(f"PairGraph.__add__: cannot add graphs over {self.num_nodes} and {other.num_nodes} nodes")
        r1, c1, w1 = self._edge_list()
        r2, c2, w2 = other._edge_list()
        return PairGraph._build(
            self.num_nodes,
            torch.cat([r1, r2.to(r1.device)]),
            torch.cat([c1, c2.to(r1.device)]),
            torch.cat([w1, w2.to(r1.device)]),
            torch.cat([self.labels, other.labels.to(self.labels.device)]),
            self.label_weights + other.label_weights,
            self.label_classes + other.label_classes,
        ).with_negatives(_sum_negatives(self.negatives, other.negatives, self.device))

    def __mul__(self, a) -> PairGraph:
        op = "PairGraph.__mul__"
        if isinstance(a, torch.Tensor):
            if a.requires_grad:
                raise ValueError(
                    f"{op}: scale must not require grad: palfast's losses do not "
                    "differentiate with respect to the graph (docs/api.md, "
                    "'Gradients')"
                )
            if a.numel() != 1:
                raise ValueError(f"{op}: scale must be a number, got a tensor of shape {tuple(a.shape)}")
            a = a.item()
        if not isinstance(a, numbers.Real):
            return NotImplemented
        a = check_number(op, "scale", a, 0.0)
        r, c, w = self._edge_list()
        return PairGraph._build(
            self.num_nodes,
            r,
            c,
            w.double() * a,
            self.labels,
            tuple(_check_label_weight(a * x, "scale * label weight", "PairGraph.__mul__") for x in self.label_weights),
            self.label_classes,
        ).with_negatives(None if self.negatives is None else a * self.negatives)

    __rmul__ = __mul__

    # ------------------------------------------------------------ negatives
    def with_negatives(self, negatives: PairGraph | None) -> PairGraph:
        """This graph's positives with ``negatives`` as its known negatives (``None``
        drops them). ``negatives`` is a PairGraph over the same rows and device, without
        negatives of its own, sharing no pair with the positives (w_ij > 0 in both);
        build it with ``PairGraph.from_edges(src, dst, weights, num_nodes=N)``. Its
        weights say how strongly a pair differs (used by ``spectral_contrastive``;
        ``info_nce`` only uses which pairs are known). ``g1 + g2`` adds the negatives
        too, ``a * g`` scales them with the positives, ``g.to(device)`` moves them.

        Example::

            >>> import torch, palfast
            >>> g = palfast.PairGraph.from_views(2, 2).with_negatives(
            ...     palfast.PairGraph.from_edges([0, 0, 2, 2], [1, 3, 1, 3], num_nodes=4))
            >>> g.negatives.to_dense().tolist()
            [[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]]
        """
        # The positives are unchanged: share their tensors, derived fields and copies
        # instead of re-validating them (replace would), and check the negatives only.
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        object.__setattr__(new, "negatives", negatives)
        _check_negatives(new)
        tensors, others = self._snapshot
        object.__setattr__(
            new,
            "_snapshot",
            (tensors, tuple(negatives if f == "negatives" else v for f, v in zip(_OTHER_FIELDS, others))),
        )
        return new

    # ------------------------------------------------------------ queries
    @property
    def device(self) -> torch.device:
        return self.indptr.device

    @property
    def num_edges(self) -> int:
        """Number of positive (i, j) pairs with i ≠ j, label pairs included (ordered)."""
        e = self.indices.numel()
        for y in self.labels:
            counts = torch.bincount(y[y >= 0])
            e += int((counts * (counts - 1)).sum())
        return e

    def degree(self) -> torch.Tensor:
        """W_i = Σ_{j≠i} w_ij, float64 [N] (exact sums of the float32 weights)."""
        return self.pos_weight

    def to(self, device) -> PairGraph:
        device = check_device("PairGraph.to", "device", device)
        moved = {f: getattr(self, f).to(device) for f in ("indptr", "indices", "weights", "labels")}
        negatives = None if self.negatives is None else self.negatives.to(device)
        return replace(self, **moved, negatives=negatives)

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full [N, N] positive weight matrix with a zero diagonal (small N only);
        ``graph.negatives.to_dense()`` is the negative one."""
        n = self.num_nodes
        W = torch.zeros(n, n, dtype=dtype, device=self.device)
        r, c, w = self._edge_list()
        W.index_put_((r, c), w.to(dtype), accumulate=True)
        for y, a in zip(self.labels, self.label_weights):
            same = (y[:, None] == y[None, :]) & (y[:, None] >= 0)
            W += a * same.to(dtype)
        W.fill_diagonal_(0)
        return W

    def kernel_args(self) -> tuple:
        """The positive graph as the custom ops take it (see csrc/graph.h); the
        negatives are passed as their own graph (``graph.negatives.kernel_args()``)."""
        return (
            self.indptr,
            self.indices,
            self.weights,
            self.t_indptr,
            self.t_indices,
            self.t_weights,
            self.labels,
            list(self.label_weights),
            list(self.label_classes),
            self.pos_weight,
        )

    def known_pairs(self, anchor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ordered pairs (i, k), i ≠ k, that this graph knows something about: a
        positive (a stored edge, or a shared class of a label set of weight > 0) or a
        known negative (the same in ``self.negatives``). Returns ``(rows, cols)``, int64
        on the graph's device, each pair once, sorted by (i, k); ``anchor`` (a bool
        ``[N]`` mask, default every row) keeps the pairs whose i is an anchor.

        Label sets are expanded: a class of m rows gives m·(m − 1) pairs, so this costs
        O(E + Σ m²) memory (``info_nce`` with ``unknown_weight < 1`` uses it).

        Example::

            >>> import torch, palfast
            >>> g = palfast.PairGraph.from_labels(torch.tensor([0, 1, 0, -1]))
            >>> [t.tolist() for t in g.known_pairs()]
            [[0, 2], [2, 0]]
        """
        n = self.num_nodes
        if anchor is None:
            anchor = torch.ones(n, dtype=torch.bool, device=self.device)
        elif (
            not isinstance(anchor, torch.Tensor)
            or anchor.dtype != torch.bool
            or anchor.shape != (n,)
            or anchor.device != self.device
        ):
            what = (
                f"{anchor.dtype} of shape {tuple(anchor.shape)} on {anchor.device}"
                if isinstance(anchor, torch.Tensor)
                else type(anchor).__name__
            )
            raise TypeError(
                f"PairGraph.known_pairs: anchor must be a bool tensor of shape "
                f"[{n}] on {self.device} (one flag per row), got {what}"
            )
        parts = []
        for g in (self, self.negatives):
            if g is None:
                continue
            r, c, _ = g._edge_list()
            parts.append((r[anchor[r]], c[anchor[r]]))
            parts += [_label_set_pairs(y, anchor) for y, a in zip(g.labels, g.label_weights) if a > 0]
        keys = torch.unique(torch.cat([r * n + c for r, c in parts]))
        return keys // n, keys % n

    def _edge_list(self):
        return _csr_rows(self.indptr, self.num_nodes), self.indices, self.weights

    def __repr__(self) -> str:
        return (
            f"PairGraph(num_nodes={self.num_nodes}, csr_edges={self.indices.numel()}, "
            f"label_sets={len(self.label_weights)}, anchors={self.num_anchors}, "
            f"total_weight={self.total_weight:g}, "
            f"negative_edges={None if self.negatives is None else self.negatives.num_edges}, "
            f"device={self.device})"
        )


# What check_unchanged compares: every tensor (the kernels read them all) and every
# other field (negatives by identity: its own tensors are compared as its own graph).
_TENSOR_FIELDS = ("indptr", "indices", "weights", "t_indptr", "t_indices", "t_weights", "labels", "pos_weight")
_OTHER_FIELDS = ("num_nodes", "label_weights", "label_classes", "negatives", "num_anchors", "total_weight", "symmetric")


def _csr_rows(indptr: torch.Tensor, n: int) -> torch.Tensor:
    """The row of each edge of a CSR with a valid (non-decreasing) ``indptr``."""
    return torch.repeat_interleave(torch.arange(n, device=indptr.device), indptr.diff())


def _transpose(rows: torch.Tensor, cols: torch.Tensor, w: torch.Tensor, n: int):
    """CSR (indptr, indices, weights) of Gᵀ from G's unique edges (rows, cols, w)."""
    order = torch.argsort(cols * n + rows)
    indptr = torch.zeros(n + 1, dtype=torch.long, device=rows.device)
    indptr[1:] = torch.cumsum(torch.bincount(cols, minlength=n), 0)
    return indptr, rows[order], w[order]


def _check_fields(g: PairGraph) -> tuple[int, tuple[float, ...], tuple[int, ...]]:
    """Validate the defining fields of a PairGraph (all of csrc/graph.h's checks and
    the CSR's canonical form, so the derived fields can be computed from them);
    returns num_nodes, label_weights and label_classes normalised."""
    op = "PairGraph"
    n = _check_nodes(op, "num_nodes", g.num_nodes)
    spec = {"indptr": torch.long, "indices": torch.long, "weights": torch.float32, "labels": torch.long}
    for name, dtype in spec.items():
        t = getattr(g, name)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise TypeError(f"{op}: {name} must be {str(dtype).removeprefix('torch.')}, got {t.dtype}")
        if t.requires_grad:
            raise ValueError(
                f"{op}: {name} must not require grad: palfast's losses do not "
                "differentiate with respect to the graph (docs/api.md, 'Gradients')"
            )
        if t.device != g.indptr.device:
            raise ValueError(f"{op}: {name} must be on indptr's device ({g.indptr.device}), got {t.device}")
        if t.layout != torch.strided:
            raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got {t.layout}")
    indptr, indices, weights, labels = g.indptr, g.indices, g.weights, g.labels
    if indptr.shape != (n + 1,):
        raise ValueError(f"{op}: indptr must have shape [num_nodes + 1] = [{n + 1}], got {list(indptr.shape)}")
    if indices.dim() != 1:
        raise ValueError(f"{op}: indices must be 1-D [E], got shape {tuple(indices.shape)}")
    e = indices.numel()
    if weights.shape != (e,):
        raise ValueError(f"{op}: weights must have shape ({e},) like indices, got {tuple(weights.shape)}")
    if labels.dim() != 2 or labels.shape[1] != n:
        raise ValueError(
            f"{op}: labels must have shape [L, {n}] (one row of class ids per label set), got {list(labels.shape)}"
        )
    lw, lc = g.label_weights, g.label_classes
    for name, value in (("label_weights", lw), ("label_classes", lc)):
        if not isinstance(value, tuple | list) or len(value) != labels.shape[0]:
            what = "weight" if name == "label_weights" else "class count"
            raise ValueError(f"{op}: {name} must have one {what} per label set (L = {labels.shape[0]}), got {value!r}")
    lw = tuple(_check_label_weight(a, f"label_weights[{k}]", op) for k, a in enumerate(lw))
    lc = tuple(check_int(op, f"label_classes[{k}]", c, 0, n) for k, c in enumerate(lc))
    steps = indptr.diff()
    if int(indptr[0]) != 0 or int(indptr[-1]) != e or (n and bool((steps < 0).any())):
        raise ValueError(
            f"{op}: indptr must start at 0, end at E = {e} and never decrease, got "
            f"first {int(indptr[0])}, last {int(indptr[-1])}"
        )
    if e:
        if int(indices.min()) < 0 or int(indices.max()) >= n:
            raise ValueError(
                f"{op}: indices must be in [0, num_nodes = {n}), got values in "
                f"[{int(indices.min())}, {int(indices.max())}]"
            )
        rows = _csr_rows(indptr, n)
        key = rows * n + indices
        if bool((key.diff() <= 0).any()) or bool((rows == indices).any()):
            raise ValueError(
                f"{op}: indices must be increasing within each row and hold no "
                "self-loop (column i in row i); build graphs with "
                "PairGraph.from_edges, which sorts and sums duplicates"
            )
    _check_weights(weights, "weights", op)
    for k, (y, c) in enumerate(zip(labels, lc)):
        if y.numel() and (int(y.min()) < -1 or int(y.max()) >= c):
            raise ValueError(
                f"{op}: labels[{k}] must hold class ids in [-1, label_classes[{k}] "
                f"= {c}), got values in [{int(y.min())}, {int(y.max())}]"
            )
    return n, lw, lc


def _sum_negatives(a: PairGraph | None, b: PairGraph | None, device) -> PairGraph | None:
    """The known negatives of ``g1 + g2``: the union of both sides' (weights summed)."""
    if a is None or b is None:
        return a if b is None else b.to(device)
    return a + b.to(device)


def _label_pair_rows(y: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Which of the ordered pairs (r[e], c[e]) share a known class of label set y."""
    return (y[r] == y[c]) & (y[r] >= 0)


def _label_set_pairs(y: torch.Tensor, anchor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ordered pairs (i, k), i ≠ k, of rows sharing a known class of label set y,
    for the rows i where ``anchor`` holds: Σ_c (anchors in c)·n_c pairs."""
    known = (y >= 0).nonzero().squeeze(1)
    order = known[torch.argsort(y[known], stable=True)]  # rows grouped by class
    counts = torch.bincount(y[order])
    starts = torch.cumsum(counts, 0) - counts
    rows = order[anchor[order]]
    size = counts[y[rows]]
    r = torch.repeat_interleave(rows, size)
    local = torch.arange(r.numel(), device=y.device) - torch.repeat_interleave(torch.cumsum(size, 0) - size, size)
    c = order[starts[y[r]] + local]
    off = r != c
    return r[off], c[off]


def _shared_pair(a: PairGraph, b: PairGraph) -> tuple[int, int] | None:
    """An ordered pair (i, j), i ≠ j, with w_ij > 0 in both a and b, or None.

    O(E·L + N·L²) without expanding label sets into pairs: explicit edges are
    looked up in the other side's edges (sorted keys) and label sets; two label
    sets share a pair when two rows agree on both class ids."""
    n = a.num_nodes
    ra, ca, _ = a._edge_list()
    rb, cb, _ = b._edge_list()
    hit = torch.isin(ra * n + ca, rb * n + cb)
    if bool(hit.any()):
        k = int(hit.nonzero()[0])
        return int(ra[k]), int(ca[k])
    for (r, c), other in (((ra, ca), b), ((rb, cb), a)):
        for y, w in zip(other.labels, other.label_weights):
            hit = _label_pair_rows(y, r, c) if w > 0 else torch.zeros_like(r, dtype=torch.bool)
            if bool(hit.any()):
                k = int(hit.nonzero()[0])
                return int(r[k]), int(c[k])
    for ya, wa, ka in zip(a.labels, a.label_weights, a.label_classes):
        for yb, wb in zip(b.labels, b.label_weights):
            both = ((ya >= 0) & (yb >= 0)).nonzero().squeeze(1)
            if wa == 0 or wb == 0 or both.numel() < 2:
                continue
            key = yb[both] * max(ka, 1) + ya[both]  # one key per (class in b, class in a)
            _, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
            if bool((counts > 1).any()):
                rows = both[inverse == int((counts > 1).nonzero()[0])]
                return int(rows[0]), int(rows[1])
    return None


def _check_negatives(g: PairGraph) -> None:
    """graph.negatives: None, or a PairGraph over g's rows and device with no negatives
    of its own and no pair that is also a positive of g."""
    neg, op = g.negatives, "PairGraph"
    if neg is None:
        return
    if not isinstance(neg, PairGraph):
        raise TypeError(
            f"{op}: negatives must be a PairGraph or None, got "
            f"{type(neg).__name__}; build one with PairGraph.from_edges(src, dst, "
            "num_nodes=N)"
        )
    if neg.negatives is not None:
        raise ValueError(
            f"{op}: negatives must not carry negatives of its own (a pair is "
            "alike, different or unknown); pass negatives.with_negatives(None)"
        )
    if neg.num_nodes != g.num_nodes:
        raise ValueError(
            f"{op}: negatives must be over the graph's {g.num_nodes} rows, got a graph over {neg.num_nodes} nodes"
        )
    if neg.device != g.device:
        raise ValueError(
            f"{op}: negatives must be on the graph's device ({g.device}), got "
            f"{neg.device}; use negatives.to({str(g.device)!r})"
        )
    shared = _shared_pair(g, neg)
    if shared is not None:
        raise ValueError(
            f"{op}: negatives must not contain a positive pair, got rows {shared} "
            "both alike and different; resolve the contradiction first "
            "(RelationStore keeps the first answer and warns with "
            "ContradictionWarning)"
        )
