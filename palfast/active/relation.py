"""The relation the answers imply: union-find over "alike" answers and cannot-links
between its components from "different" answers (docs/active.md, "RelationStore").

:class:`Relation` is the in-memory half of :class:`palfast.active.RelationStore`: it is
fed the answers in log order (``palfast/active/answer_log.py`` keeps the log) and answers
queries. It touches no database: rebuilding it from a log is replaying the log.

* a **union-find** over positive answers (transitivity: i~j, j~k ⇒ i~k), over dense
  indices (a dict maps sample id → index, in order of first appearance);
* **cannot-link** pairs between components from negative answers, propagated by
  construction: the negative is stored between the two *components*, so
  A~B and B≁C give A≁C, and merging two components merges their cannot-links.
* **contradictions** (an answer saying i~j after i≁j was implied, or the reverse) are
  kept in :meth:`Relation.answers` but do not change the relation: the first answer wins.
  This is the store's default policy, ``"first"``; the others (palfast/active/policy.py)
  feed a :class:`Relation` what they make of the answers.

Example::

    >>> from palfast.active.relation import Relation
    >>> rel = Relation()
    >>> rel.extend([(0, 1, True), (1, 2, True), (2, 3, False)])
    []
    >>> rel.same(0, 2), rel.same(0, 3), rel.same(0, 4)
    (True, False, None)
"""

from __future__ import annotations

import numpy as np
import torch

from .._checks import check_bool, check_device, check_number
from ..graph import PairGraph

__all__ = ["MAX_IMPLICIT_IDS", "Relation", "as_pairs"]

#: ``indices=None`` means ``0..num_ids-1``; refused above this many ids (pass indices).
MAX_IMPLICIT_IDS = 1 << 24


def as_pairs(pairs, name: str = "pairs") -> torch.Tensor:
    """``pairs`` as a CPU LongTensor ``[Q, 2]`` of sample ids (ints >= 0); an empty input
    becomes ``[0, 2]``. ``ValueError``/``TypeError`` naming ``name`` otherwise."""
    t = torch.as_tensor(pairs)
    if t.numel() == 0:
        t = t.reshape(0, 2)
    if t.dim() != 2 or t.shape[1] != 2:
        raise ValueError(f"{name} must be a [Q, 2] tensor of sample ids, got shape {tuple(t.shape)}")
    return _sample_ids(t, name)


def _sample_ids(t: torch.Tensor, name: str) -> torch.Tensor:
    """t as a CPU LongTensor; ``TypeError``/``ValueError`` naming ``name`` unless it holds
    integers >= 0."""
    if t.numel() and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"{name} must hold integer sample ids, got {t.dtype}")
    t = t.to(device="cpu", dtype=torch.long)
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"{name} must hold sample ids >= 0, got {int(t.min())}")
    return t


class Relation:
    """What a list of answers implies, answer by answer in log order (see the module
    docstring).

    Args:
        name: how error messages name the owner (``"RelationStore"`` for a store's).
    """

    def __init__(self, name: str = "Relation"):
        self._name = name
        self.clear()

    def clear(self) -> None:
        """Forget every answer (a store replays its log after a retraction)."""
        # Sample ids are mapped to dense indices (order of first appearance): ids are
        # arbitrary int64, so nothing may be sized by the largest one.
        self._dense: dict[int, int] = {}  # sample id -> dense index
        self._ids: list[int] = []  # dense index -> sample id
        self._parent: list[int] = []  # union-find forest over dense indices
        self._size: list[int] = []
        self._cannot: dict[int, set[int]] = {}  # dense root -> dense roots it cannot join
        self._max_id = -1
        self._log_i: list[int] = []  # the answers applied, in order
        self._log_j: list[int] = []
        self._log_a: list[bool] = []
        self._conflicts: list[int] = []  # positions (in _log_*) of contradicting answers
        self._cache: dict | None = None  # vectorised lookups, rebuilt after changes

    def extend(self, answers, joined: list | None = None) -> list[int]:
        """Apply ``answers``, an iterable of ``(i, j, alike)`` (sample ids as ints, ``i !=
        j``; the caller checked them), after those already applied. Returns the positions
        (in :meth:`answers`) of those among them that contradicted what was known.
        ``joined``: a list that receives ``(position, size_i, size_j)`` for every answer
        that joined two components, their sizes just before (policy ``"majority"``'s
        re-ask candidates, palfast/active/policy.py)."""
        first, before = len(self._conflicts), len(self._log_a)
        # A store's reopen replays every answer here: the loop reads locals only.
        log_i, log_j, log_a, conflicts = self._log_i, self._log_j, self._log_a, self._conflicts
        dense, parent, cannot = self._dense, self._parent, self._cannot
        node, find, union, size = self._node, self._find, self._union, self._size
        for i, j, ans in answers:
            position = len(log_a)
            log_i.append(i)
            log_j.append(j)
            log_a.append(ans)
            di, dj = dense.get(i), dense.get(j)
            di = node(i) if di is None else di
            dj = node(j) if dj is None else dj
            ri = di if parent[di] == di else find(di)  # a root (most often): no call
            rj = dj if parent[dj] == dj else find(dj)
            if ans:
                if ri == rj:
                    continue
                if rj in cannot.get(ri, ()):
                    conflicts.append(position)
                    continue
                if joined is not None:
                    joined.append((position, size[ri], size[rj]))
                union(ri, rj)
            else:
                if ri == rj:
                    conflicts.append(position)
                    continue
                cannot.setdefault(ri, set()).add(rj)
                cannot.setdefault(rj, set()).add(ri)
        if len(log_a) > before:
            self._cache = None
        return conflicts[first:]

    @property
    def relation(self) -> Relation:
        """This relation itself: under policy ``"first"`` the answers feed it directly
        (the other policies' relations, in palfast/active/policy.py, hold one)."""
        return self

    def answer_at(self, position: int) -> tuple[int, int, bool]:
        """``(i, j, alike)`` of the answer at ``position`` of :meth:`answers`."""
        return self._log_i[position], self._log_j[position], self._log_a[position]

    def n_components(self) -> int:
        """Components with more than one sample."""
        return sum(1 for d, p in enumerate(self._parent) if p == d and self._size[d] > 1)

    def _node(self, i: int) -> int:
        """Dense index of sample id ``i``, created on first sight."""
        d = self._dense.get(i)
        if d is None:
            d = self._dense[i] = len(self._ids)
            self._ids.append(i)
            self._parent.append(d)
            self._size.append(1)
            self._max_id = max(self._max_id, i)
        return d

    def _find(self, d: int) -> int:
        parent = self._parent
        root = d
        while parent[root] != root:
            root = parent[root]
        while parent[d] != root:  # path compression
            parent[d], d = root, parent[d]
        return root

    def _union(self, ri: int, rj: int) -> None:
        if self._size[ri] < self._size[rj]:
            ri, rj = rj, ri
        self._parent[rj] = ri
        self._size[ri] += self._size[rj]
        # Cannot-links of the absorbed root now belong to the surviving root.
        moved = self._cannot.pop(rj, set())
        for r in moved:
            s = self._cannot[r]
            s.discard(rj)
            s.add(ri)
        if moved:
            self._cannot.setdefault(ri, set()).update(moved)

    def _lookup(self) -> dict:
        """Arrays for vectorised queries: sorted sample ids, their dense index, the dense
        root of every dense index, and the sorted cannot-link keys."""
        if self._cache is None:
            ids = np.asarray(self._ids, dtype=np.int64)
            order = np.argsort(ids, kind="stable")
            r = np.asarray(self._parent, dtype=np.int64)
            while True:  # pointer jumping until every node points at its root
                nxt = r[r]
                if np.array_equal(nxt, r):
                    break
                r = nxt
            n = max(len(self._ids), 1)
            keys = np.fromiter((x * n + y for x, s in self._cannot.items() for y in s), dtype=np.int64)
            self._cache = {
                "ids": ids,
                "sorted": ids[order],
                "order": order,
                "root": r,
                "size": np.asarray(self._size, dtype=np.int64),
                "n": n,
                "keys": np.sort(keys),
            }
        return self._cache

    def _dense_roots(self, ids: np.ndarray) -> np.ndarray:
        """Dense root of each sample id, −1 for ids never seen."""
        c = self._lookup()
        ids = np.asarray(ids, dtype=np.int64)
        if c["sorted"].shape[0] == 0:
            return np.full(ids.shape, -1, dtype=np.int64)
        pos = np.searchsorted(c["sorted"], ids).clip(max=c["sorted"].shape[0] - 1)
        seen = c["sorted"][pos] == ids
        return np.where(seen, c["root"][c["order"][pos]], -1)

    def _roots(self, ids: np.ndarray) -> np.ndarray:
        """Root sample id of each id (ids never seen are their own root), vectorised."""
        ids = np.asarray(ids, dtype=np.int64)
        d = self._dense_roots(ids)
        return np.where(d >= 0, self._lookup()["ids"][d.clip(min=0)] if len(self._ids) else 0, ids)

    # --------------------------------------------------------------- queries
    @property
    def n_queries(self) -> int:
        """Number of answers in the log (every source, conflicts and repeats included)."""
        return len(self._log_a)

    @property
    def n_conflicts(self) -> int:
        """Answers that contradicted what was already known (ignored by the relation)."""
        return len(self._conflicts)

    @property
    def num_ids(self) -> int:
        """1 + the largest sample id ever recorded (0 when empty). Ids need not be dense:
        use :meth:`ids` for the ids that appear in the log."""
        return self._max_id + 1

    def ids(self) -> torch.Tensor:
        """The sample ids that appear in the log, ascending (LongTensor ``[n]``)."""
        return torch.from_numpy(self._lookup()["sorted"].copy())

    def contradictions(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Answers that contradicted what was known when they were applied, in log order:
        ``(positions LongTensor [C], pairs LongTensor [C, 2], answers BoolTensor [C])``;
        ``positions`` index :meth:`answers`. They are in the log but not in the relation
        (the first answer wins)."""
        pos = torch.tensor(self._conflicts, dtype=torch.long)
        pairs = torch.tensor([[self._log_i[c], self._log_j[c]] for c in self._conflicts], dtype=torch.long).reshape(
            -1, 2
        )
        return pos, pairs, torch.tensor([self._log_a[c] for c in self._conflicts], dtype=torch.bool)

    def _check_id(self, v, name: str) -> int:
        if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.dtype.is_floating_point:
            v = int(v)
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{self._name}: {name} must be a sample id (int >= 0), got {v!r}")
        return int(v)

    def same(self, i, j) -> bool | None:
        """True if i and j are known alike (directly or by transitivity), False if known
        different (directly or propagated), None if unknown. ``same(i, i)`` is True."""
        i, j = self._check_id(i, "i"), self._check_id(j, "j")
        if i == j:
            return True
        di, dj = self._dense.get(i), self._dense.get(j)
        if di is None or dj is None:
            return None
        ri, rj = self._find(di), self._find(dj)
        if ri == rj:
            return True
        if rj in self._cannot.get(ri, ()):
            return False
        return None

    def is_known(self, i, j) -> bool:
        """True if the answer for (i, j) was given or is implied (``same(i, j) is not None``)."""
        return self.same(i, j) is not None

    def known_mask(self, pairs) -> torch.Tensor:
        """Vectorised :meth:`is_known` over ``pairs [Q, 2]``: BoolTensor ``[Q]``."""
        p = as_pairs(pairs).numpy()
        return torch.from_numpy(self.verdicts(p[:, 0], p[:, 1]) >= 0)

    def verdicts(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`same` over the sample ids ``i[q], j[q]`` (int64 arrays of one
        shape, checked by the caller): int8, 1 known alike, 0 known different, −1 unknown."""
        i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
        out = np.full(i.shape, -1, dtype=np.int8)
        if i.size == 0:
            return out
        ri, rj = self._dense_roots(i), self._dense_roots(j)
        both = (ri >= 0) & (rj >= 0)
        c = self._lookup()
        keys = c["keys"]
        if keys.shape[0]:
            q = np.where(both, ri * c["n"] + rj, -1)
            pos = np.searchsorted(keys, q).clip(max=keys.shape[0] - 1)
            out[both & (keys[pos] == q)] = 0
        out[(i == j) | (both & (ri == rj))] = 1
        return out

    def roots(self, indices=None) -> torch.Tensor:
        """Union-find root of each sample in ``indices`` (LongTensor ``[B]``), a sample id;
        a sample with no known positive is its own root. Equal roots ⇔ known alike."""
        return torch.from_numpy(self._roots(self._indices(indices).numpy()))

    def components(self, indices=None) -> torch.Tensor:
        """Component id of each sample in ``indices`` (LongTensor ``[B]``), −1 for samples
        with no known positive. Ids are roots of the union-find (sample ids): equal ⇔
        known alike. ``indices=None`` means all ids ``0..num_ids-1``."""
        idx = self._indices(indices).numpy()
        d = self._dense_roots(idx)
        c = self._lookup()
        size = np.where(d >= 0, c["size"][d.clip(min=0)] if len(self._ids) else 1, 1)
        roots = np.where(d >= 0, c["ids"][d.clip(min=0)] if len(self._ids) else 0, idx)
        return torch.from_numpy(np.where(size > 1, roots, -1))

    def answers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The log as ``(pairs LongTensor [Q, 2], answers BoolTensor [Q])``, in log order."""
        pairs = torch.tensor([self._log_i, self._log_j], dtype=torch.long).T.reshape(-1, 2)
        return pairs, torch.tensor(self._log_a, dtype=torch.bool)

    def _indices(self, indices) -> torch.Tensor:
        if indices is None:
            if self.num_ids > MAX_IMPLICIT_IDS:
                raise ValueError(
                    f"{self._name}: indices=None means every id 0..num_ids-1, "
                    f"and num_ids = {self.num_ids} > {MAX_IMPLICIT_IDS}; pass the "
                    f"sample ids explicitly (store.ids() lists those in the log)"
                )
            return torch.arange(self.num_ids)
        idx = torch.as_tensor(indices)
        if idx.dim() != 1:
            raise ValueError(f"{self._name}: indices must be a 1-D tensor of sample ids, got shape {tuple(idx.shape)}")
        return _sample_ids(idx, f"{self._name}: indices")

    def graph(
        self,
        indices=None,
        *,
        n_views: int = 1,
        label_weight: float = 1.0,
        view_weight: float = 1.0,
        negatives: bool = False,
        device=None,
    ) -> PairGraph:
        """PairGraph of the known positives (and, with ``negatives=True``, the known
        negatives) over a mini-batch.

        Row b of the batch is sample ``indices[b]`` (any int64 ≥ 0 sample id; ids never
        recorded have no known positive); rows b and b' are positives when the samples
        are in the same union-find component (answered or transitive). Built as
        ``PairGraph.from_labels(component ids)`` (−1 for samples with no known
        positive; from_labels compacts the ids), so a component of size m never expands
        into m² edges and nothing is sized by the largest sample id.

        With ``n_views = V > 1`` the graph is over ``z = cat([view_0, ..., view_{V-1}])``
        of the batch (V·B rows, row ``b + v·B`` = view v of sample b)::

            G = view_weight · PairGraph.from_views(B, V)
              + label_weight · PairGraph.from_labels(component ids repeated V times)

        so all views of all samples of one component are positives, and two views
        of one sample in a component get weight ``view_weight + label_weight``.
        This is PAL's G = (1−α)·G_views + α·G_labels with view_weight = 1−α,
        label_weight = α.

        With ``negatives=True`` the graph carries ``graph.negatives``: an edge of weight
        1 between every two rows whose samples are known to differ, directly or by
        transitivity (a "no" between a and c makes every member of a's component
        differ from every member of c's), all views included. The cannot-links are
        expanded over the batch's rows only: the cost is O(Σ_r min(|cannot(r)|, R))
        set lookups for the R components in the batch, plus one edge per ordered
        pair of rows known to differ (up to (V·B)², never more than the batch).

        Args:
            indices: LongTensor ``[B]`` global sample ids (``None``: ``0..num_ids-1``,
                refused when ``num_ids > MAX_IMPLICIT_IDS``).
            n_views: V ≥ 1.
            label_weight, view_weight: finite weights ≥ 0.
            negatives: also build ``graph.negatives`` from the "different" answers.
            device: where the graph lives (default CPU).
        """
        idx = self._indices(indices)
        if idx.numel() == 0:
            raise ValueError(f"{self._name}.graph: indices must hold at least one sample id")
        if isinstance(n_views, bool) or not isinstance(n_views, int) or n_views < 1:
            raise ValueError(f"{self._name}.graph: n_views must be an int >= 1, got {n_views!r}")
        op = f"{self._name}.graph"
        negatives = check_bool(op, "negatives", negatives)
        label_weight = check_number(op, "label_weight", label_weight, 0.0)
        view_weight = check_number(op, "view_weight", view_weight, 0.0)
        device = None if device is None else check_device(op, "device", device)
        comp = self.components(idx).to(device)
        g = PairGraph.from_labels(comp.repeat(n_views), weight=label_weight)
        if n_views > 1:
            g = view_weight * PairGraph.from_views(idx.numel(), n_views, device=device) + g
        if negatives:
            g = g.with_negatives(self._negative_graph(idx, n_views, device))
        return g

    def _negative_graph(self, idx: torch.Tensor, n_views: int, device) -> PairGraph:
        """Rows of ``cat([view_0, ..., view_{V-1}])`` of the batch ``idx`` known to differ,
        as a symmetric PairGraph with weight 1 (see :meth:`graph`)."""
        roots = np.tile(self._dense_roots(idx.numpy()), n_views)  # −1: never recorded
        rows = np.flatnonzero(roots >= 0)
        batch_roots, code = np.unique(roots[rows], return_inverse=True)
        in_batch = {int(r): k for k, r in enumerate(batch_roots)}
        pairs = []
        for r, k in in_batch.items():
            cannot = self._cannot.get(r, ())
            # Walk the smaller side: never more than the batch's components.
            small, big = (cannot, in_batch) if len(cannot) < len(in_batch) else (in_batch, cannot)
            pairs += [(k, in_batch[r2]) for r2 in small if r < r2 and r2 in big]
        n_rows = idx.numel() * n_views
        if not pairs:
            return PairGraph.from_edges([], [], num_nodes=n_rows).to(device or "cpu")
        # Rows grouped by component: component k owns rows[order[start[k]:start[k] + count[k]]].
        order = np.argsort(code, kind="stable")
        count = np.bincount(code, minlength=batch_roots.size)
        start = np.concatenate([[0], np.cumsum(count)[:-1]])
        a, b = np.asarray(pairs, dtype=np.int64).T
        sizes = count[a] * count[b]  # one edge per (row of a, row of b)
        pair = np.repeat(np.arange(a.size), sizes)
        local = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        src = rows[order[start[a][pair] + local // count[b][pair]]]
        dst = rows[order[start[b][pair] + local % count[b][pair]]]
        return PairGraph.from_edges(torch.from_numpy(src), torch.from_numpy(dst), num_nodes=n_rows).to(device or "cpu")
