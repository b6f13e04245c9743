"""Which pairs to ask the oracle next (docs/active.md).

``select_queries(embeddings, store, budget, strategy)`` returns at most ``budget``
pairs of sample ids ``[Q, 2]`` (``i < j``). Every strategy obeys the same rules:

* never a pair the store knows, directly or by implication (same component, or
  components linked by a cannot-link);
* no duplicates, and more: no two selected pairs join the same two components
  (once one is answered the other is implied), so every query is informative;
* Q = budget unless fewer unknown component pairs exist among the rows.

Strategies (row r of ``embeddings`` is sample ``ids[r]``; similarities are cosine):

``"random"``
    Passive baseline: pairs of distinct rows drawn uniformly at random, rejected
    when known or already taken (the unknown pairs are enumerated when rejection
    sampling stalls on small pools).
``"nearest"``
    The most similar unknown pairs first: :func:`candidate_pairs` with k nearest
    neighbours (k doubled until the budget is filled or k = N − 1).
``"uncertain"``
    Pairs nearest the decision boundary "alike iff similarity ≥ t": t is the
    threshold that best separates the answered pairs among the rows (fewest
    misclassified answers; midpoint of the gap), or the median candidate
    similarity while no positive and negative answers both exist. Candidates are
    the 3k-nearest-neighbour pairs, ordered by |similarity − t|.
``"pal"``
    The PAL rule (Cabannes et al., ICCV 2023): grow the known classes with samples
    predicted to belong to them. A *class* is a component of ≥ 2 rows (it has a
    known positive). Repeatedly take the least-queried class C (fewest logged
    answers touching C, counting the queries already selected in this call; ties:
    the smaller class) and ask one question about its next candidate:

    * a row predicted to be in C (its most similar known member is in C: 1-NN over
      the known classes), in random order, then the other free rows, most similar
      to C first; each row at most once per call;
    * or another class C' whose members are mostly predicted to be in C (majority
      of their 1-NN votes over the classes other than C'): a merge question, which
      links |C|·|C'| pairs at once.

    The row and the merge compete on the expected number of samples joined to C:
    P(alike | similarity) for the row, an isotonic (non-decreasing) fit of the
    answers so far against the current similarities (1 before any answer), and
    vote share · |C'| for the merge. The pair asked is the two closest members of
    the two sides (the easiest question for a person). Random order inside the
    predicted class rather than nearest first: the nearest samples are answered
    "alike" but teach the encoder little, they are already next to their class
    (see docs/active.md for the measurement). A share ``explore`` of the budget
    (all of it while no class exists) seeds new classes: the row least similar to
    every known member and seed so far (farthest-point), paired with its nearest
    neighbour. Budget left when every row has been used goes to the most similar
    unknown pairs.

Example::

    >>> import torch
    >>> from palfast.active import RelationStore, select_queries
    >>> x = torch.randn(100, 8, generator=torch.Generator().manual_seed(0))
    >>> store = RelationStore()
    >>> q = select_queries(x, store, budget=5, strategy="pal", seed=0)
    >>> q.shape
    torch.Size([5, 2])
"""

from __future__ import annotations

import heapq
import math

import torch
import torch.nn.functional as F

from .._checks import check_choice, check_int, check_number, check_tensor
from ..knn import resolve_backend
from .candidates import candidate_pairs, check_ids
from .store import RelationStore

__all__ = ["STRATEGIES", "select_queries"]

STRATEGIES = ("pal", "nearest", "uncertain", "random")
_OP = "palfast.active.select_queries"


class _Selection:
    """Pairs chosen so far, deduplicated at the level of component pairs."""

    def __init__(self, store: RelationStore, ids: torch.Tensor):
        self.store = store
        self.ids = ids
        self.roots = store.roots(ids)  # [N] root of each row
        self.taken: set[tuple[int, int]] = set()
        self.pairs: list[tuple[int, int]] = []

    def key(self, a: int, b: int) -> tuple[int, int]:
        ra, rb = int(self.roots[a]), int(self.roots[b])
        return (ra, rb) if ra < rb else (rb, ra)

    def try_add(self, a: int, b: int) -> bool:
        """Add the pair of rows (a, b) unless it joins an already joined component pair.
        The caller has checked that the store does not know it."""
        key = self.key(a, b)
        if key[0] == key[1] or key in self.taken:
            return False
        self.taken.add(key)
        i, j = int(self.ids[a]), int(self.ids[b])
        self.pairs.append((i, j) if i < j else (j, i))
        return True

    def add_ranked(self, rows_a, rows_b, budget: int) -> None:
        for a, b in zip(rows_a.tolist(), rows_b.tolist()):
            if len(self.pairs) >= budget:
                return
            self.try_add(a, b)

    def result(self) -> torch.Tensor:
        return torch.tensor(self.pairs, dtype=torch.long).reshape(-1, 2)


def select_queries(embeddings: torch.Tensor, store: RelationStore, budget: int,
                   strategy: str = "pal", *, k: int = 10, generator: torch.Generator | None = None,
                   seed: int | None = None, ids=None, backend: str = "auto",
                   explore: float = 0.1) -> torch.Tensor:
    """Choose up to ``budget`` unknown pairs to ask the oracle.

    Args:
        embeddings: ``[N, D]`` floating point, row r = sample ``ids[r]``, N ≥ 2.
        store: the :class:`RelationStore` of answers so far.
        budget: number of pairs wanted (int ≥ 0).
        strategy: ``"pal"`` | ``"nearest"`` | ``"uncertain"`` | ``"random"`` (module docstring).
        k: nearest neighbours per row for the candidate pairs (clamped to N − 1).
        generator / seed: randomness of ``"random"`` and of ``"pal"``'s first seed;
            default ``seed=0`` (reproducible).
        ids: ``[N]`` distinct sample ids of the rows (default ``arange(N)``).
        backend: k-NN backend of :func:`candidate_pairs`.
        explore: ``"pal"`` only, share of the budget spent seeding new classes.

    Returns:
        LongTensor ``[Q, 2]`` sample ids, ``Q ≤ budget``, each row ``i < j``, on CPU.
    """
    x = check_tensor(_OP, "embeddings", embeddings, min_rows=2, finite=True)
    n = x.shape[0]
    if not isinstance(store, RelationStore):
        raise TypeError(f"{_OP}: store must be a palfast.active.RelationStore, "
                        f"got {type(store).__name__}")
    budget = check_int(_OP, "budget", budget, 0)
    check_choice(_OP, "strategy", strategy, STRATEGIES)
    k = check_int(_OP, "k", k, 1)
    explore = check_number(_OP, "explore", explore, 0.0, maximum=1.0)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{_OP}: generator must be a torch.Generator, got {type(generator).__name__}")
    backend = resolve_backend(_OP, backend)
    row_ids = check_ids(_OP, ids, n)
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    k = min(k, n - 1)
    sel = _Selection(store, row_ids)
    if budget == 0:
        return sel.result()
    x = x.detach().float().cpu()
    if strategy == "random":
        _random(sel, n, budget, generator)
    elif strategy == "nearest":
        _nearest(sel, x, budget, k, backend)
    elif strategy == "uncertain":
        _uncertain(sel, x, budget, k, backend)
    else:
        _pal(sel, x, budget, k, explore, generator)
        if len(sel.pairs) < budget:  # every row already used once: most similar pairs left
            _nearest(sel, x, budget, k, backend)
    return sel.result()


# ---------------------------------------------------------------- strategies
def _random(sel: _Selection, n: int, budget: int, gen: torch.Generator) -> None:
    for _ in range(64):  # rejection sampling: cheap while unknown pairs are plentiful
        need = budget - len(sel.pairs)
        if need <= 0:
            return
        m = 4 * need + 16
        a = torch.randint(0, n, (m,), generator=gen)
        b = torch.randint(0, n - 1, (m,), generator=gen)
        b += (b >= a).long()  # uniform over rows b != a
        unknown = ~sel.store.known_mask(torch.stack([sel.ids[a], sel.ids[b]], 1))
        sel.add_ranked(a[unknown], b[unknown], budget)
    if len(sel.pairs) < budget and n * (n - 1) // 2 <= 4_000_000:
        # Few unknown pairs left: enumerate them all and take a random order.
        a, b = torch.triu_indices(n, n, 1)
        unknown = ~sel.store.known_mask(torch.stack([sel.ids[a], sel.ids[b]], 1))
        a, b = a[unknown], b[unknown]
        perm = torch.randperm(a.numel(), generator=gen)
        sel.add_ranked(a[perm], b[perm], budget)


def _rows_of(sel: _Selection, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample-id pairs from candidate_pairs back to row indices."""
    order = torch.argsort(sel.ids)
    sorted_ids = sel.ids[order].contiguous()
    pos_a = torch.searchsorted(sorted_ids, pairs[:, 0].contiguous())
    pos_b = torch.searchsorted(sorted_ids, pairs[:, 1].contiguous())
    return order[pos_a], order[pos_b]


def _nearest(sel: _Selection, x: torch.Tensor, budget: int, k: int, backend: str) -> None:
    """Add the most similar unknown pairs (k doubled until the budget is met)."""
    n = x.shape[0]
    while True:
        pairs, _ = candidate_pairs(x, k, store=sel.store, backend=backend, ids=sel.ids)
        sel.add_ranked(*_rows_of(sel, pairs), budget)  # repeats of earlier picks are skipped
        if len(sel.pairs) >= budget or k >= n - 1:
            return
        k = min(2 * k, n - 1)


def _answered_rows(sel: _Selection, pairs: torch.Tensor, answers: torch.Tensor):
    """Logged answers whose two samples are both rows of this pool: (rows_a, rows_b, answers)."""
    if pairs.shape[0] == 0:
        e = torch.zeros(0, dtype=torch.long)
        return e, e, torch.zeros(0, dtype=torch.bool)
    size = int(max(int(pairs.max()), int(sel.ids.max()))) + 1
    lookup = torch.full((size,), -1, dtype=torch.long)
    lookup[sel.ids] = torch.arange(sel.ids.numel())
    ra, rb = lookup[pairs[:, 0]], lookup[pairs[:, 1]]
    ok = (ra >= 0) & (rb >= 0)
    return ra[ok], rb[ok], answers[ok]


def _threshold(sel: _Selection, xn: torch.Tensor, fallback: torch.Tensor) -> float:
    """Similarity threshold that best separates the answered pairs among the rows."""
    ra, rb, y = _answered_rows(sel, *sel.store.answers())
    if bool(y.any()) and bool((~y).any()):
        s = (xn[ra] * xn[rb]).sum(1)
        order = torch.argsort(s)
        s, y = s[order], y[order]
        # Cut before position c: predicted "different" below, "alike" from c on.
        # errors(c) = positives below c + negatives from c on.
        pos_below = torch.cat([torch.zeros(1), torch.cumsum(y.float(), 0)])
        neg_from = (~y).sum() - torch.cat([torch.zeros(1), torch.cumsum((~y).float(), 0)])
        c = int(torch.argmin(pos_below + neg_from))
        lo = s[c - 1] if c > 0 else s[0] - 1e-3
        hi = s[c] if c < s.numel() else s[-1] + 1e-3
        return float((lo + hi) / 2)
    return float(fallback.median()) if fallback.numel() else 0.0


def _uncertain(sel: _Selection, x: torch.Tensor, budget: int, k: int, backend: str) -> None:
    n = x.shape[0]
    xn = F.normalize(x, dim=1)
    k = min(3 * k, n - 1)
    while True:
        pairs, sims = candidate_pairs(x, k, store=sel.store, backend=backend, ids=sel.ids)
        t = _threshold(sel, xn, sims)
        order = torch.sort((sims - t).abs(), stable=True).indices
        sel.pairs.clear()
        sel.taken.clear()
        sel.add_ranked(*_rows_of(sel, pairs[order]), budget)
        if len(sel.pairs) >= budget or k >= n - 1:
            return
        k = min(2 * k, n - 1)


def _max_sim(xn: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """max over r in rows of <xn[r], xn[i]> for every i, a block of rows at a time."""
    out = torch.full((xn.shape[0],), float("-inf"))
    block = max(1, (1 << 22) // xn.shape[0])
    for start in range(0, rows.numel(), block):
        out = torch.maximum(out, (xn[rows[start:start + block]] @ xn.T).max(0).values)
    return out


def _isotonic(s: torch.Tensor, y: torch.Tensor):
    """P(alike | similarity) fitted to answered pairs: a non-decreasing step function
    (pool-adjacent-violators), flat beyond the data. No answers: P ≡ 1."""
    if s.numel() == 0:
        return lambda q: torch.ones_like(q)
    order = torch.argsort(s)
    xs, ys = s[order].tolist(), y[order].float().tolist()
    blocks: list[list[float]] = []  # [sum_y, count, max_x]
    for xv, yv in zip(xs, ys):
        blocks.append([yv, 1.0, xv])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            sy, cnt, mx = blocks.pop()
            blocks[-1][0] += sy
            blocks[-1][1] += cnt
            blocks[-1][2] = mx
    edges = torch.tensor([b[2] for b in blocks])
    means = torch.tensor([b[0] / b[1] for b in blocks])

    def predict(q: torch.Tensor) -> torch.Tensor:
        return means[torch.searchsorted(edges, q.contiguous()).clamp_max(len(blocks) - 1)]
    return predict


def _pal(sel: _Selection, x: torch.Tensor, budget: int, k: int, explore: float,
         gen: torch.Generator) -> None:
    n = x.shape[0]
    xn = F.normalize(x, dim=1)
    _, inv, counts = torch.unique(sel.roots, return_inverse=True, return_counts=True)
    class_of = torch.where(counts[inv] >= 2, inv, -1)  # [N] class index or −1
    cls = torch.unique(class_of[class_of >= 0])
    class_of = torch.searchsorted(cls, class_of.clamp_min(0)).where(class_of >= 0, -1)
    n_cls = cls.numel()
    members = [(class_of == c).nonzero().flatten() for c in range(n_cls)]
    in_class = class_of >= 0
    used = torch.zeros(n, dtype=torch.bool)  # rows already in a query of this call

    # Answers so far: queries spent on each class, and P(alike | similarity).
    log_pairs, log_answers = sel.store.answers()
    asked = torch.zeros(n_cls, dtype=torch.long)
    if log_pairs.shape[0] and n_cls:
        class_root = sel.roots[torch.stack([m[0] for m in members])]
        lr = sel.store.roots(log_pairs.reshape(-1)).reshape(-1, 2)
        asked += (lr[:, 0, None] == class_root).sum(0)
        asked += ((lr[:, 1, None] == class_root) & (lr[:, :1] != lr[:, 1:])).sum(0)
    ra, rb, y = _answered_rows(sel, log_pairs, log_answers)
    p_alike = _isotonic((xn[ra] * xn[rb]).sum(1), y)

    n_seed = budget if not n_cls else (min(budget, math.ceil(explore * budget)) if explore else 0)

    # ---- grow the classes, least-queried first. Candidates of class c: rows in no
    # class and the other classes, by single linkage (best similarity to a member of
    # c: the 1-NN prediction), the most similar first. The next row and the next class
    # compete on the expected number of samples joined to c: P(alike | sim) · size.
    n_grow = budget - n_seed
    heap = [(int(asked[c]), members[c].numel(), c) for c in range(n_cls)]
    heapq.heapify(heap)
    # link[c, i]: best similarity of row i to a member of class c; the predicted class
    # of a row is its most linked class (1-NN over the known members).
    link = (torch.stack([_max_sim(xn, m) for m in members]) if n_cls
            else xn.new_zeros(0, n))
    predicted = link.argmax(0) if n_cls else torch.zeros(n, dtype=torch.long)
    free = ~in_class
    # vote_share[o, c]: share of the members of class o whose most linked other class is c.
    vote_share = torch.zeros(n_cls, n_cls)
    if n_cls > 1:
        for o in range(n_cls):
            other = link[:, members[o]].clone()
            other[o] = float("-inf")
            vote_share[o] = torch.bincount(other.argmax(0), minlength=n_cls).float()
            vote_share[o] /= members[o].numel()
    ranks: list = [None] * n_cls
    row_cur = [0] * n_cls
    cls_cur = [0] * n_cls
    while heap and len(sel.pairs) < n_grow:
        q, size, c = heapq.heappop(heap)
        if ranks[c] is None:
            # Rows predicted to be in c, in random order (diverse samples of the class,
            # not only the ones the embedding already puts next to a member), then the
            # other free rows, most linked first.
            mine = (free & (predicted == c)).nonzero().flatten()
            mine = mine[torch.randperm(mine.numel(), generator=gen)]
            rest = (free & (predicted != c)).nonzero().flatten()
            rest = rest[torch.sort(-link[c, rest], stable=True).indices]
            rows = torch.cat([mine, rest])
            # Another class o is a merge candidate when the majority of its members are
            # predicted to be in c (1-NN over the classes other than o); the vote share
            # estimates P(o and c are one class).
            others = (vote_share[:, c] >= 0.5).nonzero().flatten()
            others = others[others != c]
            others = others[torch.sort(-vote_share[others, c], stable=True).indices]
            ranks[c] = (rows, p_alike(link[c, rows]), others,
                        vote_share[others, c]
                        * torch.tensor([members[o].numel() for o in others], dtype=torch.float))
        rows, row_gain, others, cls_gain = ranks[c]
        asked_one = False
        while not asked_one:
            while row_cur[c] < rows.numel() and bool(used[rows[row_cur[c]]]):
                row_cur[c] += 1
            has_row, has_cls = row_cur[c] < rows.numel(), cls_cur[c] < others.numel()
            if not (has_row or has_cls):
                break
            merge = has_cls and (not has_row or cls_gain[cls_cur[c]] >= row_gain[row_cur[c]])
            if merge:
                b_rows = members[int(others[cls_cur[c]])]
                cls_cur[c] += 1
            else:
                b_rows = rows[row_cur[c]: row_cur[c] + 1]
                row_cur[c] += 1
            # Ask with the closest members of the two sides (the easiest question).
            s = xn[members[c]] @ xn[b_rows].T
            best = int(torch.argmax(s))
            a, b = int(members[c][best // b_rows.numel()]), int(b_rows[best % b_rows.numel()])
            if bool(sel.store.known_mask(sel.ids[[a, b]][None])[0]) or not sel.try_add(a, b):
                continue
            if not merge:
                used[b] = True
            asked_one = True
        if asked_one:
            heapq.heappush(heap, (q + 1, size, c))

    # ---- seed new classes far from everything known (and fill what growth could not):
    # the row least similar to every class member and seed so far, with its nearest
    # neighbour (most likely alike).
    maxsim = _max_sim(xn, in_class.nonzero().flatten()) if n_cls else torch.full((n,), -2.0)
    first = True
    while len(sel.pairs) < budget:
        eligible = ~(in_class | used)
        if not bool(eligible.any()):
            break
        if first and not n_cls:
            # Nothing known yet: a random first seed.
            cand = eligible.nonzero().flatten()
            x_row = int(cand[torch.randint(0, cand.numel(), (1,), generator=gen)])
        else:
            score = torch.where(eligible, maxsim, torch.tensor(float("inf")))
            x_row = int(torch.argmin(score))
        first = False
        used[x_row] = True
        sims = xn @ xn[x_row]
        maxsim = torch.maximum(maxsim, sims)
        sims[used] = float("-inf")
        order = torch.sort(-sims, stable=True).indices[: n - int(used.sum())]
        for start in range(0, order.numel(), 64):
            chunk = order[start:start + 64]
            anchor = torch.full_like(chunk, x_row)
            unknown = ~sel.store.known_mask(torch.stack([sel.ids[anchor], sel.ids[chunk]], 1))
            hit = next((b for b in chunk[unknown].tolist() if sel.try_add(x_row, b)), None)
            if hit is not None:
                used[hit] = True
                maxsim = torch.maximum(maxsim, xn @ xn[hit])
                break
