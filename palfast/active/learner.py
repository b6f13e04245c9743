"""ActiveLearner: the active PAL loop (docs/active.md).

One round = train the encoder with the store's graph → embed the pool → select
pairs → ask the oracle → record the answers. The loss is any callable
``loss(z, graph) -> scalar`` (default :func:`palfast.info_nce` with the learner's
temperature) on ``z = encoder(cat(views))`` of a mini-batch; the graph is built in
one place, :meth:`ActiveLearner.batch_graph`: ``store.graph(batch_ids, n_views=V)`` =
views graph + graph of the known classes (union-find components, transitive closure
included), or only the answered pairs with ``transitive=False``.

The run stops when the store holds ``budget`` answers, or earlier when the strategy
returns no pair (for the built-in strategies: every pair of the pool is known or
implied, nothing is left to ask); the last round's record says which (``"stop"``).

Everything the learner knows is in the store, so a new learner on the same store
file continues where the last one stopped: ``run(budget)`` asks only
``budget − store.n_queries`` more pairs (the encoder is retrained from the store's
answers; pass the same ``seed`` for the same choices). ``"pal"``'s exploration state
(:attr:`ActiveLearner.strategy_state`: its seed credit, the seeds not yet judged, whether
it still explores) is saved in the store with each round's answers, in the same
transaction (``store.record(..., state=)``, key
:data:`palfast.active.strategies.PAL_STATE_KEY`), and a new learner
loads it, so the exploration continues too. Learners (and ``palfast annotate`` servers)
sharing one store share that key: the last to record wins.

Example::

    >>> import torch
    >>> from palfast.active import ActiveLearner, LabelOracle, RelationStore
    >>> g = torch.Generator().manual_seed(0)
    >>> y = torch.arange(40) % 4
    >>> data = torch.randn(4, 8, generator=g)[y] + 0.3 * torch.randn(40, 8, generator=g)
    >>> encoder = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    >>> learner = ActiveLearner(encoder, data, LabelOracle(y), RelationStore(),
    ...                         augment=lambda x, gen: x + 0.1 * torch.randn(x.shape, generator=gen),
    ...                         epochs_per_round=2, progress=False)
    >>> history = learner.run(budget=20, queries_per_round=10)
    >>> [h["n_queries"] for h in history], history[-1]["stop"]
    ([0, 10, 20], 'budget')
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch

from .._checks import check_bool, check_callable, check_choice, check_instance, check_int, check_number
from ..functional import info_nce
from ..graph import PairGraph
from .oracle import Oracle
from .policy import check_reask
from .relation import as_pairs
from .store import ContradictionWarning, RelationStore
from .strategies import (
    DEFAULT_ORDER,
    ORDERS,
    PAL_STATE_KEY,
    STRATEGIES,
    CandidateGraph,
    reask_count,
    select_queries,
    select_reasks,
)

__all__ = ["ActiveLearner", "selection_seed"]

_OP = "palfast.active.ActiveLearner"
#: How a strategy callable is called (docs/active.md, "ActiveLearner").
_STRATEGY_CALL = "strategy(embeddings, store, budget, k=k, generator=generator) -> [Q, 2]"


def selection_seed(seed: int, n_queries: int) -> int:
    """The seed of a selection by a run seeded ``seed`` when its store holds ``n_queries``
    answers: one per answer count, so a run resumed from its store (a new learner, a
    restarted ``palfast annotate``) draws anew instead of repeating the earlier run's draws,
    and the same store and seed give the same choices."""
    return seed * 1_000_003 + n_queries


class ActiveLearner:
    """Active PAL on a fixed pool ``data [N, ...]`` (sample id = row index).

    Args:
        encoder: ``nn.Module`` mapping a batch of ``data`` rows to embeddings ``[B, D]``.
        data: the pool, a tensor ``[N, ...]`` (kept on its device; batches are moved
            to ``device``).
        oracle: an :class:`~palfast.active.Oracle` over the sample ids.
        store: the :class:`RelationStore` (default: a new in-memory one).
        strategy: a name of :data:`STRATEGIES`, or a callable called as
            ``strategy(embeddings, store, budget, k=k, generator=generator)`` returning
            pairs ``[Q, 2]`` with Q ≤ budget (e.g. ``functools.partial(select_queries,
            strategy="nearest")``, or your own rule).
        loss: ``loss(z, graph) -> scalar`` on ``z = encoder(cat(views)) [V·B, D]`` and the
            batch's :class:`PairGraph` (default :func:`palfast.info_nce` with
            ``temperature``; any palfast loss, e.g. ``functools.partial(palfast.vic2,
            n_views=2, pool_size=N)``, or your own).
        augment: ``augment(x_batch, generator) -> x_batch`` producing one random view;
            ``None`` = no views (``n_views`` is then forced to 1).
        n_views: views per sample in each batch (V ≥ 1).
        epochs_per_round, batch_size, lr, weight_decay: the Adam training of each round.
        temperature: of the default loss :func:`palfast.info_nce`.
        label_weight, view_weight: weights of the two graphs (see ``RelationStore.graph``).
        k, explore, order: passed to :func:`select_queries` (named strategies only).
        reask: share of each round's questions spent on asking again the answers a
            second one could overturn, after the round's new questions, so that the
            re-asks reach them too (:func:`select_reasks`; :meth:`run`; named strategies
            only; default 0). Above 0 the store must be writable and opened with policy
            ``"confirm"`` or ``"majority"``. A re-asked pair goes to the oracle again and
            its answer is recorded as a new one (a :class:`~palfast.active.LabelOracle`
            draws a fresh flip for every pair it is asked, so a repeat is independent).
        negatives: the batch graph carries the known "different" pairs
            (``RelationStore.graph(..., negatives=True)``, ``graph.negatives``), for losses
            that use them (``info_nce`` with ``unknown_weight < 1``,
            ``spectral_contrastive``; docs/api.md). Default: True when ``unknown_weight``
            < 1, else False. Used with ``transitive=True`` only (the passive
            baseline's graph holds the answered "alike" pairs and nothing else).
        unknown_weight: of the default loss :func:`palfast.info_nce` (λ = 1: today's
            InfoNCE; λ < 1 stops pushing apart pairs not known to differ).
        transitive: the loss sees the known classes with their transitive closure
            (``store.graph``); False = only the pairs answered "alike" (the paper's
            passive baseline). Default: False for ``strategy="passive"``, else True.
        embed_fn: ``embed_fn(encoder, x_batch) -> [B, D]`` used for selection
            (default ``encoder(x_batch)``).
        seed: seeds the batches, views and selections.
        device: where the encoder is trained (default: the encoder's device).
        progress: show tqdm progress bars.
        source: the ``source`` recorded with each answer.
        group_components: batches keep the members of known components together
            (see :meth:`_epoch_order`); False = uniform shuffling.
    """

    def __init__(
        self,
        encoder: torch.nn.Module,
        data: torch.Tensor,
        oracle: Oracle,
        store: RelationStore | None = None,
        *,
        strategy: str | Callable = "pal",
        loss: Callable | None = None,
        augment: Callable | None = None,
        n_views: int = 2,
        epochs_per_round: int = 10,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        temperature: float = 0.1,
        label_weight: float = 1.0,
        view_weight: float = 1.0,
        k: int = 10,
        explore: float = 0.1,
        order: str = DEFAULT_ORDER,
        reask: float = 0.0,
        transitive: bool | None = None,
        negatives: bool | None = None,
        unknown_weight: float = 1.0,
        embed_fn: Callable | None = None,
        seed: int = 0,
        device=None,
        progress: bool = True,
        source: str = "oracle",
        group_components: bool = True,
    ):
        self.encoder = check_instance(_OP, "encoder", encoder, torch.nn.Module, "a torch.nn.Module")
        check_instance(_OP, "data", data, torch.Tensor, "a torch.Tensor [N, ...]")
        if data.dim() < 1 or data.shape[0] < 2:
            raise ValueError(
                f"{_OP}: data must be a tensor [N, ...] with N >= 2 samples, got shape {tuple(data.shape)}"
            )
        self.data = data
        self.oracle = check_instance(_OP, "oracle", oracle, Oracle, "a palfast.active.Oracle")
        self.store = (
            RelationStore()
            if store is None
            else check_instance(_OP, "store", store, RelationStore, "a palfast.active.RelationStore")
        )
        if callable(strategy):
            self.strategy = strategy
        else:
            self.strategy = check_choice(_OP, "strategy", strategy, STRATEGIES)
        unknown_weight = check_number(_OP, "unknown_weight", unknown_weight, 0.0, maximum=1.0)
        if loss is not None and unknown_weight != 1.0:
            raise ValueError(
                f"{_OP}: unknown_weight sets the default loss (palfast.info_nce); "
                f"with loss= given, pass it to your loss instead, got "
                f"unknown_weight={unknown_weight}"
            )
        self.loss = (
            functools.partial(
                info_nce,
                temperature=check_number(_OP, "temperature", temperature, 0.0, strict=True),
                unknown_weight=unknown_weight,
            )
            if loss is None
            else check_callable(_OP, "loss", loss, "loss(z, graph) -> scalar")
        )
        self.augment = (
            None if augment is None else check_callable(_OP, "augment", augment, "augment(x, generator) -> x")
        )
        n_views = check_int(_OP, "n_views", n_views, 1)
        #: RelationStore.graph's keywords, in this one place (see batch_graph).
        self.graph_options = {
            "n_views": n_views if augment is not None else 1,
            "label_weight": check_number(_OP, "label_weight", label_weight, 0.0),
            "view_weight": check_number(_OP, "view_weight", view_weight, 0.0),
            "negatives": (unknown_weight < 1 if negatives is None else check_bool(_OP, "negatives", negatives)),
        }
        self.transitive = (
            self.strategy != "passive" if transitive is None else check_bool(_OP, "transitive", transitive)
        )
        self.epochs_per_round = check_int(_OP, "epochs_per_round", epochs_per_round, 0)
        self.batch_size = check_int(_OP, "batch_size", batch_size, 1)
        self.k = check_int(_OP, "k", k, 1)
        self.explore = check_number(_OP, "explore", explore, 0.0, maximum=1.0)
        self.order = check_choice(_OP, "order", order, ORDERS)
        self.reask = check_reask(_OP, reask, self.store.policy, self.store.readonly)
        if self.reask and callable(self.strategy):
            raise ValueError(
                f"{_OP}: reask is passed to select_queries, the named strategies; a "
                f"callable strategy chooses its own pairs (call select_queries with "
                f"reask= inside it), got reask={self.reask:g}"
            )
        self.embed_fn = (
            None if embed_fn is None else check_callable(_OP, "embed_fn", embed_fn, "embed_fn(encoder, x) -> [B, D]")
        )
        self.seed = check_int(_OP, "seed", seed)
        self.progress = check_bool(_OP, "progress", progress)
        self.source = check_instance(_OP, "source", source, str, "a str")
        self.group_components = check_bool(_OP, "group_components", group_components)
        #: What "pal" carries from one selection to the next (exploration credit, seeds),
        #: as the store last saved it (see the module docstring).
        self.strategy_state: dict = (self.store.load_state(PAL_STATE_KEY) if self._pal else None) or {}
        params = list(encoder.parameters())
        self.device = (
            torch.device(device) if device is not None else (params[0].device if params else torch.device("cpu"))
        )
        self.encoder.to(self.device)
        self.optimizer = torch.optim.Adam(
            params,
            lr=check_number(_OP, "lr", lr, 0.0, strict=True),
            weight_decay=check_number(_OP, "weight_decay", weight_decay, 0.0),
        )
        self._gen = torch.Generator().manual_seed(self.seed)
        self._positives = torch.zeros(0, 2, dtype=torch.long)

    @property
    def _pal(self) -> bool:
        """Whether the strategy is ``"pal"``, whose state the store keeps."""
        return isinstance(self.strategy, str) and self.strategy == "pal"

    @property
    def n_views(self) -> int:
        """Views per sample in each batch (1 without ``augment``)."""
        return self.graph_options["n_views"]

    @property
    def strategy_name(self) -> str:
        """The strategy's name, or the callable's ``__name__``."""
        s = self.strategy
        return s if isinstance(s, str) else getattr(s, "__name__", type(s).__name__)

    # ------------------------------------------------------------------ steps
    def train(self, epochs: int | None = None) -> float:
        """Train ``epochs`` epochs (default ``epochs_per_round``) on the whole pool with
        the current graph; returns the mean loss of the last epoch (nan if no epoch)."""
        epochs = self.epochs_per_round if epochs is None else epochs
        n = self.data.shape[0]
        if not self.transitive:
            pairs, answers = self.store.answers()
            self._positives = pairs[answers]
        self.encoder.train()
        last = float("nan")
        for _ in range(epochs):
            perm = self._epoch_order(n)
            total, count = 0.0, 0
            for idx in perm.split(self.batch_size):
                if idx.numel() < 2:
                    continue
                x = self.data[idx.to(self.data.device)].to(self.device)
                views = [self.augment(x, self._gen) if self.augment else x for _ in range(self.n_views)]
                graph = self.batch_graph(idx)
                if graph.num_anchors == 0:
                    continue  # no positive anywhere in this batch: nothing to learn from
                loss = self.loss(self.encoder(torch.cat(views)), graph)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                total += float(loss.detach())
                count += 1
            last = total / max(count, 1)
        return last

    def batch_graph(self, idx: torch.Tensor) -> PairGraph:
        """The graph the loss trains on for the batch of sample ids ``idx [B]``, over
        ``cat(views)`` (V·B rows): the only place it is built, with the store's graph
        keywords from :attr:`graph_options`.

        ``transitive=True``: ``store.graph(idx, **graph_options)`` (known classes, closure
        included). ``transitive=False``: views graph + only the pairs answered "alike"
        whose two samples are in the batch (every view of one with every view of the
        other), so nothing is inferred (the paper's passive baseline)."""
        if self.transitive:
            return self.store.graph(idx, device=self.device, **self.graph_options)
        b, v = idx.numel(), self.n_views
        largest = max(int(idx.max()), int(self._positives.max()) if self._positives.numel() else 0)
        row = torch.full((largest + 1,), -1, dtype=torch.long)
        row[idx] = torch.arange(b)
        ra, rb = row[self._positives[:, 0]], row[self._positives[:, 1]]
        both = (ra >= 0) & (rb >= 0)
        ra, rb = ra[both], rb[both]
        shift = torch.arange(v) * b  # view v of batch row r is row r + v·b of cat(views)
        src = (ra[:, None, None] + shift[None, :, None]).expand(-1, v, v).reshape(-1)
        dst = (rb[:, None, None] + shift[None, None, :]).expand(-1, v, v).reshape(-1)
        g = self.graph_options["label_weight"] * PairGraph.from_edges(src, dst, num_nodes=v * b)
        if v > 1:
            g = self.graph_options["view_weight"] * PairGraph.from_views(b, v) + g
        return g.to(self.device)

    def _epoch_order(self, n: int) -> torch.Tensor:
        """A random order of the pool in which known components stay together.

        Members of a component are consecutive, in chunks of at most batch_size / 4
        samples, chunks and singletons in random order. A pair of known positives then
        shares a batch every epoch (uniform shuffling: probability ≈ batch_size / N),
        while a batch still mixes at least 4 classes, so negatives stay diverse."""
        perm = torch.randperm(n, generator=self._gen)
        if not self.group_components:
            return perm
        comp = self.store.roots(perm)
        order = torch.sort(comp, stable=True).indices  # group members, shuffled inside
        perm, comp = perm[order], comp[order]
        _, group, counts = torch.unique_consecutive(comp, return_inverse=True, return_counts=True)
        start = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        chunk = (torch.arange(n) - start) // max(2, self.batch_size // 4)
        _, unit = torch.unique(group * n + chunk, return_inverse=True)
        rank = torch.randperm(int(unit.max()) + 1, generator=self._gen)[unit]
        return perm[torch.sort(rank, stable=True).indices]

    @torch.no_grad()
    def embed(self, data: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings ``[N, D]`` (float32, CPU) of ``data`` (default the pool), eval mode."""
        data = self.data if data is None else data
        self.encoder.eval()
        out = []
        for start in range(0, data.shape[0], 4096):
            x = data[start : start + 4096].to(self.device)
            z = self.embed_fn(self.encoder, x) if self.embed_fn else self.encoder(x)
            out.append(z.float().cpu())
        self.encoder.train()
        return torch.cat(out)

    def select(self, budget: int) -> torch.Tensor:
        """Pairs to ask next (``[Q, 2]``, Q ≤ budget) by the learner's strategy, with
        ``reask``'s share of them re-asks, first: one :func:`select_queries` call.
        (:meth:`run` asks its re-asks after each round's new questions instead.)"""
        return self._select(budget, self.reask, self._selection_embeddings(), None)

    def _selection_embeddings(self) -> torch.Tensor:
        if self.strategy in ("random", "passive"):  # embeddings unused: skip the forward pass
            return torch.zeros(self.data.shape[0], 1)
        return self.embed()

    def _select(self, budget: int, reask: float, emb: torch.Tensor, graph: CandidateGraph | None) -> torch.Tensor:
        gen = torch.Generator().manual_seed(selection_seed(self.seed, self.store.n_queries))
        if isinstance(self.strategy, str):
            return select_queries(
                emb,
                self.store,
                budget,
                self.strategy,
                k=self.k,
                generator=gen,
                explore=self.explore,
                order=self.order,
                state=self.strategy_state,
                graph=graph,
                reask=reask,
            )
        pairs = as_pairs(
            self.strategy(emb, self.store, budget, k=self.k, generator=gen),
            f"{_OP}: the pairs that strategy {self.strategy_name!r} returned",
        )
        if pairs.shape[0] > budget:
            raise ValueError(
                f"{_OP}: strategy {self.strategy_name!r} returned {pairs.shape[0]} "
                f"pairs for a budget of {budget}; it must return at most budget"
            )
        return pairs

    def _ask_round(self, budget: int) -> int:
        """Select, ask and record one round's ``budget`` questions on one set of
        embeddings; returns how many were asked (0: the strategy found none).

        With ``reask`` > 0 the new questions come first and the re-asks after them
        (:func:`select_reasks`), so that the re-asks reach this round's answers too, the
        last round's included, which no later selection would reach: ``budget −
        int(reask · budget)`` new questions, then up to the rest in re-asks. When fewer
        re-asks are due, the rest goes round again, new questions then their re-asks,
        until the budget is spent or nothing is left to ask (with no re-ask due and no
        new question under the share, as at ``reask`` 1, the rest is new questions).
        The strategy's calls share one k-NN graph (:class:`CandidateGraph`), searched
        at most once per round."""
        emb = self._selection_embeddings()
        if not self.reask:
            pairs = self._select(budget, 0.0, emb, None)
            if pairs.shape[0]:
                self.ask_and_record(pairs)
            return pairs.shape[0]
        graph = CandidateGraph(emb, k=min(self.k, emb.shape[0] - 1))
        left, share = budget, self.reask
        while left:
            new = self._select(left - reask_count(share, left), 0.0, emb, graph)
            if new.shape[0]:
                self.ask_and_record(new)
            again = select_reasks(emb, self.store, left - new.shape[0])
            if again.shape[0]:
                self.ask_and_record(again)
            asked = new.shape[0] + again.shape[0]
            if not asked and not share:
                break  # nothing left to ask
            share = share if asked else 0.0  # no re-ask due (reask 1): new questions
            left -= asked
        return budget - left

    def ask_and_record(self, pairs: torch.Tensor) -> torch.Tensor:
        """Ask the oracle and record the answers (one store transaction, with ``"pal"``'s
        :attr:`strategy_state`). Answers that contradict the known relation are counted
        in ``store.n_conflicts``, not warned about here: :meth:`run` warns once per run
        with the total."""
        answers = self.oracle.ask(pairs)
        state = {PAL_STATE_KEY: self.strategy_state} if self._pal else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ContradictionWarning)
            self.store.record(pairs, answers, source=self.source, state=state)
        return answers

    # -------------------------------------------------------------------- loop
    def run(self, budget: int, queries_per_round: int = 50, on_round: Callable | None = None) -> list[dict]:
        """Rounds until ``store.n_queries >= budget``: train, then ``on_round``, then
        select/ask/record (with ``reask``, the new questions first and their re-asks
        after them: ``_ask_round``). The last round trains on every answer, so the last
        entry describes the final encoder.

        Stopping rule: the run ends after the round that trained on ``budget`` answers
        (``"stop": "budget"``), or earlier after a round whose selection returned no
        pair (``"stop": "exhausted"``: for the built-in strategies every pair of the pool
        is known or implied). ``"stop"`` is None in the other rounds' records.

        ``on_round(learner, record) -> dict | None`` is called once per round after
        training, with the round's record so far; the entries it returns (e.g. test
        accuracy) are added to the record.

        Returns one dict per round: ``round``, ``n_queries`` (answers the encoder was
        trained with), ``n_positive`` (answers "alike" so far), ``n_conflicts`` (answers
        so far that contradict earlier ones: a noisy oracle), ``loss``, ``n_seeds``
        (``"pal"``'s exploration questions so far, those of earlier learners on the
        store included), ``stop``, and the hook's entries.
        A run whose answers added contradictions warns once, at its end, with
        :class:`ContradictionWarning`.
        """
        op = f"{_OP}.run"
        budget = check_int(op, "budget", budget, 0)
        queries_per_round = check_int(op, "queries_per_round", queries_per_round, 1)
        if on_round is not None:
            check_callable(op, "on_round", on_round, "on_round(learner, record) -> dict | None")
        history: list[dict] = []
        remaining = max(0, budget - self.store.n_queries)
        n_rounds = -(-remaining // queries_per_round) + 1
        conflicts_before = self.store.n_conflicts
        bar = _progress(n_rounds, self.strategy_name, self.progress)
        try:
            while True:
                loss = self.train()
                _, answers = self.store.answers()
                info = {
                    "round": len(history),
                    "n_queries": self.store.n_queries,
                    "n_positive": int(answers.sum()),
                    "n_conflicts": self.store.n_conflicts,
                    "loss": loss,
                    "n_seeds": self.strategy_state.get("n_seeds", 0),
                    "stop": None,
                }
                if on_round is not None:
                    info.update(on_round(self, dict(info)) or {})
                history.append(info)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(queries=info["n_queries"], loss=f"{loss:.3f}")
                remaining = budget - self.store.n_queries
                if remaining <= 0:
                    info["stop"] = "budget"
                    break
                if not self._ask_round(min(queries_per_round, remaining)):
                    info["stop"] = "exhausted"
                    break
        finally:
            if bar is not None:
                bar.close()
        added = self.store.n_conflicts - conflicts_before
        if added:
            warnings.warn(
                f"{op}: {added} of this run's answers contradict earlier answers (a "
                f"noisy oracle?); the first answer wins, store.contradictions() lists "
                f"them",
                ContradictionWarning,
                stacklevel=2,
            )
        return history


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="round", leave=False)
