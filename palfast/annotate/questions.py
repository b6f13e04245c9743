"""The questions the app hands out, and the answers it takes back into the RelationStore.

One :class:`Questions` object per server owns the store (a RelationStore connection is not
for concurrent threads: every use holds ``self._lock``). It keeps

* ``pending``: pairs from :func:`palfast.active.select_queries` not yet shown, refilled by a
  background thread when fewer than ``LOW_WATER`` are left, and rebuilt when the trainer
  refreshes the embeddings file;
* the :class:`palfast.active.CandidateGraph` of the current embeddings (strategies
  ``pal``, ``nearest``, ``uncertain``): its k-NN search runs once per embeddings file, in
  the refill thread and outside the lock (minutes on a pool of a million samples, while
  pages and answers are served), and every refill reuses it; only what depends on the
  answers is computed again per refill;
* ``issued``: the questions on someone's screen, by an unguessable id. An answer is taken
  only for an issued id, from the session it was issued to, once; the id is dropped only
  after the store committed the answers, so a failed write can be retried and never loses
  an answer. They are bounded per client address (``MAX_ISSUED_PER_CLIENT``) and overall
  (``MAX_ISSUED``), so one client's flood of sessions only forgets its own questions;
* per session, a stack of the interactions it saved (for undo: the store retracts them,
  and the same question is asked again).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from ..active import CandidateGraph, RelationStore, select_queries
from ..active.learner import selection_seed
from ..active.strategies import GRAPH_STRATEGIES, PAL_STATE_KEY
from ..knn import chunk_rows
from .data import Embeddings

#: Refill the queue when fewer pairs than this are waiting: a person answers a pair in
#: about a second, a refill on a few thousand samples takes well under that.
LOW_WATER = 16
#: Pairs asked of select_queries per refill: enough for a few captcha screens and for
#: several people at once, few enough that the questions follow the answers closely
#: (PAL picks the next questions from the classes found so far).
REFILL = 48
#: A page waits at most this long for a refill before saying "no question right now".
WAIT_S = 20.0
#: Questions outstanding at once (every session holds at most one per screen); past it the
#: oldest question of the client holding the most is forgotten, so a flood of new sessions
#: cannot grow memory without bound, nor take a question off another person's screen.
MAX_ISSUED = 2000
#: Questions one client (one network address: every person on the server's own machine is
#: 127.0.0.1) holds at once; past it that client's oldest is forgotten. Two screens per
#: session: room for 100 people behind one address (a NAT, a shared machine), and a flood
#: from one address holds at most a tenth of MAX_ISSUED.
MAX_ISSUED_PER_CLIENT = 200
#: close() waits this long for the refill thread to end (a refill in progress finishes
#: first: it holds the lock close() takes), so that no thread is inside torch at exit.
CLOSE_WAIT_S = 5.0
#: Interactions a session can undo, newest first.
UNDO_DEPTH = 50
#: Nearest neighbours per sample in select_queries' candidate graph (its own default,
#: passed explicitly because ``--ef-search`` must be at least this).
SELECT_K = 10
#: Rows a captcha screen's candidates are first looked for among, most similar to the
#: anchor first: a screen needs at most MAX_CAPTCHA_K (palfast/annotate/__init__.py) rows
#: of distinct unknown components, and rows already known, on a screen or in a component
#: already shown are skipped; when these run out the search is repeated for
#: CANDIDATE_GROWTH times as many (each pass reads every row once).
CANDIDATE_POOL = 256
CANDIDATE_GROWTH = 8
#: Smallest norm a row is divided by when normalised (an all-zero row stays zero).
NORM_EPS = 1e-12

KINDS = ("pair", "captcha")


class NotIssued(LookupError):
    """The answer names a question this app did not issue to this session, or one already answered."""


@dataclass
class Question:
    qid: str
    kind: str  # "pair" or "captcha"
    anchor: int
    others: list[int]  # pair: [j]; captcha: the K candidates, in screen order
    owner: str  # session id it was issued to
    client: str = ""  # the network address it was issued to (see MAX_ISSUED_PER_CLIENT)
    issued_at: float = field(default_factory=time.time)


@dataclass
class _Saved:
    kind: str
    anchor: int
    others: list[int]
    ids: list[int]  # store log ids, what retract() takes


class Questions:
    """Hands out pair and captcha questions and records their answers (module docstring)."""

    def __init__(
        self,
        store: RelationStore,
        embeddings: Embeddings,
        n: int,
        *,
        strategy: str = "pal",
        budget: int = 500,
        captcha_k: int = 6,
        seed: int = 0,
        reask: float = 0.0,
        background: bool = True,
        index: str = "auto",
        nlist: int | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        progress=None,
    ):
        """``background=False``: no refill thread, :meth:`next` refills in the caller's thread.
        ``reask``: select_queries' share of each refill spent on asking answers again.
        ``index``, ``nlist``, ``nprobe``, ``ef_search``: select_queries' k-NN index
        (docs/annotate.md, "Large pools"); checked here, before any question, by a
        selection of no pairs (ValueError / ImportError naming the argument).
        ``progress``: called with a line of text when the k-NN graph search starts and
        ends (the CLI prints it), or None."""
        self.store = store
        self.embeddings = embeddings
        self.n = n
        self.strategy = strategy
        self.index_args = {"index": index, "nlist": nlist, "nprobe": nprobe, "ef_search": ef_search}
        # budget 0: every argument is checked, nothing is searched; on a stand-in of the
        # pool's N rows and one column (the checks need N, not the rows; the embeddings
        # were checked for NaN/Inf when read).
        select_queries(torch.zeros(n, 1), store, 0, strategy, k=SELECT_K, reask=reask, **self.index_args)
        self.reask = reask
        # Pairs a refill chose as re-asks (select_queries' reask) not yet on a screen: under
        # policy "majority" the store knows them, and they are asked all the same.
        self._reasks: set[tuple[int, int]] = set()
        self.budget = budget
        self.captcha_k = captcha_k
        self._seed = seed
        # The refills' randomness: seeded from the store's answer count (selection_seed, as
        # ActiveLearner's rounds), so a restarted server does not repeat the draws of the run
        # before it; refills at the same count continue one stream (docs/annotate.md).
        self._gen: torch.Generator | None = None
        self._gen_at = -1  # the answer count self._gen was seeded at
        # pal's exploration state (select_queries' ``state``): the refills are the
        # consecutive calls of one selection, so its seed credit and its "stop exploring"
        # carry over from one to the next, and across a restart: it is saved in the store
        # after each refill and loaded here (docs/annotate.md).
        self._select_state: dict = (store.load_state(PAL_STATE_KEY) if strategy == "pal" else None) or {}
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # refill done / refill wanted
        self._pending: deque[tuple[int, int]] = deque()
        self._version = None  # embeddings version the pending pairs were chosen on
        self._issued: dict[str, Question] = {}
        self._by_client: dict[str, dict[str, None]] = {}  # client -> its qids, oldest first
        self._by_owner: dict[tuple[str, str], str] = {}  # (owner, kind) -> qid on its screen
        self._undo: dict[str, deque[_Saved]] = {}
        self._again: dict[tuple[str, str], _Saved] = {}  # (owner, kind) -> undone, ask again
        self._saved_count: dict[str, int] = {}
        self._want_refill = True
        self._closed = False
        self.exhausted = False  # select_queries found no unknown pair left
        self._last_added: int | None = None  # pairs the last refill added
        self.refill_error: str | None = None
        self._rng = np.random.default_rng(seed)
        self._progress = progress
        self._graph: tuple[int, CandidateGraph] | None = None  # (embeddings version, graph)
        self.preparing: str | None = None  # what the graph search is doing, for the page
        self._background = background
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._refill_loop, name="palfast-annotate-refill", daemon=True)
            self._thread.start()

    # ---------------------------------------------------------------- refill
    def _embeddings_tensor(self):
        """What select_queries chooses on: the embeddings array as it is (a memory-mapped
        file is read in chunks there, never copied whole)."""
        x, _ = self.embeddings.get()
        if x is None:  # strategy "random" without embeddings: select_queries ignores the values
            return torch.zeros(self.n, 1)
        return x

    def _sync(self) -> None:
        """Pick up other processes' answers and a refreshed embeddings file (holds the lock)."""
        self.store.refresh()
        self.embeddings.poll()
        version = self.embeddings.get()[1]
        if version != self._version:
            self._version = version
            self._pending.clear()  # chosen on the old embeddings: choose again
            self._reasks.clear()
            self.exhausted = False
            self._want_refill = True
            self._changed.notify_all()

    def _say(self, text: str) -> None:
        if self._progress is not None:
            self._progress(text)

    def _candidate_graph(self):
        """``(version, graph)``: the candidate graph of the current embeddings and their
        version (graph None for the strategies without one). Searched here, outside the
        lock, only when the embeddings changed since the last search."""
        with self._lock:
            self._sync()
            x, version = self.embeddings.get()
            if self.strategy not in GRAPH_STRATEGIES or x is None:
                return version, None
            if self._graph is not None and self._graph[0] == version:
                return self._graph
            self._graph = None  # the old one is of other embeddings: let it go first
            self.preparing = (
                f"Preparing the questions: searching the nearest neighbours of "
                f"{self.n:,} samples (started {time.strftime('%H:%M:%S')})."
            )
        self._say(
            f"searching the k-NN graph of {self.n:,} samples (--index {self.index_args['index']}); "
            f"questions are served once it is done"
        )
        start = time.monotonic()
        try:
            graph = CandidateGraph(x, k=SELECT_K, **self.index_args).prepare(self.strategy)
        finally:
            with self._lock:
                self.preparing = None
        self._say(f"k-NN graph searched in {time.monotonic() - start:.1f} s")
        with self._lock:
            self._graph = (version, graph)
        return version, graph

    def refill(self) -> int:
        """One refill, in the caller's thread; returns the number of pairs added."""
        while True:
            try:
                version, graph = self._candidate_graph()
                with self._lock:
                    # In the try too: a store that cannot be read now (a lost PostgreSQL
                    # connection) is reported like any failed refill, and the background
                    # thread lives on to refill once the store answers again.
                    self._sync()
                    if self.embeddings.get()[1] == version:  # else new embeddings came meanwhile
                        return self._select(graph)
            except Exception as e:  # as a failed selection: the page shows the reason
                with self._lock:
                    self.refill_error = f"{type(e).__name__}: {e}"
                    self._last_added = 0
                    self._want_refill = False
                    self._changed.notify_all()
                return 0

    def _select(self, graph: CandidateGraph | None) -> int:
        """The refill proper, holding the lock: ask select_queries for REFILL more pairs."""
        with self._lock:
            added = 0
            try:
                busy = self._busy_pairs()
                have = set(self._pending) | busy
                n_queries = self.store.n_queries
                if n_queries != self._gen_at:
                    self._gen = torch.Generator().manual_seed(selection_seed(self._seed, n_queries))
                    self._gen_at = n_queries
                # The graph carries the index arguments (checked when it was built).
                how = {"graph": graph} if graph is not None else self.index_args
                got = select_queries(
                    self._embeddings_tensor(),
                    self.store,
                    REFILL,
                    self.strategy,
                    k=SELECT_K,
                    generator=self._gen,
                    state=self._select_state if self.strategy == "pal" else None,
                    reask=self.reask,
                    **how,
                )
                if self.reask:  # re-asks of known pairs (policy "majority") are usable
                    self._reasks.update(map(tuple, got[self.store.known_mask(got)].tolist()))
                for i, j in got.tolist():
                    if (i, j) not in have:
                        self._pending.append((i, j))
                        have.add((i, j))
                        added += 1
                self.exhausted = got.shape[0] == 0
                if self.strategy == "pal":  # after the pairs are queued: a failure keeps them
                    self.store.save_state(PAL_STATE_KEY, self._select_state)
                self.refill_error = None
            except Exception as e:  # keep serving what is pending; the page shows the reason
                self.refill_error = f"{type(e).__name__}: {e}"
            finally:
                self._last_added = added
                self._want_refill = False
                self._changed.notify_all()
            return added

    def _refill_loop(self) -> None:
        while True:
            with self._lock:
                while not (self._want_refill or self._closed):
                    self._changed.wait()
                if self._closed:
                    return
            self.refill()

    def close(self) -> None:
        """Stop the refill thread and wait for it (idempotent)."""
        with self._lock:
            self._closed = True
            self._changed.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(CLOSE_WAIT_S)

    # ----------------------------------------------------------------- issue
    def _busy_pairs(self) -> set[tuple[int, int]]:
        """Pairs on someone's screen, (min, max) ordered like select_queries' output."""
        return {(min(q.anchor, o), max(q.anchor, o)) for q in self._issued.values() for o in q.others}

    def _usable(self, i: int, j: int, busy) -> bool:
        pair = (min(i, j), max(i, j))
        return pair not in busy and (pair in self._reasks or not self.store.is_known(i, j))

    def next(self, kind: str, owner: str, client: str = "") -> Question | None:
        """The question for ``owner``'s ``kind`` screen: the one already on it, the one it
        undid, or a new one. None when the budget is spent or nothing is left to ask.
        ``client``: where the request came from (its network address); the questions
        outstanding are bounded per client (MAX_ISSUED_PER_CLIENT), then overall
        (MAX_ISSUED, taken from the client holding the most)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        with self._lock:
            self._sync()
            qid = self._by_owner.get((owner, kind))
            if qid in self._issued:
                return self._issued[qid]
            if self.store.n_queries >= self.budget:
                return None
            busy = self._busy_pairs()
            again = self._again.pop((owner, kind), None)
            if again is not None:
                others = [o for o in again.others if self._usable(again.anchor, o, busy)]
                if others:
                    return self._issue(kind, owner, client, again.anchor, others)
            deadline = time.monotonic() + WAIT_S
            while True:
                while self._pending:
                    i, j = self._pending.popleft()
                    if self._usable(i, j, busy):
                        self._reasks.discard((i, j))  # asked once: known again from now on
                        if len(self._pending) < LOW_WATER:
                            self._want_refill = True
                            self._changed.notify_all()
                        if kind == "pair":
                            return self._issue(kind, owner, client, i, [j])
                        return self._issue(kind, owner, client, i, self._candidates(i, j, busy))
                if self.exhausted and not self._want_refill:
                    return None
                self._want_refill = True
                if not self._background:  # tests: refill here, deterministically
                    if self.refill() == 0:
                        return None
                    busy = self._busy_pairs()
                    continue
                self._changed.notify_all()
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(timeout=left)
                if not self._pending and not self._want_refill and self._last_added == 0:
                    return None  # every unknown pair is on someone's screen: ask again later
                busy = self._busy_pairs()

    def _candidates(self, anchor: int, first: int, busy) -> list[int]:
        """``first`` (select_queries' choice) and the anchor's most similar unknown samples,
        one per known component (two members of one class would ask the same thing twice),
        in random screen order."""
        chosen = [first]
        comps = {int(self.store.roots([first])[0]), int(self.store.roots([anchor])[0])}
        x = self.embeddings.get()[0]
        order = self._rng.permutation(self.n).tolist() if x is None else _most_similar(x, anchor)
        for j in order:
            if len(chosen) >= self.captcha_k:
                break
            if j == anchor or j == first or not self._usable(anchor, j, busy):
                continue
            root = int(self.store.roots([j])[0])
            if root in comps:
                continue
            comps.add(root)
            chosen.append(j)
        self._rng.shuffle(chosen)
        return chosen

    def _forget(self, qid: str) -> Question:
        """Drop the issued question ``qid`` from every index."""
        q = self._issued.pop(qid)
        if self._by_owner.get((q.owner, q.kind)) == qid:
            del self._by_owner[(q.owner, q.kind)]
        mine = self._by_client[q.client]
        del mine[qid]
        if not mine:
            del self._by_client[q.client]
        return q

    def _issue(self, kind: str, owner: str, client: str, anchor: int, others: list[int]) -> Question:
        # Dicts keep insertion order: a client's first qid is its oldest question.
        while len(self._by_client.get(client, ())) >= MAX_ISSUED_PER_CLIENT:
            self._forget(next(iter(self._by_client[client])))
        while len(self._issued) >= MAX_ISSUED:
            most = max(self._by_client.values(), key=len)
            self._forget(next(iter(most)))
        q = Question(secrets.token_urlsafe(16), kind, anchor, list(others), owner, client)
        self._issued[q.qid] = q
        self._by_owner[(owner, kind)] = q.qid
        self._by_client.setdefault(client, {})[q.qid] = None
        return q

    def get(self, qid: str, owner: str) -> Question:
        """The issued question ``qid`` of ``owner``, or :class:`NotIssued`."""
        with self._lock:
            q = self._issued.get(qid)
            if q is None or not secrets.compare_digest(q.owner, owner):
                raise NotIssued(
                    "this question was not issued to this session, or it was already "
                    "answered: reload the page for the next one"
                )
            return q

    # ---------------------------------------------------------------- answer
    def answer(self, qid: str, owner: str, name: str, answers: list[bool] | None) -> list[int]:
        """Record the answers to question ``qid`` (``None``: skipped, nothing recorded) under
        ``name`` as the store's source. Returns the store's log ids; when this returns they
        are on disk. Raises :class:`NotIssued` for a question not issued to ``owner``."""
        with self._lock:
            q = self.get(qid, owner)
            if answers is not None and len(answers) != len(q.others):
                raise ValueError(f"expected {len(q.others)} answers, got {len(answers)}")
            ids: list[int] = []
            if answers is not None:
                ids = self.store.record([[q.anchor, o] for o in q.others], answers, source=name)
            # Only now, after the commit: a failed write leaves the question answerable.
            self._forget(qid)
            if ids:
                stack = self._undo.setdefault(owner, deque(maxlen=UNDO_DEPTH))
                stack.append(_Saved(q.kind, q.anchor, q.others, ids))
                self._saved_count[owner] = self._saved_count.get(owner, 0) + len(ids)
            return ids

    def undo(self, owner: str, name: str) -> _Saved | None:
        """Retract ``owner``'s last saved interaction (all its answers); it is asked again
        next on its screen. None when there is nothing to undo."""
        with self._lock:
            stack = self._undo.get(owner)
            if not stack:
                return None
            last = stack[-1]
            self.store.retract(last.ids, source=name)
            stack.pop()
            self._saved_count[owner] -= len(last.ids)
            # The question on that screen now is put back in the queue; the undone one is next.
            qid = self._by_owner.get((owner, last.kind))
            if qid in self._issued:
                q = self._forget(qid)
                self._pending.extendleft((min(q.anchor, o), max(q.anchor, o)) for o in q.others[:1])
            self._again[(owner, last.kind)] = last
            return last

    # ----------------------------------------------------------------- stats
    def agreement(self, name: str) -> dict | None:
        """What the page's header shows of the person ``name`` (the source of their
        answers): the store's :meth:`~palfast.active.RelationStore.annotators` entry
        (``answers``, ``repeated``, ``agreement`` with the majority, ``contradictions``)
        as a dict, None before their first answer."""
        with self._lock:
            self.store.refresh()
            mine = self.store.annotators().get(name)
        return None if mine is None else mine._asdict()

    def stats(self, owner: str) -> dict:
        with self._lock:
            self.store.refresh()
            roots = self.store.roots(torch.arange(self.n)).numpy()
            # A root is a member of its component (a sample id < n): a count per id, O(N),
            # where np.unique would sort every sample on each page view.
            sizes = np.bincount(roots, minlength=self.n)
            stack = self._undo.get(owner) or ()
            return {
                "answered": self.store.n_queries,
                "budget": self.budget,
                "classes": int((sizes > 1).sum()),
                "components": int((sizes > 0).sum()),
                "n": self.n,
                "mine": self._saved_count.get(owner, 0),
                "can_undo": bool(stack),
                "last_ids": list(stack[-1].ids) if stack else [],
                "embeddings_error": self.embeddings.error,
                "refill_error": self.refill_error,
                "preparing": self.preparing,
            }


def _norms(x: np.ndarray) -> np.ndarray:
    """L2 norms of the rows of ``x`` (float32), at least NORM_EPS."""
    return np.maximum(np.sqrt(np.einsum("ij,ij->i", x, x)), NORM_EPS)


def cosine_to(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Cosine similarities of the rows of ``x`` to the unit vector ``v``, in float32:
    ``(x v) / |x|`` (zero rows: 0), so the rows are read once and never copied
    normalised (float16 / float64 rows are converted to float32 first)."""
    x = np.asarray(x, dtype=np.float32)
    return (x @ v) / _norms(x)


def _top(x: np.ndarray, v: np.ndarray, m: int) -> np.ndarray:
    """The m rows of ``x`` with the largest cosine similarity to the unit vector ``v``,
    most similar first, ties by row: the first m of a stable sort of all N, computed
    :func:`palfast.knn.chunk_rows` rows at a time (O(N·D) time, one chunk of memory)."""
    step = chunk_rows(x.shape[1])
    sims, rows = [], []
    for a in range(0, x.shape[0], step):
        s = cosine_to(x[a : a + step], v)
        if s.shape[0] > m:
            # The chunk's first m in stable order: all above the m-th largest value, then
            # the lowest rows equal to it (np.nonzero lists them in row order).
            t = np.partition(s, s.shape[0] - m)[s.shape[0] - m]
            above = np.nonzero(s > t)[0]
            keep = np.concatenate([above, np.nonzero(s == t)[0][: m - above.shape[0]]])
        else:
            keep = np.arange(s.shape[0])
        sims.append(s[keep])
        rows.append(keep + a)
    sims, rows = np.concatenate(sims), np.concatenate(rows)
    return rows[np.lexsort((rows, -sims))[:m]]


def _most_similar(x: np.ndarray, anchor: int):
    """Every row of ``x`` (the anchor included), most cosine-similar to row ``anchor``
    first, ties by row, lazily: the first CANDIDATE_POOL by one pass over the rows, then
    CANDIDATE_GROWTH times as many per further pass, never a sort of all N rows unless
    that many are asked for."""
    v = np.asarray(x[anchor], dtype=np.float32)
    v = v / _norms(v[None])[0]
    done, m = 0, CANDIDATE_POOL
    while done < x.shape[0]:
        m = min(m, x.shape[0])
        ranked = _top(x, v, m)
        yield from ranked[done:].tolist()
        done, m = m, m * CANDIDATE_GROWTH
