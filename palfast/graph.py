"""PairGraph: the similarity graph G of PAL over the N rows of a batch (SPEC §2).

G_ij = w_ij ≥ 0 says "row i and row j are alike, with weight w_ij". It is the
sum of two parts, neither of which ever becomes an N×N matrix:

* explicit edges, stored as CSR (``indptr [N+1]``, ``indices [E]``, ``weights [E]``
  float32) plus the CSR of Gᵀ (the same tensors when G is symmetric);
* label sets: ``labels [L, N]`` compact class ids (−1 = unknown) with one weight
  per set; row i and j are positives with weight a_l when they share a class.
  Kernels use per-class sums, so a label graph costs O(N·D), not O(Σ n_c²·D).

``from_views(n, V)`` is a label set too (the class of row i + v·n is i).

All data-dependent validation (index ranges, finite non-negative weights)
happens once here, so the loss kernels never sync with the host.
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

import math
from dataclasses import dataclass

import torch

__all__ = ["PairGraph"]


def _as_long_vector(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor, got shape {tuple(t.shape)}")
    if t.numel() and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"{name} must hold integers, got {t.dtype}")
    return t.to(torch.long)


def _check_weights(w: torch.Tensor, name: str) -> None:
    if w.numel() == 0:
        return
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} must be finite, got {int((~torch.isfinite(w)).sum())} non-finite")
    if bool((w < 0).any()):
        raise ValueError(f"{name} must be >= 0, got minimum {float(w.min())}")


def _csr(rows: torch.Tensor, cols: torch.Tensor, w: torch.Tensor, n: int):
    """Coalesced CSR (duplicates summed, zero weights dropped) of the edges rows→cols."""
    if rows.numel():
        key, inverse = torch.unique(rows * n + cols, return_inverse=True)
        w = torch.zeros(key.numel(), dtype=torch.float32, device=w.device).index_add_(0, inverse, w)
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
    ``a * g`` (scaling). See the module docstring for the storage layout."""

    num_nodes: int
    indptr: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor
    t_indptr: torch.Tensor
    t_indices: torch.Tensor
    t_weights: torch.Tensor
    labels: torch.Tensor  # [L, N] int64 compact class ids, −1 unknown
    label_weights: tuple[float, ...]
    label_classes: tuple[int, ...]
    pos_weight: torch.Tensor  # [N] float64, W_i = Σ_{j≠i} w_ij
    num_anchors: int  # rows with W_i > 0
    total_weight: float  # |G| = Σ_ij w_ij
    symmetric: bool

    # ------------------------------------------------------------------ build
    @classmethod
    def _build(cls, n, rows, cols, w, labels, label_weights, label_classes, symmetric):
        device = rows.device
        off = rows != cols  # w_ii is ignored
        rows, cols, w = rows[off], cols[off], w[off].to(torch.float32)
        indptr, indices, weights = _csr(rows, cols, w, n)
        if symmetric:
            t_indptr, t_indices, t_weights = indptr, indices, weights
        else:
            src = torch.repeat_interleave(torch.arange(n, device=device), indptr.diff())
            t_indptr, t_indices, t_weights = _csr(indices, src, weights, n)
        labels = labels.to(device=device, dtype=torch.long).reshape(-1, n)
        pos = torch.zeros(n, dtype=torch.float64, device=device)
        pos.index_add_(0, torch.repeat_interleave(torch.arange(n, device=device), indptr.diff()),
                       weights.double())
        total = float(weights.double().sum())
        for y, a, c in zip(labels, label_weights, label_classes):
            known = y >= 0
            counts = torch.bincount(y[known], minlength=c).double()
            sizes = torch.zeros(n, dtype=torch.float64, device=device)
            sizes[known] = counts[y[known]]
            pos += a * (sizes - 1).clamp_min(0) * known
            total += a * float((counts * (counts - 1)).sum())
        return cls(n, indptr, indices, weights, t_indptr, t_indices, t_weights, labels,
                   tuple(float(a) for a in label_weights), tuple(int(c) for c in label_classes),
                   pos, int((pos > 0).sum()), total, bool(symmetric))

    @staticmethod
    def _empty_edges(device=None):
        e = torch.zeros(0, dtype=torch.long, device=device)
        return e, e, torch.zeros(0, dtype=torch.float32, device=device)

    @classmethod
    def from_labels(cls, labels, weight: float = 1.0) -> PairGraph:
        """Rows with the same label are positives (weight ``weight``); label −1 = unknown.

        ``labels`` is an int tensor [N]. Labels are kept as class ids, never expanded
        into Σ n_c² edges."""
        y = _as_long_vector(labels, "labels")
        if y.numel() and int(y.min()) < -1:
            raise ValueError(f"labels must be >= -1 (-1 = unknown), got {int(y.min())}")
        _check_scale(weight, "weight")
        known = y >= 0
        compact = torch.full_like(y, -1)
        classes = 0
        if bool(known.any()):
            uniq, inv = torch.unique(y[known], return_inverse=True)
            compact[known] = inv
            classes = uniq.numel()
        r, c, w = cls._empty_edges(y.device)
        return cls._build(y.numel(), r, c, w, compact[None], (float(weight),), (classes,), True)

    @classmethod
    def from_views(cls, n: int, n_views: int = 2, *, device=None) -> PairGraph:
        """Rows ``i + v*n`` (v = 0..n_views−1) are mutual positives: SimCLR / multi-crop
        with ``z = torch.cat([view_0, ..., view_{V-1}])``."""
        _check_count(n, "n", 1)
        _check_count(n_views, "n_views", 1)
        y = torch.arange(n, device=device).repeat(n_views)
        r, c, w = cls._empty_edges(device)
        return cls._build(n * n_views, r, c, w, y[None], (1.0,), (n,), True)

    @classmethod
    def from_edges(cls, src, dst, weights=None, *, num_nodes: int, symmetric: bool = True):
        """Explicit positive pairs ``src[e] → dst[e]`` with optional ``weights`` (default 1).

        ``symmetric=True`` also adds ``dst → src`` with the same weight. Duplicate
        edges are summed; self-loops are dropped."""
        _check_count(num_nodes, "num_nodes", 1)
        s = _as_long_vector(src, "src")
        d = _as_long_vector(dst, "dst").to(s.device)
        if s.numel() != d.numel():
            raise ValueError(f"src and dst must have the same length, got {s.numel()} and {d.numel()}")
        for t, name in ((s, "src"), (d, "dst")):
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_nodes):
                raise ValueError(f"{name} must be in [0, num_nodes={num_nodes}), got values in "
                                 f"[{int(t.min())}, {int(t.max())}]")
        if weights is None:
            w = torch.ones(s.numel(), dtype=torch.float32, device=s.device)
        else:
            w = torch.as_tensor(weights, device=s.device)
            if not w.dtype.is_floating_point and w.dtype != torch.bool and w.numel():
                w = w.float()
            if w.shape != s.shape:
                raise ValueError(f"weights must have shape {tuple(s.shape)} like src, "
                                 f"got {tuple(w.shape)}")
            w = w.to(torch.float32)
            _check_weights(w, "weights")
        if symmetric:
            s, d, w = torch.cat([s, d]), torch.cat([d, s]), torch.cat([w, w])
        y = torch.zeros(0, num_nodes, dtype=torch.long, device=s.device)
        return cls._build(num_nodes, s, d, w, y, (), (), symmetric)

    @classmethod
    def from_dense(cls, W) -> PairGraph:
        """Dense ``[N, N]`` non-negative weights (small N, tests). The diagonal is ignored."""
        W = torch.as_tensor(W)
        if W.dim() != 2 or W.shape[0] != W.shape[1]:
            raise ValueError(f"W must be a square [N, N] matrix, got shape {tuple(W.shape)}")
        W = W.to(torch.float32)
        _check_weights(W, "W")
        symmetric = bool(torch.equal(W, W.T))
        r, c = W.nonzero(as_tuple=True)
        y = torch.zeros(0, W.shape[0], dtype=torch.long, device=W.device)
        return cls._build(W.shape[0], r, c, W[r, c], y, (), (), symmetric)

    # ------------------------------------------------------------- algebra
    def __add__(self, other: PairGraph) -> PairGraph:
        if not isinstance(other, PairGraph):
            return NotImplemented
        if other.num_nodes != self.num_nodes:
            raise ValueError(f"cannot add graphs over {self.num_nodes} and {other.num_nodes} nodes")
        r1, c1, w1 = self._edge_list()
        r2, c2, w2 = other._edge_list()
        return PairGraph._build(
            self.num_nodes, torch.cat([r1, r2.to(r1.device)]), torch.cat([c1, c2.to(r1.device)]),
            torch.cat([w1, w2.to(r1.device)]),
            torch.cat([self.labels, other.labels.to(self.labels.device)]),
            self.label_weights + other.label_weights, self.label_classes + other.label_classes,
            self.symmetric and other.symmetric)

    def __mul__(self, a) -> PairGraph:
        if isinstance(a, torch.Tensor):
            a = float(a)
        if not isinstance(a, (int, float)):
            return NotImplemented
        _check_scale(a, "scale")
        r, c, w = self._edge_list()
        return PairGraph._build(self.num_nodes, r, c, w * a, self.labels,
                                tuple(a * x for x in self.label_weights), self.label_classes,
                                self.symmetric)

    __rmul__ = __mul__

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
        device = torch.device(device)
        moved = {f: getattr(self, f).to(device) for f in _TENSOR_FIELDS}
        return PairGraph(**{**self.__dict__, **moved})

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full [N, N] weight matrix with a zero diagonal (small N only)."""
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
        """The graph as the custom ops take it (see csrc/graph.h)."""
        return (self.indptr, self.indices, self.weights, self.t_indptr, self.t_indices,
                self.t_weights, self.labels, list(self.label_weights),
                list(self.label_classes), self.pos_weight)

    def _edge_list(self):
        rows = torch.repeat_interleave(torch.arange(self.num_nodes, device=self.device),
                                       self.indptr.diff())
        return rows, self.indices, self.weights

    def __repr__(self) -> str:
        return (f"PairGraph(num_nodes={self.num_nodes}, csr_edges={self.indices.numel()}, "
                f"label_sets={len(self.label_weights)}, anchors={self.num_anchors}, "
                f"total_weight={self.total_weight:g}, device={self.device})")


_TENSOR_FIELDS = ("indptr", "indices", "weights", "t_indptr", "t_indices", "t_weights", "labels",
                  "pos_weight")


def _check_count(v, name: str, minimum: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")


def _check_scale(a, name: str) -> None:
    if not isinstance(a, (int, float)) or isinstance(a, bool) or not math.isfinite(a) or a < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {a!r}")
