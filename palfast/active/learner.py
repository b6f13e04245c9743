"""ActiveLearner: the active PAL loop (docs/active.md).

One round = train the encoder with the store's graph → embed the pool → select
pairs → ask the oracle → record the answers. The loss is
:func:`palfast.info_nce` on ``z = encoder(cat(views))`` of a mini-batch with the graph
``store.graph(batch_ids, n_views=V)`` = views graph + graph of the known classes
(union-find components, transitive closure included).

Everything the learner knows is in the store, so a new learner on the same store
file continues where the last one stopped: ``run(budget)`` asks only
``budget − store.n_queries`` more pairs (the encoder is retrained from the store's
answers; pass the same ``seed`` for the same choices).

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
    >>> [h["n_queries"] for h in history]
    [0, 10, 20]
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..functional import info_nce
from .oracle import Oracle
from .store import RelationStore
from .strategies import STRATEGIES, select_queries

__all__ = ["ActiveLearner"]


class ActiveLearner:
    """Active PAL on a fixed pool ``data [N, ...]`` (sample id = row index).

    Args:
        encoder: ``nn.Module`` mapping a batch of ``data`` rows to embeddings ``[B, D]``.
        data: the pool, a tensor ``[N, ...]`` (kept on its device; batches are moved
            to ``device``).
        oracle: an :class:`~palfast.active.Oracle` over the sample ids.
        store: the :class:`RelationStore` (default: a new in-memory one).
        strategy: a name of :data:`STRATEGIES`.
        augment: ``augment(x_batch, generator) -> x_batch`` producing one random view;
            ``None`` = no views (``n_views`` is then forced to 1).
        n_views: views per sample in each batch (V ≥ 1).
        epochs_per_round, batch_size, lr, weight_decay: the Adam training of each round.
        temperature: of :func:`palfast.info_nce`.
        label_weight, view_weight: weights of the two graphs (see ``RelationStore.graph``).
        k, explore: passed to :func:`select_queries`.
        embed_fn: ``embed_fn(encoder, x_batch) -> [B, D]`` used for selection
            (default ``encoder(x_batch)``).
        seed: seeds the batches, views and selections.
        device: where the encoder is trained (default: the encoder's device).
        progress: show tqdm progress bars.
        source: the ``source`` recorded with each answer.
        group_components: batches keep the members of known components together
            (see :meth:`_epoch_order`); False = uniform shuffling.
    """

    def __init__(self, encoder: torch.nn.Module, data: torch.Tensor, oracle: Oracle,
                 store: RelationStore | None = None, *, strategy: str = "pal",
                 augment: Callable | None = None, n_views: int = 2, epochs_per_round: int = 10,
                 batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 0.0,
                 temperature: float = 0.1, label_weight: float = 1.0, view_weight: float = 1.0,
                 k: int = 10, explore: float = 0.1, embed_fn: Callable | None = None,
                 seed: int = 0, device=None, progress: bool = True,
                 source: str = "oracle", group_components: bool = True):
        op = "palfast.active.ActiveLearner"
        if not isinstance(encoder, torch.nn.Module):
            raise TypeError(f"{op}: encoder must be a torch.nn.Module, got {type(encoder).__name__}")
        if not isinstance(data, torch.Tensor) or data.dim() < 1 or data.shape[0] < 2:
            raise ValueError(f"{op}: data must be a tensor [N, ...] with N >= 2 samples, got "
                             f"{getattr(data, 'shape', type(data).__name__)}")
        if not isinstance(oracle, Oracle):
            raise TypeError(f"{op}: oracle must be a palfast.active.Oracle, got "
                            f"{type(oracle).__name__}")
        if store is not None and not isinstance(store, RelationStore):
            raise TypeError(f"{op}: store must be a RelationStore, got {type(store).__name__}")
        if strategy not in STRATEGIES:
            raise ValueError(f"{op}: strategy must be one of {STRATEGIES}, got {strategy!r}")
        for name, v in (("n_views", n_views), ("epochs_per_round", epochs_per_round),
                        ("batch_size", batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name.startswith("e") else 1):
                raise ValueError(f"{op}: {name} must be a positive int, got {v!r}")
        self.encoder = encoder
        self.data = data
        self.oracle = oracle
        self.store = store if store is not None else RelationStore()
        self.strategy = strategy
        self.augment = augment
        self.n_views = n_views if augment is not None else 1
        self.epochs_per_round = epochs_per_round
        self.batch_size = batch_size
        self.temperature = temperature
        self.label_weight = label_weight
        self.view_weight = view_weight
        self.k = k
        self.explore = explore
        self.embed_fn = embed_fn
        self.seed = int(seed)
        self.progress = progress
        self.source = source
        self.group_components = bool(group_components)
        params = list(encoder.parameters())
        self.device = torch.device(device) if device is not None else (
            params[0].device if params else torch.device("cpu"))
        self.encoder.to(self.device)
        self.optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        self._gen = torch.Generator().manual_seed(self.seed)

    # ------------------------------------------------------------------ steps
    def train(self, epochs: int | None = None) -> float:
        """Train ``epochs`` epochs (default ``epochs_per_round``) on the whole pool with
        the current graph; returns the mean loss of the last epoch (nan if no epoch)."""
        epochs = self.epochs_per_round if epochs is None else epochs
        n = self.data.shape[0]
        self.encoder.train()
        last = float("nan")
        for _ in range(epochs):
            perm = self._epoch_order(n)
            total, count = 0.0, 0
            for idx in perm.split(self.batch_size):
                if idx.numel() < 2:
                    continue
                x = self.data[idx.to(self.data.device)].to(self.device)
                views = [self.augment(x, self._gen) if self.augment else x
                         for _ in range(self.n_views)]
                graph = self.store.graph(idx, n_views=self.n_views, label_weight=self.label_weight,
                                         view_weight=self.view_weight, device=self.device)
                if graph.num_anchors == 0:
                    continue  # no positive anywhere in this batch: nothing to learn from
                z = self.encoder(torch.cat(views))
                loss = info_nce(z, graph, temperature=self.temperature)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                total += float(loss.detach())
                count += 1
            last = total / max(count, 1)
        return last

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
        _, group, counts = torch.unique_consecutive(comp, return_inverse=True,
                                                    return_counts=True)
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
            x = data[start:start + 4096].to(self.device)
            z = self.embed_fn(self.encoder, x) if self.embed_fn else self.encoder(x)
            out.append(z.float().cpu())
        self.encoder.train()
        return torch.cat(out)

    def select(self, budget: int) -> torch.Tensor:
        """Pairs to ask next (``[Q, 2]``, Q ≤ budget) by the learner's strategy."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.store.n_queries)
        if self.strategy == "random":  # embeddings are not used: skip the forward pass
            emb = torch.zeros(self.data.shape[0], 1)
        else:
            emb = self.embed()
        return select_queries(emb, self.store, budget, self.strategy, k=self.k, generator=gen,
                              explore=self.explore)

    def ask_and_record(self, pairs: torch.Tensor) -> torch.Tensor:
        """Ask the oracle and record the answers (one store transaction)."""
        answers = self.oracle.ask(pairs)
        self.store.record(pairs, answers, source=self.source)
        return answers

    # -------------------------------------------------------------------- loop
    def run(self, budget: int, queries_per_round: int = 50,
            callback: Callable | None = None) -> list[dict]:
        """Rounds until ``store.n_queries >= budget``: train, then (``callback``), then
        select/ask/record. The last round trains on every answer, so the last entry
        describes the final encoder. ``callback(learner) -> dict | None`` adds its
        entries (e.g. test accuracy) to the round's record.

        Returns one dict per round: ``round``, ``n_queries`` (answers the encoder was
        trained with), ``n_positive`` (answers "alike" so far), ``loss``, callback entries.
        """
        op = "palfast.active.ActiveLearner.run"
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ValueError(f"{op}: budget must be an int >= 0, got {budget!r}")
        if (isinstance(queries_per_round, bool) or not isinstance(queries_per_round, int)
                or queries_per_round < 1):
            raise ValueError(f"{op}: queries_per_round must be an int >= 1, got "
                             f"{queries_per_round!r}")
        history: list[dict] = []
        remaining = max(0, budget - self.store.n_queries)
        n_rounds = -(-remaining // queries_per_round) + 1
        bar = _progress(n_rounds, f"{self.strategy}", self.progress)
        try:
            while True:
                loss = self.train()
                _, answers = self.store.answers()
                info = {"round": len(history), "n_queries": self.store.n_queries,
                        "n_positive": int(answers.sum()), "loss": loss}
                if callback is not None:
                    info.update(callback(self) or {})
                history.append(info)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(queries=info["n_queries"], loss=f"{loss:.3f}")
                remaining = budget - self.store.n_queries
                if remaining <= 0:
                    break
                pairs = self.select(min(queries_per_round, remaining))
                if pairs.shape[0] == 0:
                    break  # every pair is known: nothing left to ask
                self.ask_and_record(pairs)
        finally:
            if bar is not None:
                bar.close()
        return history


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="round", leave=False)
