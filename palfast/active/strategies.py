"""Which pairs to ask the oracle next (docs/active.md).

``select_queries(embeddings, store, budget, strategy)`` returns at most ``budget``
pairs of sample ids ``[Q, 2]`` (``i < j``). Every strategy but ``"passive"`` obeys
the same rules:

* never a pair the store knows, directly or by implication (same component, or
  components linked by a cannot-link);
* no duplicates, and more: no two selected pairs join the same two components
  (once one is answered the other is implied), so every query is informative;
* Q = budget unless fewer unknown component pairs exist among the rows.

The one exception is ``reask`` (a share of the budget, default 0): it first asks again
answers that a second answer could overturn (:meth:`RelationStore.reask_candidates`;
docs/active.md, "Answers from people who make mistakes"). Under policy ``"confirm"``
these are the pending merges (the same pair as their earliest waiting answer, asked
again: the question whose answer is in doubt, and with an oracle whose mistakes are
independent, a fresh draw), under ``"majority"`` the pairs whose "alike" joined two
components by one vote, a single sample joined to a class too, and the tied pairs (no
answer applied) the store does not know. They are asked in the order of
:func:`reask_order`: the contested ones first (a tie, which one more answer settles),
then the joins of two components of two samples or more, most consequential
first (|C_i|·|C_j|, the sample pairs the answer joins), then the single-sample joins,
least similar in ``embeddings`` first (the most suspicious "alike"). Only pairs whose
two samples are rows (``ids``) are re-asked, each at most once per call, and at most
``int(reask · budget)`` of them; they come first in the returned pairs, and the
strategy fills the rest of the budget (the rules above hold among its pairs, and it asks
no pair across the two components of a re-asked pending merge, nor across those of a
re-asked tie). A re-asked one-vote join is a pair the store knows under ``"majority"``:
the deliberate exception to "never a known pair". A tied pair is unknown, so the
strategy may ask it too when the re-asks do not (it is then no exception).

Strategies (row r of ``embeddings`` is sample ``ids[r]``; similarities are cosine):

``"passive"``
    The passive baseline of the PAL paper: pairs of distinct rows drawn uniformly
    at random; only a pair already asked (or drawn twice) is rejected, so pairs
    the answers already imply are asked again and cost a query. (With
    ``ActiveLearner`` the loss then sees only the answered pairs, no transitive
    closure.) Q = budget unless fewer unasked pairs exist.
``"random"``
    Random pairs that use transitivity: drawn uniformly, rejected when known or
    implied or joining two components already joined by this call (the unknown
    pairs are enumerated when rejection sampling stalls on small pools). Stronger
    than ``"passive"``: no query is wasted on an implied answer.
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
    Inspired by the PAL paper's rule (Cabannes et al., ICCV 2023: grow the known
    classes with samples predicted to belong to them), with merge questions,
    seeds and a gain order the paper does not have. A *class* is a component of
    ≥ 2 rows (it has a known positive). Repeatedly take the least-queried class C
    (fewest logged answers touching C, counting the queries already selected in
    this call; ties: the smaller class) and ask one question about its next
    candidate, a row or a merge:

    * rows: those predicted to be in C (their most similar known member is in C:
      1-NN over the known classes), then the other free rows, most similar to C
      first; each row at most once per call. The gain of a row is P(alike | its
      similarity to C), an isotonic (non-decreasing) fit of the answers so far
      against the current similarities (1 before any answer): a "yes" joins one
      sample to C;
    * merges: another class C' whose members are predicted to be in C more often
      than in any other class (C has the most of their 1-NN votes over the classes
      other than C' and those known to differ from C'); a "yes" joins |C'| samples
      (|C|·|C'| pairs) at once. The vote share estimates P(C' and C are one class).
      Why a plurality that skips the known-different classes: the rule before, a
      majority of the votes counting every class, starved the merges where a class is
      known as several fragments (rings: 26–29 fragments of 3 classes at 300 queries).
      A fragment along a ring has neighbours on two sides, so its votes split and
      neither side had a majority; and once asked about its nearest class and answered
      "different" it kept voting for it and was never offered again. Measured on the
      strategy suite (3 seeds, 24 task × noise cells; docs/active.md, "Why ``pal``
      loses on rings"): mean AUC gain over random +0.67 against +0.63 points, rings
      −1.2/−1.2/−1.9 against −2.4/−1.8/−2.5 at 0/5/10 % noise.

    ``order="random"`` (default) takes the predicted rows in random order (diverse
    samples of the class, not only the ones next to a member) and gives a merge the
    gain vote share · |C'|. ``order="gain"`` ranks the predicted rows by gain, ties
    (a flat step of the isotonic fit) in random order, and gives a merge the gain
    min(P(alike | similarity of the two closest members), vote share) · |C'|, so a
    likely merge beats any single row. Either way the next row and the next merge
    of C compete on gain. Why random is the default: :data:`DEFAULT_ORDER`. The pair
    asked is the two closest members of the two sides (the easiest question for a
    person).

    ``mix="guided"`` (default) spends the whole growth budget (the budget less the
    seeds; re-asks count as part of it) on these class-guided questions. ``mix="adaptive"`` spends only the share
    max(0, 2·AUC − 1) of it on them and the rest on random pairs as ``"random"`` draws
    them: AUC is the ranking AUC (Mann-Whitney) of the similarity each question of the
    previous call had *when it was asked* against its answer, i.e. how well similarity
    predicted "alike" on pairs the encoder had not yet been trained on (2·AUC − 1 is 0
    for a coin flip, 1 for a perfect ranking). The share is kept from call to call in
    ``state`` while a call's questions lack an "alike" or a "different" answer, and is
    1 at first. The suite measures it as ``pal-adaptive`` (docs/active.md, "Choosing a
    strategy").

    Seeds explore: the row least similar to every known member and seed so far
    (farthest-point), paired with its nearest neighbour. All of the budget seeds
    while no class exists; then ``explore · budget`` per call is added to a credit
    carried in ``state`` from call to call and its whole part is spent (no rounding
    up per call). A seed *finds a class* when answered "alike" with both rows
    outside every class; after :data:`STABLE_SEEDS` seeds in a row found none the
    number of classes is taken as stable and exploring stops. Budget left when
    every row has been used goes to more seeds, then to the most similar unknown
    pairs.

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

import torch
import torch.nn.functional as F

from .._checks import check_choice, check_instance, check_int, check_number
from ..knn import as_rows, check_index_params, knn, resolve_backend, resolve_index, row_spans
from .candidates import check_ids, pairs_from_knn
from .policy import ReaskCandidates, check_reask, check_reask_store
from .store import RelationStore

__all__ = [
    "DEFAULT_ORDER",
    "GRAPH_STRATEGIES",
    "MIXES",
    "ORDERS",
    "STABLE_SEEDS",
    "STRATEGIES",
    "UNCERTAIN_K_FACTOR",
    "reask_order",
    "CandidateGraph",
    "select_queries",
    "select_reasks",
]

STRATEGIES = ("pal", "nearest", "uncertain", "random", "passive")
#: The strategies that search the k-NN graph (:class:`CandidateGraph`); ``"random"`` and
#: ``"passive"`` never read the embeddings' values.
GRAPH_STRATEGIES = ("pal", "nearest", "uncertain")
#: ``"uncertain"`` takes its candidates from the k-NN graph with this many times k
#: neighbours: the pairs near the threshold are rarer than the most similar ones.
UNCERTAIN_K_FACTOR = 3
#: ``"pal"``'s order of the candidates inside a class (module docstring), the default first.
ORDERS = ("random", "gain")
#: ``"random"``: measured against ``"gain"`` on the strategy suite (5 seeds, 24 task × noise
#: cells: mean AUC gain over random +0.80 against +0.64 points, and it loses least on
#: rings, where "next to a known member" is not yet "same class") and on ``palfast demo``
#: (5 seeds: AUC +0.40 against +0.29 points over random); docs/active.md, "Choosing a
#: strategy".
DEFAULT_ORDER = ORDERS[0]
#: ``"pal"``'s split of its growth budget between class-guided and random pairs (module
#: docstring): ``"guided"`` all class-guided; ``"adaptive"`` by how well similarity
#: predicted the answers to its previous call's questions.
MIXES = ("guided", "adaptive")
_OP = "palfast.active.select_queries"
#: torch.Generator.manual_seed takes an unsigned 64-bit seed.
_MAX_SEED = 2**64 - 1
#: ``"pal"`` stops exploring after this many seeds in a row found no new class: three
#: misses in a row, not one, because a single seed can land in a known class by chance
#: while others are still undiscovered.
STABLE_SEEDS = 3
#: The key under which :class:`ActiveLearner` and ``palfast annotate`` keep ``"pal"``'s
#: ``state`` in their RelationStore (:meth:`RelationStore.save_state`), so that a run
#: resumed from the store continues its exploration where it stopped.
PAL_STATE_KEY = "pal"
#: Float sums and products (0.1 added ten times is 0.999…) still make whole counts:
#: the seeds of explore·budget, the re-asks of reask·budget.
_CREDIT_SLACK = 1e-9


def reask_count(reask: float, budget: int) -> int:
    """The re-asks a share ``reask`` of ``budget`` questions allows: ``int(reask ·
    budget)``, with a float product such as 0.3 · 10 = 2.9999… still making 3."""
    return int(reask * budget + _CREDIT_SLACK)


class _Selection:
    """Pairs chosen so far, deduplicated at the level of component pairs."""

    def __init__(self, store: RelationStore, ids: torch.Tensor):
        self.store = store
        self.ids = ids
        self.roots = store.roots(ids)  # [N] root of each row
        self.taken: set[tuple[int, int]] = set()
        self.pairs: list[tuple[int, int]] = []
        self.kept: tuple[int, frozenset] = (0, frozenset())  # the re-asks (_reask), kept by reset

    def reset(self) -> None:
        """Forget the pairs chosen after the re-asks."""
        n, taken = self.kept
        del self.pairs[n:]
        self.taken = set(taken)

    def key(self, a: int, b: int) -> tuple[int, int]:
        ra, rb = int(self.roots[a]), int(self.roots[b])
        return (ra, rb) if ra < rb else (rb, ra)

    def known(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Whether the store knows each pair of rows (a[q], b[q]): BoolTensor [Q]."""
        return self.store.known_mask(torch.stack([self.ids[a], self.ids[b]], 1))

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


def select_queries(
    embeddings,
    store: RelationStore,
    budget: int,
    strategy: str = "pal",
    *,
    k: int = 10,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    ids=None,
    backend: str = "auto",
    explore: float = 0.1,
    order: str = DEFAULT_ORDER,
    mix: str = "guided",
    state: dict | None = None,
    index: str = "auto",
    nlist: int | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
    graph: CandidateGraph | None = None,
    reask: float = 0.0,
) -> torch.Tensor:
    """Choose up to ``budget`` unknown pairs to ask the oracle.

    Args:
        embeddings: ``[N, D]`` floating point, row r = sample ``ids[r]``, N ≥ 2: a
            tensor, or a NumPy array, memory-mapped or not (``np.load(path,
            mmap_mode="r")``, ``np.memmap``; a ``torch.from_file`` tensor too). Read in
            chunks (:func:`palfast.knn.as_rows`): the search holds its index, the
            strategies read the rows they need, never a copy of the whole array (but
            ``"pal"`` on a small pool, below :data:`PAL_EXACT_WORK`).
        store: the :class:`RelationStore` of answers so far.
        budget: number of pairs wanted (int ≥ 0).
        strategy: ``"pal"`` | ``"nearest"`` | ``"uncertain"`` | ``"random"`` | ``"passive"``
            (module docstring).
        k: nearest neighbours per row for the candidate pairs (clamped to N − 1).
        generator / seed: randomness of ``"random"``, ``"passive"`` and ``"pal"``;
            default ``seed=0`` (reproducible).
        ids: ``[N]`` distinct sample ids of the rows (default ``arange(N)``).
        backend: k-NN backend of :func:`candidate_pairs`.
        index / nlist / nprobe / ef_search: its k-NN index (:func:`candidate_pairs`;
            default ``"auto"``: exact up to :data:`palfast.knn.AUTO_EXACT_MAX_ROWS` rows).
            One k-NN graph is searched per call and shared by every step.
        graph: a :class:`CandidateGraph` built on these same embeddings (the same array,
            not a copy), to reuse its k-NN graph instead of searching one in this call;
            ``backend``, ``index``, ``nlist``, ``nprobe`` and ``ef_search`` are then the
            graph's and must be left at their defaults here. The embeddings were checked
            for NaN/Inf when the graph was built and are not scanned again. Default None:
            a graph of this call only.
        explore: ``"pal"`` only, share of the budget spent seeding new classes (a
            fraction carried from call to call through ``state``).
        order: ``"pal"`` only, how a class's candidates are ranked: ``"random"``
            (default) or ``"gain"`` (expected samples joined, merges first; module
            docstring).
        mix: ``"pal"`` only, ``"guided"`` (every growth question class-guided) or
            ``"adaptive"`` (a share of them random pairs, by how well similarity
            predicted the previous call's answers; module docstring).
        state: ``"pal"`` only, a dict it reads and updates so that consecutive calls
            add up: ``explore_credit`` (the fraction of a seed not yet spent),
            ``n_seeds`` (seeds asked so far), ``exploring`` (False once the number of
            classes is stable), ``misses`` and ``pending`` (seeds not yet judged, as
            lists ``[i, j, partner_free]``); with ``mix="adaptive"`` also ``asked``
            (this call's questions, ``[i, j, similarity]``) and ``guided_share``. Pass the same dict to every call
            (:class:`ActiveLearner` does); None = a fresh one each call. It holds JSON
            types only, so :meth:`RelationStore.save_state` can keep it across runs.
        reask: share in [0, 1] of the budget spent first on asking again the answers a
            second one could overturn, in the order of :func:`reask_order` (module docstring);
            default 0. Above 0 the store must be writable and opened with policy
            ``"confirm"`` or ``"majority"`` (ValueError otherwise: under ``"first"`` a
            repeated answer changes nothing).

    Returns:
        LongTensor ``[Q, 2]`` sample ids, ``Q ≤ budget``, each row ``i < j``, on CPU;
        the re-asked pairs first.
    """
    if graph is not None:
        check_instance(_OP, "graph", graph, CandidateGraph, "a palfast.active.CandidateGraph or None")
        given = [
            name
            for name, value, default in (
                ("backend", backend, "auto"),
                ("index", index, "auto"),
                ("nlist", nlist, None),
                ("nprobe", nprobe, None),
                ("ef_search", ef_search, None),
            )
            if value != default
        ]
        if given:
            raise ValueError(
                f"{_OP}: {', '.join(given)} must be left at the default when graph is "
                f"given (the graph's were fixed when it was built); pass them to "
                f"CandidateGraph instead"
            )
    # With a graph the embeddings were scanned for NaN/Inf when it was built.
    x = as_rows(_OP, "embeddings", embeddings, min_rows=2, finite=graph is None)
    if graph is not None and not graph.built_on(x):
        raise ValueError(
            f"{_OP}: graph must be built on these embeddings (the same array: "
            f"shape, dtype and memory), got a graph of shape {tuple(graph.x.shape)} "
            f"for embeddings of shape {tuple(x.shape)}; build CandidateGraph(embeddings) "
            f"again whenever the embeddings change"
        )
    n = x.shape[0]
    check_instance(_OP, "store", store, RelationStore, "a palfast.active.RelationStore")
    budget = check_int(_OP, "budget", budget, 0)
    check_choice(_OP, "strategy", strategy, STRATEGIES)
    reask = check_reask(_OP, reask, store.policy, store.readonly)
    k = check_int(_OP, "k", k, 1)
    explore = check_number(_OP, "explore", explore, 0.0, maximum=1.0)
    order = check_choice(_OP, "order", order, ORDERS)
    mix = check_choice(_OP, "mix", mix, MIXES)
    if state is not None and not isinstance(state, dict):
        raise TypeError(
            f"{_OP}: state must be a dict (pass the same one to every call) or None, got {type(state).__name__}"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{_OP}: generator must be a torch.Generator, got {type(generator).__name__}")
    backend = resolve_backend(_OP, backend)
    row_ids = check_ids(_OP, ids, n)
    if generator is None:
        seed = 0 if seed is None else check_int(_OP, "seed", seed, 0, _MAX_SEED)
        generator = torch.Generator().manual_seed(seed)
    k = min(k, n - 1)
    if graph is None:  # one of this call only: its arguments are checked now, before any work
        graph = CandidateGraph._of_call(x, k, backend, index, nlist, nprobe, ef_search)
    sel = _Selection(store, row_ids)
    if budget == 0:
        return sel.result()
    # The unit rows, for the re-asks and the strategies that read similarities: one
    # wrapper (a CUDA x is copied to the CPU once), none for "random" and "passive".
    if reask or strategy not in ("random", "passive"):
        x = _UnitRows(x)
    if reask:
        _reask(sel, x, reask_count(reask, budget))
    if strategy == "random":
        _random(sel, n, budget, generator)
        return sel.result()
    if strategy == "passive":
        return torch.cat([sel.result(), _passive(store, row_ids, budget - len(sel.pairs), generator)])
    if strategy == "nearest":
        _nearest(sel, graph, budget, k)
    elif strategy == "uncertain":
        _uncertain(sel, x, graph, budget, k)
    else:
        _pal(sel, x, graph, budget, k, explore, generator, order, mix, {} if state is None else state)
        if len(sel.pairs) < budget:  # every row already used once: most similar pairs left
            _nearest(sel, graph, budget, k)
    return sel.result()


def select_reasks(embeddings, store: RelationStore, budget: int, *, ids=None) -> torch.Tensor:
    """Only the re-asks: up to ``budget`` pairs whose answers a second one could
    overturn, chosen and ordered as ``select_queries(..., reask=)`` chooses its re-asks
    (module docstring), and no new question. :class:`ActiveLearner` calls it after each
    round's new questions, so that the re-asks reach the answers just given.

    Args:
        embeddings: ``[N, D]``, row r = sample ``ids[r]`` (as :func:`select_queries`);
            they order the single-sample joins (least similar first).
        store: a :class:`RelationStore` opened writable with policy ``"confirm"`` or
            ``"majority"`` (ValueError otherwise, before any work).
        budget: the most pairs wanted (int ≥ 0).
        ids: ``[N]`` distinct sample ids of the rows (default ``arange(N)``).

    Returns:
        LongTensor ``[Q, 2]`` sample ids, ``Q ≤ budget``, each row ``i < j``, on CPU.
    """
    op = "palfast.active.select_reasks"
    x = as_rows(op, "embeddings", embeddings, min_rows=2, finite=True)
    check_instance(op, "store", store, RelationStore, "a palfast.active.RelationStore")
    budget = check_int(op, "budget", budget, 0)
    check_reask_store(op, "it asks", store.policy, store.readonly)
    sel = _Selection(store, check_ids(op, ids, x.shape[0]))
    _reask(sel, _UnitRows(x), budget)
    return sel.result()


class _UnitRows:
    """The rows of the embeddings at unit norm (float32, CPU), normalised as they are
    read: a memory-mapped pool is never copied whole. ``xn[rows]`` for a LongTensor or
    an int, :meth:`sims_to` for one row against all, :meth:`dense` for all of them."""

    def __init__(self, x: torch.Tensor):
        self.x = x.detach() if x.device.type == "cpu" else x.detach().cpu()
        self.shape = x.shape
        self._dense = None

    def __getitem__(self, rows):
        if isinstance(rows, int):
            return self[rows : rows + 1][0]
        if self._dense is not None:
            return self._dense[rows]
        return F.normalize(self.x[rows].float(), dim=1)

    def sims_to(self, row: int) -> torch.Tensor:
        """``[N]`` cosine similarities of every row to row ``row``."""
        v = self[row]
        if self._dense is not None:
            return self._dense @ v
        return torch.cat([self[a:b] @ v for a, b in row_spans(self.x)])

    def dense(self) -> torch.Tensor:
        """All rows, normalised once and kept (small pools only: :class:`_DenseLinks`)."""
        if self._dense is None:
            self._dense = self[:]
        return self._dense


class CandidateGraph:
    """The k-NN graph :func:`select_queries` draws its candidate pairs from, over fixed
    embeddings: build it once and pass it to every call (``graph=``) while the embeddings
    do not change, so the search runs once instead of once per call.

    ``CandidateGraph(embeddings, k=10, backend="auto", index="auto", nlist=None,
    nprobe=None, ef_search=None)`` checks the embeddings (finite, ``[N, D]``, N ≥ 2; the
    kinds :func:`select_queries` takes, a memory map too, which is not copied) and the
    index arguments (:func:`palfast.knn.check_index_params`) at once. The search runs
    the first time a strategy needs it (or :meth:`prepare`, :meth:`knn`), for the
    largest k asked so far (a smaller k is a prefix of its rows; a larger one searches
    again), and the graph is kept with the both-direction edge lists ``"pal"`` walks.
    What depends on the answers (the store) is never kept: every call recomputes it.

    Without ``graph=``, select_queries builds one per call. :class:`ActiveLearner`, whose
    embeddings change every round, builds one per round when a round makes more than one
    call (with ``reask``). ``palfast annotate`` builds one per
    embeddings file (docs/annotate.md, "Large pools").

    The graph holds the embeddings it was built on (a view, no copy) and the search
    result, ``[N, k]`` similarities and neighbours plus, once ``"pal"`` walks them, both
    directions of its edges: at most 36·N·k + 8·N bytes (12 per searched neighbour, 12 per
    edge, up to 2·N·k edges). Changing the embeddings in place after the search is not
    noticed: build a new graph.

    Args:
        embeddings: ``[N, D]`` floating point, as :func:`select_queries` takes them.
        k: neighbours per row the strategies ask for (select_queries' ``k``; ``"uncertain"``
            asks for 3k); an ``ef_search`` below it is refused.
        backend, index, nlist, nprobe, ef_search: the k-NN search (:func:`palfast.knn.knn`).

    Example::

        >>> import torch
        >>> from palfast.active import CandidateGraph, RelationStore, select_queries
        >>> x = torch.randn(100, 8, generator=torch.Generator().manual_seed(0))
        >>> graph = CandidateGraph(x)
        >>> store = RelationStore()
        >>> first = select_queries(x, store, 5, "nearest", graph=graph)
        >>> _ = store.record(first, torch.ones(5, dtype=torch.bool))
        >>> select_queries(x, store, 5, "nearest", graph=graph).shape  # no second search
        torch.Size([5, 2])
    """

    def __init__(
        self,
        embeddings,
        *,
        k: int = 10,
        backend: str = "auto",
        index: str = "auto",
        nlist: int | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ):
        op = "palfast.active.CandidateGraph"
        x = as_rows(op, "embeddings", embeddings, min_rows=2, finite=True)
        self._setup(op, x, check_int(op, "k", k, 1), backend, index, nlist, nprobe, ef_search)

    @classmethod
    def _of_call(cls, x: torch.Tensor, *args) -> CandidateGraph:
        """The graph of one select_queries call, on its checked rows ``x``; errors name
        select_queries."""
        graph = cls.__new__(cls)
        graph._setup(_OP, x, *args)
        return graph

    def _setup(self, op: str, x: torch.Tensor, k: int, backend, index, nlist, nprobe, ef_search):
        self.x = x
        n = x.shape[0]
        self.k = min(k, n - 1)
        self.backend = resolve_backend(op, backend)
        # Checked now, before any search (FAISS asserts abort the process).
        self.index = resolve_index(op, index, self.backend, n, self_search=True)
        self.nlist, self.nprobe, self.ef_search, _ = check_index_params(
            op, self.index, n, x.shape[1], self.k, nlist, nprobe, ef_search, None
        )
        self.sims = self.nbrs = None
        self._sym = None

    @property
    def n(self) -> int:
        """Rows of the embeddings."""
        return self.x.shape[0]

    def built_on(self, x: torch.Tensor) -> bool:
        """Whether ``x`` (a tensor from :func:`palfast.knn.as_rows`) is the array the graph
        was built on: the same memory, shape, strides, dtype and device."""
        return (
            x.shape == self.x.shape
            and x.dtype == self.x.dtype
            and x.device == self.x.device
            and x.stride() == self.x.stride()
            and x.data_ptr() == self.x.data_ptr()
        )

    def knn(self, k: int):
        """``(sims [N, k], nbrs [N, k])`` on the CPU: each row's k most similar other rows
        (:func:`palfast.knn.knn`; −inf / −1 where an approximate index found fewer),
        searched only when no search for k or more was done before."""
        k = min(k, self.n - 1)
        if self.nbrs is None or self.nbrs.shape[1] < k:
            sims, nbrs = knn(
                self.x,
                k,
                backend=self.backend,
                index=self.index,
                nlist=self.nlist,
                nprobe=self.nprobe,
                ef_search=None if self.index != "hnsw" else max(k, self.ef_search),
                op=_OP,
                finite=False,
            )
            self.sims, self.nbrs, self._sym = sims.cpu(), nbrs.cpu(), None
        return self.sims[:, :k], self.nbrs[:, :k]

    def prepare(self, strategy: str) -> CandidateGraph:
        """Search now what ``strategy``'s first call needs (``"nearest"``, ``"pal"``: k
        neighbours; ``"uncertain"``: :data:`UNCERTAIN_K_FACTOR` · k; ``"random"``,
        ``"passive"``: nothing), e.g. in a background thread before the first question.
        Returns the graph."""
        check_choice("palfast.active.CandidateGraph.prepare", "strategy", strategy, STRATEGIES)
        if strategy in GRAPH_STRATEGIES:
            self.knn(UNCERTAIN_K_FACTOR * self.k if strategy == "uncertain" else self.k)
        return self

    def pairs(self, k: int, sel: _Selection):
        """candidate_pairs(x, k, store, ids) from this graph."""
        return pairs_from_knn(*self.knn(k), sel.ids, sel.store)

    def symmetric(self, k: int):
        """Edges of the k-NN graph in both directions, grouped by source row (CSR):
        ``(ptr [N+1], dst [E], sim [E])``, each row's edges most similar first, E ≤ 2·N·k."""
        if self._sym is None or self._sym[0] != k:
            sims, nbrs = self.knn(k)
            n = nbrs.shape[0]
            src = torch.arange(n).repeat_interleave(nbrs.shape[1])
            dst, sim = nbrs.reshape(-1), sims.reshape(-1)
            ok = dst >= 0
            src, dst, sim = torch.cat([src[ok], dst[ok]]), torch.cat([dst[ok], src[ok]]), torch.cat([sim[ok], sim[ok]])
            key = src * n + dst  # one edge per (src, dst), the larger similarity
            key, inv = torch.unique(key, return_inverse=True)
            sim = torch.full((key.numel(),), float("-inf")).scatter_reduce(0, inv, sim, "amax")
            src, dst = key // n, key % n
            order = torch.sort(src * 4 - sim.double(), stable=True).indices  # by src, then sim desc
            src, dst, sim = src[order], dst[order], sim[order]
            ptr = torch.zeros(n + 1, dtype=torch.long)
            ptr[1:] = torch.cumsum(torch.bincount(src, minlength=n), 0)
            self._sym = (k, ptr, dst, sim)
        return self._sym[1:]


# ---------------------------------------------------------------- strategies
#: Rounds of rejection sampling before the random strategies enumerate every pair.
_REJECTION_ROUNDS = 64
#: Enumerate the pairs only up to this many (two int64 index vectors of 32 MB each).
_MAX_ENUMERATED_PAIRS = 4_000_000


def _random_row_pairs(n: int, missing, gen: torch.Generator):
    """Batches ``(a, b)`` of uniform random row pairs a ≠ b while ``missing() > 0``:
    rejection sampling first (cheap while wanted pairs are plentiful), then, when it
    stalls on a small pool, every pair a < b once in a random order."""
    for _ in range(_REJECTION_ROUNDS):
        need = missing()
        if need <= 0:
            return
        m = 4 * need + 16
        a = torch.randint(0, n, (m,), generator=gen)
        b = torch.randint(0, n - 1, (m,), generator=gen)
        yield a, b + (b >= a).long()  # uniform over rows b != a
    if missing() > 0 and n * (n - 1) // 2 <= _MAX_ENUMERATED_PAIRS:
        a, b = torch.triu_indices(n, n, 1)
        perm = torch.randperm(a.numel(), generator=gen)
        yield a[perm], b[perm]


def reask_order(candidates: ReaskCandidates, similarity: torch.Tensor) -> torch.Tensor:
    """The order in which :func:`select_queries` re-asks ``candidates``
    (:class:`~palfast.active.policy.ReaskCandidates`, P rows), given ``similarity`` [P],
    the cosine similarity of each pair's two samples in the current embeddings: the
    indices of the candidates, first asked first. The one place this order is defined:

    1. the ``contested`` candidates (under ``"majority"`` a tied pair: no answer
       applied, the next one settles it either way), most consequential first
       (|C_i|·|C_j|, largest first). A tie joins nothing, so it is no risk to the
       classes; it comes first because one question settles it for good, where a pair
       that has cost two questions gives nothing, and because ties are few (each needs
       a "different" against an "alike"): the two answers cancel, and the pair is as
       likely alike as the strategy's questions are, so leaving it keeps a sample (or a
       class) out of its class;
    2. the joins of two components of two samples or more each (every pending merge of
       ``"confirm"``), most consequential first: one wrong answer joins two classes;
    3. the other ``single`` joins (a sample joined to a class, or two samples joined),
       least similar first: an "alike" answer that the embedding, trained on it, still
       finds unlikely is the most suspicious.

    Ties keep the candidates' order (the policy's, the order it applied them). O(P log P).

        >>> from palfast.active.policy import ReaskCandidates
        >>> c = ReaskCandidates.of([(0, 1, 3, True, False), (2, 3, 4, False, False),
        ...                         (4, 5, 2, True, False), (6, 7, 9, False, False),
        ...                         (8, 9, 5, True, True)])
        >>> reask_order(c, torch.tensor([0.2, 0.9, -0.1, 0.8, 0.7])).tolist()
        [4, 3, 1, 2, 0]
    """
    by_similarity = candidates.single & ~candidates.contested
    value = torch.where(by_similarity, similarity.double(), -candidates.consequence.double())
    tier = torch.where(candidates.contested, 0, torch.where(candidates.single, 2, 1))
    order = torch.sort(value, stable=True).indices
    return order[torch.sort(tier[order], stable=True).indices]


def _reask(sel: _Selection, xn: _UnitRows, n_reask: int) -> None:
    """Start the selection with up to ``n_reask`` re-asks (module docstring): the store's
    candidates among the rows in :func:`reask_order`, each pair and each pending merge
    once. O(P log P + N log P + P·D) for P candidates of D dimensions."""
    if n_reask == 0:
        return
    candidates = sel.store.reask_candidates()
    pairs = candidates.pairs
    if pairs.shape[0] == 0:
        return
    # The row of each candidate's samples (−1: not a row): the rows' ids looked up among
    # the candidates' sorted ids, never a table sized by the largest id.
    values, where = torch.unique(pairs.reshape(-1), return_inverse=True)
    pos = torch.searchsorted(values, sel.ids).clamp_max(values.numel() - 1)
    hit = values[pos] == sel.ids
    row_of = torch.full((values.numel(),), -1, dtype=torch.long)
    row_of[pos[hit]] = hit.nonzero().flatten()
    rows = row_of[where].reshape(-1, 2)
    among = (rows >= 0).all(1)
    candidates = ReaskCandidates(*(t[among] for t in candidates))
    rows = rows[among]
    similarity = (xn[rows[:, 0]] * xn[rows[:, 1]]).sum(1)
    asked: set[tuple[int, int]] = set()
    for a, b in rows[reask_order(candidates, similarity)].tolist():
        if len(sel.pairs) >= n_reask:
            break
        i, j = sorted((int(sel.ids[a]), int(sel.ids[b])))
        key = sel.key(a, b)
        if (i, j) in asked or (key[0] != key[1] and not sel.try_add(a, b)):
            continue  # asked already in this call, or another pair of the same pending merge
        if key[0] == key[1]:  # "majority": a pair inside one class, a vote more
            sel.pairs.append((i, j))
        asked.add((i, j))
    sel.kept = (len(sel.pairs), frozenset(sel.taken))


def _random(sel: _Selection, n: int, budget: int, gen: torch.Generator) -> None:
    for a, b in _random_row_pairs(n, lambda: budget - len(sel.pairs), gen):
        unknown = ~sel.known(a, b)
        sel.add_ranked(a[unknown], b[unknown], budget)


def _passive(store: RelationStore, ids: torch.Tensor, budget: int, gen: torch.Generator) -> torch.Tensor:
    """The paper's passive baseline: uniform random pairs of distinct rows, only the
    pairs already asked (or drawn twice) rejected; implied pairs are asked."""
    asked_pairs, _ = store.answers()
    seen = {(int(i), int(j)) for i, j in asked_pairs.tolist()}
    seen |= {(j, i) for i, j in seen}
    out: list[tuple[int, int]] = []
    for a, b in _random_row_pairs(ids.numel(), lambda: budget - len(out), gen):
        for i, j in zip(ids[a].tolist(), ids[b].tolist()):
            if len(out) >= budget:
                break
            if (i, j) not in seen:
                seen.update(((i, j), (j, i)))
                out.append((min(i, j), max(i, j)))
    return torch.tensor(out, dtype=torch.long).reshape(-1, 2)


def _rows_of(sel: _Selection, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample-id pairs from candidate_pairs back to row indices."""
    order = torch.argsort(sel.ids)
    sorted_ids = sel.ids[order].contiguous()
    pos_a = torch.searchsorted(sorted_ids, pairs[:, 0].contiguous())
    pos_b = torch.searchsorted(sorted_ids, pairs[:, 1].contiguous())
    return order[pos_a], order[pos_b]


def _nearest(sel: _Selection, graph: CandidateGraph, budget: int, k: int) -> None:
    """Add the most similar unknown pairs (k doubled until the budget is met)."""
    n = sel.ids.numel()
    while True:
        pairs, _ = graph.pairs(k, sel)
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


def _threshold(sel: _Selection, xn: _UnitRows, fallback: torch.Tensor) -> float:
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


def _uncertain(sel: _Selection, xn: _UnitRows, graph: CandidateGraph, budget: int, k: int) -> None:
    n = xn.shape[0]
    k = min(UNCERTAIN_K_FACTOR * k, n - 1)
    while True:
        pairs, sims = graph.pairs(k, sel)
        t = _threshold(sel, xn, sims)
        order = torch.sort((sims - t).abs(), stable=True).indices
        sel.reset()
        sel.add_ranked(*_rows_of(sel, pairs[order]), budget)
        if len(sel.pairs) >= budget or k >= n - 1:
            return
        k = min(2 * k, n - 1)


#: Similarities _class_links computes at once (16 MB of float32).
_SIM_BLOCK = 1 << 22


def _class_links(xn: torch.Tensor, rows: torch.Tensor, cls: torch.Tensor, n_cls: int) -> torch.Tensor:
    """``link [n_cls, N]``: link[c, i] = max over the member rows r of class c
    (``cls[k]`` is the class of ``rows[k]``) of <xn[r], xn[i]>; one matrix product and
    one segmented max per block of members, whatever the number of classes."""
    link = torch.full((n_cls, xn.shape[0]), float("-inf"))
    block = max(1, _SIM_BLOCK // xn.shape[0])
    for start in range(0, rows.numel(), block):
        sims = xn[rows[start : start + block]] @ xn.T
        link.scatter_reduce_(0, cls[start : start + block, None].expand_as(sims), sims, "amax")
    return link


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


#: ``"pal"`` computes its similarities exactly (every row against every known member,
#: every seed against every row) while N · max(members, budget) stays below this (about
#: 0.1 s of one core; the demo and the tests of small pools); above it, only along the
#: edges of the call's k-NN graph (:class:`_GraphLinks`), O(N·k) whatever the store holds.
PAL_EXACT_WORK = 1 << 23
#: Seed partners checked against the store per call of known_mask.
_SEED_CHUNK = 64


class _DenseLinks:
    """Similarities of rows to the known classes, exact: ``link [n_cls, N]``."""

    def __init__(self, xn, member_rows, member_cls, n_cls, members, free, differ):
        self.xn, self.members, self.free = xn, members, free
        self.link = _class_links(xn.dense(), member_rows, member_cls, n_cls)
        n = xn.shape[0]
        self.predicted = self.link.argmax(0) if n_cls else torch.zeros(n, dtype=torch.long)
        # vote_share[o, c]: share of the members of class o whose most linked other class
        # is c, among the classes not known to differ from o (differ [n_cls, n_cls]).
        self.vote_share = torch.zeros(n_cls, n_cls)
        if n_cls > 1:
            other = self.link[:, member_rows]
            other[member_cls, torch.arange(member_rows.numel())] = float("-inf")
            other[differ[:, member_cls]] = float("-inf")
            best, vote = other.max(0)
            voted = torch.isfinite(best)  # a class known to differ from all others: no vote
            self.vote_share.index_put_((member_cls[voted], vote[voted]), torch.ones(int(voted.sum())), accumulate=True)
            self.vote_share /= torch.tensor([m.numel() for m in members], dtype=torch.float)[:, None]
        self.maxsim = self.link.max(0).values if n_cls else torch.full((n,), -2.0)

    def class_sims(self, c, rows):
        return self.link[c, rows]

    def rest(self, c):
        rest = (self.free & (self.predicted != c)).nonzero().flatten()
        return rest[torch.sort(-self.link[c, rest], stable=True).indices]

    def merges(self, c):
        # The classes whose most voted class is c (module docstring), with their vote shares.
        share = self.vote_share[:, c]
        others = ((share > 0) & (share >= self.vote_share.max(1).values)).nonzero().flatten()
        return others, share[others]

    def closest(self, c, o):
        return self.link[c, self.members[o]].max()

    def merge_pair(self, c, o):
        return _closest_pair(self.xn, self.members[c], self.members[o])

    def partners(self, row, used):
        """Chunks of the rows not used, most similar to ``row`` first."""
        sims = self.xn.sims_to(row)
        sims[used] = float("-inf")
        ranked = torch.sort(-sims, stable=True).indices[: used.numel() - int(used.sum())]
        yield from ranked.split(_SEED_CHUNK)

    def reach(self, row):
        self.maxsim = torch.maximum(self.maxsim, self.xn.sims_to(row))

    def seed_score(self):
        return self.maxsim


class _GraphLinks(_DenseLinks):
    """The same similarities, only along the edges of the k-NN graph (both directions):
    a row is linked to class c through its edges to members of c; a row with no edge
    to a member is predicted in no class. O(N·k) time and memory."""

    def __init__(self, xn, class_of, n_cls, members, free, graph: CandidateGraph, k: int, differ_mask):
        self.xn, self.members, self.free, self.class_of = xn, members, free, class_of
        n = xn.shape[0]
        ptr, dst, sim = graph.symmetric(k)
        self.ptr, self.dst, self.sim = ptr, dst, sim
        src = torch.arange(n).repeat_interleave(ptr.diff())
        # Entries (class c, row i, similarity, member m): the best edge from c to i.
        on = class_of[src] >= 0
        c, i, s, m = class_of[src[on]], dst[on], sim[on], src[on]
        c, i, s, m = _first_per_key(c * n + i, s, c, i, s, m)
        self.ec, self.ei, self.es, self.em = c, i, s, m
        self.cptr = torch.zeros(n_cls + 1, dtype=torch.long)
        self.cptr[1:] = torch.cumsum(torch.bincount(c, minlength=n_cls), 0)
        # predicted[i]: the class of i's most similar linked member (−1: no edge to one).
        pc, pi, ps = _first_per_key(i, s, c, i, s)
        self.predicted = torch.full((n,), -1, dtype=torch.long)
        self.predicted[pi] = pc
        self.maxsim = torch.full((n,), float("-inf"))
        self.maxsim[pi] = ps
        # A row none of whose edges reaches a known member or seed is farther from all
        # of them than from its k-th neighbour: seeded first, the most isolated first.
        self.reached = self.maxsim > float("-inf")
        kth = graph.knn(k)[0][:, -1]
        self.unreached_score = torch.where(torch.isfinite(kth), kth, torch.tensor(-1.0)) - 3.0
        # Votes: each member's most linked other class not known to differ from its own
        # (the entry's member i and m, a member of c, are in two classes: known ⇔ known
        # different).
        mem = class_of[i] >= 0
        mem &= class_of[i] != c
        mem[mem.clone()] = ~differ_mask(i[mem], m[mem])
        vc, vi, _ = _first_per_key(i[mem], s[mem], c[mem], i[mem], s[mem])
        vo = class_of[vi]
        key, counts = torch.unique(vc * max(n_cls, 1) + vo, return_counts=True)
        vc, vo = key // max(n_cls, 1), key % max(n_cls, 1)
        sizes = torch.tensor([mm.numel() for mm in members], dtype=torch.float)
        share = counts.float() / sizes[vo] if n_cls else counts.float()
        # Keep each voting class's most voted classes (ties: all; module docstring).
        top = torch.zeros(max(n_cls, 1)).scatter_reduce(0, vo, share, "amax")
        keep = share >= top[vo]
        self.vc, self.vo, self.vshare = vc[keep], vo[keep], share[keep]  # sorted by (c, o)

    def _slice(self, c):
        lo, hi = int(self.cptr[c]), int(self.cptr[c + 1])
        return self.ei[lo:hi], self.es[lo:hi], self.em[lo:hi]

    def class_sims(self, c, rows):
        ii, ss, _ = self._slice(c)
        if ii.numel() == 0:
            return torch.full((rows.numel(),), float("-inf"))
        pos = torch.searchsorted(ii, rows).clamp_max(ii.numel() - 1)
        return torch.where(ii[pos] == rows, ss[pos], torch.tensor(float("-inf")))

    def rest(self, c):
        ii, ss, _ = self._slice(c)
        keep = self.free[ii] & (self.predicted[ii] != c)
        return ii[keep][torch.sort(-ss[keep], stable=True).indices]

    def merges(self, c):
        on = self.vc == c
        return self.vo[on], self.vshare[on]

    def _edge_to(self, c, o):
        ii, ss, mm = self._slice(c)
        on = self.class_of[ii] == o
        best = int(torch.argmax(ss[on]))
        return ss[on][best], int(mm[on][best]), int(ii[on][best])

    def closest(self, c, o):
        return self._edge_to(c, o)[0]

    def merge_pair(self, c, o):
        _, a, b = self._edge_to(c, o)
        return a, b

    def partners(self, row, used):
        """The row's graph neighbours not used, most similar first, then (rarely reached:
        all of them used or known) every other row as the exact search orders them."""
        near = self.dst[int(self.ptr[row]) : int(self.ptr[row + 1])]
        yield near[~used[near]]
        yield from _DenseLinks.partners(self, row, used)

    def reach(self, row):
        lo, hi = int(self.ptr[row]), int(self.ptr[row + 1])
        near, s = self.dst[lo:hi], self.sim[lo:hi]
        self.maxsim[near] = torch.maximum(self.maxsim[near], s)
        self.maxsim[row] = 1.0
        self.reached[near] = True
        self.reached[row] = True

    def seed_score(self):
        return torch.where(self.reached, self.maxsim, self.unreached_score)


def _first_per_key(key, score, *cols):
    """For each distinct key, the columns at its highest score (ties: the first), in
    key order."""
    o = torch.sort(-score, stable=True).indices
    o = o[torch.sort(key[o], stable=True).indices]
    key = key[o]
    first = torch.ones(key.numel(), dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    return tuple(col[o][first] for col in cols)


def _closest_pair(xn, rows_a, rows_b):
    """The most similar (a, b), a in rows_a, b in rows_b (the easiest question)."""
    s = xn[rows_a] @ xn[rows_b].T
    best = int(torch.argmax(s))
    return int(rows_a[best // rows_b.numel()]), int(rows_b[best % rows_b.numel()])


def _pal(
    sel: _Selection,
    xn: _UnitRows,
    graph: CandidateGraph,
    budget: int,
    k: int,
    explore: float,
    gen: torch.Generator,
    order: str,
    mix: str,
    state: dict,
) -> None:
    n = xn.shape[0]
    _, inv, counts = torch.unique(sel.roots, return_inverse=True, return_counts=True)
    class_of = torch.where(counts[inv] >= 2, inv, -1)  # [N] class index or −1
    cls = torch.unique(class_of[class_of >= 0])
    class_of = torch.searchsorted(cls, class_of.clamp_min(0)).where(class_of >= 0, -1)
    n_cls = cls.numel()
    member_rows = torch.sort(class_of, stable=True).indices[int((class_of < 0).sum()) :]
    member_cls = class_of[member_rows]  # the rows of the classes, grouped by class
    members = list(member_rows.split(torch.bincount(member_cls, minlength=n_cls).tolist()))
    in_class = class_of >= 0
    used = torch.zeros(n, dtype=torch.bool)  # rows already in a query of this call

    # Answers so far: queries spent on each class, and P(alike | similarity).
    log_pairs, log_answers = sel.store.answers()
    asked = torch.zeros(n_cls, dtype=torch.long)
    if log_pairs.shape[0] and n_cls:
        class_root = sel.roots[torch.stack([m[0] for m in members])]
        lr = sel.store.roots(log_pairs.reshape(-1))
        # answers touching each class: each answer's two roots, once when they are equal
        hits = torch.cat([lr[0::2], lr[1::2][lr[0::2] != lr[1::2]]])
        pos = torch.searchsorted(class_root, hits).clamp_max(n_cls - 1)
        asked += torch.bincount(pos[class_root[pos] == hits], minlength=n_cls)
    ra, rb, y = _answered_rows(sel, log_pairs, log_answers)
    p_alike = _isotonic((xn[ra] * xn[rb]).sum(1), y)

    n_seed = _exploration(sel.store, state, n_cls, budget, explore)
    n_spread = budget - n_seed  # class-guided questions, then random pairs, up to this
    guided = _guided_share(sel.store, state) if mix == "adaptive" else 1.0

    # ---- grow the classes, least-queried first. Candidates of class c: rows in no
    # class and the other classes. The next row and the next class compete on the
    # expected number of samples joined to c (module docstring).
    # The re-asks (select_queries' reask) already chosen count as guided questions.
    n_reasked = sel.kept[0]
    n_grow = n_reasked + round(guided * max(0, n_spread - n_reasked))
    heap = [(int(asked[c]), members[c].numel(), c) for c in range(n_cls)]
    heapq.heapify(heap)
    free = ~in_class

    # Similarities of rows to classes; the predicted class of a row is its most linked
    # class (1-NN over the known members).
    if n * max(member_rows.numel(), budget) <= PAL_EXACT_WORK:
        # differ[ca, cb]: classes ca and cb known different (any member stands for each).
        first = torch.stack([m[0] for m in members]) if n_cls else torch.zeros(0, dtype=torch.long)
        ca, cb = torch.triu_indices(n_cls, n_cls, 1)
        differ = torch.zeros(n_cls, n_cls, dtype=torch.bool)
        differ[ca, cb] = sel.known(first[ca], first[cb])  # two classes: known ⇔ known different
        differ |= differ.T.clone()
        links = _DenseLinks(xn, member_rows, member_cls, n_cls, members, free, differ)
    else:
        links = _GraphLinks(xn, class_of, n_cls, members, free, graph, k, sel.known)
    ranks: list = [None] * n_cls
    row_cur = [0] * n_cls
    cls_cur = [0] * n_cls
    while heap and len(sel.pairs) < n_grow:
        q, size, c = heapq.heappop(heap)
        if ranks[c] is None:
            # Rows predicted to be in c (order "gain": likeliest "alike" first, ties in
            # random order; order "random": all in random order, diverse samples of the
            # class), then the other free rows, most linked first.
            mine = (free & (links.predicted == c)).nonzero().flatten()
            mine = mine[torch.randperm(mine.numel(), generator=gen)]
            if order == "gain":  # most likely "alike" first; ties (a flat step of P) random
                mine = mine[torch.sort(-p_alike(links.class_sims(c, mine)), stable=True).indices]
            rows = torch.cat([mine, links.rest(c)])
            # Another class o is a merge candidate when more of its members are predicted
            # to be in c than in any other class (1-NN over the classes other than o and
            # those known to differ from o; module docstring); the vote share estimates
            # P(o and c are one class).
            others, share = links.merges(c)
            sizes = torch.tensor([members[o].numel() for o in others], dtype=torch.float)
            if order == "gain":  # P(alike) of the pair asked (the closest members) · |o|
                closest = torch.stack([links.closest(c, int(o)) for o in others]) if others.numel() else torch.zeros(0)
                merge_gain = torch.minimum(p_alike(closest), share) * sizes
            else:
                merge_gain = share * sizes
            by_gain = torch.sort(-merge_gain, stable=True).indices
            ranks[c] = (rows, p_alike(links.class_sims(c, rows)), others[by_gain], merge_gain[by_gain])
        rows, row_gain, others, cls_gain = ranks[c]
        asked_one = False
        while not asked_one:
            while row_cur[c] < rows.numel() and bool(used[rows[row_cur[c]]]):
                row_cur[c] += 1
            has_row, has_cls = row_cur[c] < rows.numel(), cls_cur[c] < others.numel()
            if not (has_row or has_cls):
                break
            merge = has_cls and (not has_row or cls_gain[cls_cur[c]] >= row_gain[row_cur[c]])
            # Ask with the closest members of the two sides (the easiest question).
            if merge:
                a, b = links.merge_pair(c, int(others[cls_cur[c]]))
                cls_cur[c] += 1
            else:
                a, b = _closest_pair(xn, members[c], rows[row_cur[c] : row_cur[c] + 1])
                row_cur[c] += 1
            if bool(sel.store.known_mask(sel.ids[[a, b]][None])[0]) or not sel.try_add(a, b):
                continue
            if not merge:
                used[b] = True
            asked_one = True
        if asked_one:
            heapq.heappush(heap, (q + 1, size, c))

    # ---- random pairs (mix "adaptive": the share similarity did not earn, see
    # _guided_share), spread over the pool like strategy "random"'s.
    if len(sel.pairs) < n_spread and mix == "adaptive":
        _random(sel, n, n_spread, gen)

    # ---- seed new classes far from everything known (and fill what growth could not):
    # the row least similar to every class member and seed so far, with its nearest
    # neighbour (most likely alike).
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
            score = torch.where(eligible, links.seed_score(), torch.tensor(float("inf")))
            x_row = int(torch.argmin(score))
        first = False
        used[x_row] = True
        links.reach(x_row)
        for chunk in links.partners(x_row, used):
            unknown = ~sel.known(torch.full_like(chunk, x_row), chunk)
            hit = next((b for b in chunk[unknown].tolist() if sel.try_add(x_row, b)), None)
            if hit is not None:
                used[hit] = True
                links.reach(hit)
                state["n_seeds"] = state.get("n_seeds", 0) + 1
                # A list, not a tuple: the state is JSON (RelationStore.save_state).
                state.setdefault("pending", []).append(
                    [int(sel.ids[x_row]), int(sel.ids[hit]), not bool(in_class[hit])]
                )
                break
    if mix == "adaptive":  # judged by _guided_share at the next call; new pairs only
        new_pairs = sel.result()[n_reasked:]
        ra, rb = _rows_of(sel, new_pairs)
        sims = (xn[ra] * xn[rb]).sum(1) if ra.numel() else torch.zeros(0)
        state["asked"] = [[i, j, sim] for (i, j), sim in zip(new_pairs.tolist(), sims.tolist())]


def _ranking_auc(s: torch.Tensor, y: torch.Tensor) -> float:
    """P(a random "alike" pair is more similar than a random "different" one), ties
    counting one half (Mann-Whitney); needs both answers among ``y``."""
    order = torch.argsort(s)
    s_sorted = s[order].double()
    ranks = torch.empty_like(s_sorted)
    # each value's rank, 1-based; ties: the mean rank of their run
    _, inv, counts = torch.unique_consecutive(s_sorted, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks[order] = mean_rank[inv]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _guided_share(store: RelationStore, state: dict) -> float:
    """Share of ``"pal"``'s growth budget for class-guided questions under
    ``mix="adaptive"`` (module docstring): 2·AUC − 1 (clamped to [0, 1]) of the
    similarity each of the previous call's questions had *when it was asked* against its
    answer. Not the answered pairs' current similarities: the encoder has since been
    trained on those answers, so its similarities fit them whatever they predict for
    new pairs. Kept from the call before while the questions lack an "alike" and a
    "different" answer (1 at first: nothing says similarity fails yet)."""
    asked = state.pop("asked", [])
    sims, answers = [], []
    for i, j, s in asked:
        same = store.same(i, j)
        if same is not None:
            sims.append(s)
            answers.append(bool(same))
    y = torch.tensor(answers, dtype=torch.bool)
    if bool(y.any()) and bool((~y).any()):
        auc = _ranking_auc(torch.tensor(sims), y)
        state["guided_share"] = min(1.0, max(0.0, 2 * auc - 1))
    return state.get("guided_share", 1.0)


def _exploration(store: RelationStore, state: dict, n_cls: int, budget: int, explore: float) -> int:
    """How many of this call's ``budget`` questions seed new classes (module docstring).

    First the seeds of earlier calls are judged: a seed *found a class* when it was
    answered "alike" with both rows outside every known class. After
    :data:`STABLE_SEEDS` misses in a row the number of classes is taken as stable and
    exploring stops for good. While no class exists, the whole budget seeds; else
    ``explore · budget`` is added to a credit carried across calls and its whole part
    is spent (no rounding up per call: with explore = 0.1 and one question per call,
    one seed every ten calls)."""
    waiting = []
    for a, b, partner_free in state.pop("pending", []):
        same = store.same(a, b)
        if same is None:
            waiting.append([a, b, partner_free])  # not answered yet: judge it later
            continue
        state["misses"] = 0 if (same and partner_free) else state.get("misses", 0) + 1
    state["pending"] = waiting
    if state.get("misses", 0) >= STABLE_SEEDS:
        state["exploring"] = False
    if not n_cls:
        return budget
    if not state.setdefault("exploring", True):
        return 0
    credit = state.get("explore_credit", 0.0) + explore * budget
    n_seed = min(budget, int(credit + _CREDIT_SLACK))
    credit = max(credit, float(n_seed))
    state["explore_credit"] = credit - n_seed
    return n_seed
