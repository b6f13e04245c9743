"""RelationStore: every answer an oracle ever gave, crash-safe in SQLite (docs/active.md).

An answer is "sample i and sample j are alike" (positive) or "are not" (negative),
about global sample ids i ≠ j (any int64 ≥ 0; nothing is sized by the largest id).
The store keeps (the log in :mod:`palfast.active.answer_log`, the relation in
:mod:`palfast.active.relation`; this module joins them)

* an **append-only log** of answers and of **retractions** (:meth:`RelationStore.retract`
  supersedes earlier answers, an "undo" used by ``palfast annotate``, by appending a
  record, never by editing the log), every row checksummed (see
  :mod:`palfast.active.answer_log`). The relation, :meth:`RelationStore.answers` and
  :attr:`RelationStore.n_queries` are those of the log without the retracted answers;
  :meth:`RelationStore.log` lists every row with who retracted it;
* a **union-find** over positive answers (transitivity: i~j, j~k ⇒ i~k), over dense
  indices (a dict maps sample id → index, in order of first appearance);
* **cannot-link** pairs between components from negative answers, propagated by
  construction: the negative is stored between the two *components*, so
  A~B and B≁C give A≁C, and merging two components merges their cannot-links;
* a **strategy state** per key (:meth:`RelationStore.save_state`), e.g. ``"pal"``'s
  exploration, saved with the answers it goes with (``record(..., state=)``).

The guarantees of the file-backed store (durability, detection of lost acknowledged
answers, integrity checks, several processes, ``readonly=True``, foreign files and older
schemas) are those of its log: see :mod:`palfast.active.answer_log`.

Answers that disagree (a noisy oracle, people who make mistakes) are resolved by the
store's ``policy`` (:mod:`palfast.active.policy`; docs/active.md, "Answers from people
who make mistakes"), a property of how the log is read, not of the file:

* ``"first"`` (default): answers are applied in log order; one that contradicts what
  the answers before it imply (i~j after i≁j was implied, or the reverse) is logged
  but does not change the relation: the first answer wins;
* ``"majority"``: each pair {i, j} counts with its majority answer (a tie gives it no
  answer: unknown unless other pairs imply it), the pairs applied as under ``"first"``
  in the order of their earliest answer;
* ``"confirm"``: as ``"first"``, but an "alike" answer that would join two components
  of more than one sample each waits (:meth:`RelationStore.unconfirmed`) until a second
  "alike" answer across them confirms it; a "different" one across them drops it.

A *contradiction* is an answer (not retracted) whose pair the relation knows with the
opposite answer; under ``"first"`` these are the answers that contradicted what was
known when they arrived. :meth:`RelationStore.record` warns with
:class:`ContradictionWarning` about the new ones, :meth:`RelationStore.contradictions`
lists them and :attr:`RelationStore.n_conflicts` counts them;
:meth:`RelationStore.annotators` gives each source's answers, agreement with the
majority and contradictions.

Example::

    >>> import torch
    >>> from palfast.active import RelationStore
    >>> store = RelationStore()                       # in memory; pass a path to persist
    >>> store.record(torch.tensor([[0, 1], [1, 2], [2, 3]]), torch.tensor([True, True, False]))
    [1, 2, 3]
    >>> store.same(0, 2), store.same(0, 3), store.same(0, 4)
    (True, False, None)
    >>> store.graph(torch.tensor([0, 2, 3, 4])).to_dense()
    tensor([[0., 1., 0., 0.],
            [1., 0., 0., 0.],
            [0., 0., 0., 0.],
            [0., 0., 0., 0.]])
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import NamedTuple

import numpy as np
import torch

from .._checks import check_bool, check_number

# ACKED_SUFFIX, APPLICATION_ID, SCHEMA_VERSION, row_crc and MAX_IMPLICIT_IDS are
# imported from here by users and tests: this module keeps offering them.
from .answer_log import (  # noqa: F401
    _MAX_TIMEOUT,
    ACKED_SUFFIX,
    APPLICATION_ID,
    SCHEMA_VERSION,
    AnswerLog,
    NewRows,
    SalvageReport,
    SQLiteAnswerLog,
    StoreCorruptError,
    StoreError,
    row_crc,
    source_bytes,
    state_text,
)
from .answer_log import salvage as _salvage
from .policy import POLICIES, ReaskCandidates, check_policy, make_relation  # noqa: F401
from .postgres_log import PostgresAnswerLog, is_postgres_url, shown
from .relation import MAX_IMPLICIT_IDS, Relation, as_pairs  # noqa: F401

__all__ = [
    "AnnotatorStats",
    "ContradictionWarning",
    "RelationStore",
    "SalvageReport",
    "StoreCorruptError",
    "StoreError",
]


class ContradictionWarning(UserWarning):
    """:meth:`RelationStore.record` logged answers that contradict what the store knows
    (kept in the log; the relation does not follow them; see
    :meth:`RelationStore.contradictions`)."""


class AnnotatorStats(NamedTuple):
    """What one source (who answered) contributed, from :meth:`RelationStore.annotators`.

    * ``answers``: its answers in the log, retracted ones left out;
    * ``repeated``: those of them about a pair {i, j} answered more than once (by anyone)
      that has a majority answer (more "alike" than "different" answers: alike; fewer:
      different). An answer about a tied pair (as many of each) agrees with no majority:
      it is counted in ``answers`` only, neither for nor against the agreement;
    * ``agreement``: the fraction of the ``repeated`` answers that agree with their
      pair's majority answer, None when ``repeated`` is 0;
    * ``contradictions``: its answers that are contradictions under the store's policy
      (in :meth:`RelationStore.contradictions`).
    """

    answers: int
    repeated: int
    agreement: float | None
    contradictions: int


def _query(name: str, part: str = "_relation"):
    """The method ``name`` of :class:`Relation`, asked of the store's ``part``: the
    relation (``"_relation"``) or the answers read through the policy (``"_answers"``),
    with the same docstring and signature."""
    method = getattr(Relation, name)
    if isinstance(method, property):
        return property(lambda self: getattr(getattr(self, part), name), doc=method.__doc__)

    @functools.wraps(method)
    def ask(self, *args, **kw):
        return getattr(getattr(self, part), name)(*args, **kw)

    return ask


def _pair_groups(pairs: np.ndarray) -> np.ndarray:
    """The unordered pair {i, j} of each row of ``pairs [Q, 2]``: ``group [Q]``, one
    number per distinct pair (a sort, no hashing)."""
    return np.unique(np.sort(pairs, axis=1), axis=0, return_inverse=True)[1].reshape(-1)


class RelationStore:
    """Answers of an oracle about pairs of samples, with transitive closure.

    Args:
        path: SQLite file to create or resume, or a ``postgresql://`` URL; ``None``
            keeps everything in memory.
        policy: how answers that disagree are resolved when the log is read:
            ``"first"`` (default), ``"majority"`` or ``"confirm"`` (module docstring;
            docs/active.md, "Answers from people who make mistakes"). Not stored in the
            file: other processes may read the same log with another policy.
        timeout: seconds a writer waits for another process's lock (busy timeout),
            a finite number ``0 <= timeout <= 2e6``.
        readonly: open an existing file with SQLite's ``mode=ro``: the file is never
            written, :meth:`record`, :meth:`retract` and :meth:`save_state` raise
            :class:`StoreError`,
            :meth:`refresh` still sees what other processes append.
        accept_loss: open a store although rows that ``<path>-acked`` records as
            acknowledged are missing (a damaged, truncated or deleted ``-wal``), or
            although ``<path>-acked`` itself is damaged, and continue with the rows
            that are left; a writable open then rewrites ``<path>-acked`` to match them,
            so later opens need no flag. Without it such a store raises
            :class:`StoreCorruptError`. Prefer restoring a backup that has the rows.

    Raises:
        StoreError: missing or unreadable/unwritable directory, lock held too long.
        StoreCorruptError: the file fails its integrity checks (see :meth:`salvage`),
            or acknowledged rows are missing (see ``accept_loss``).
        ValueError: the file is not a RelationStore, or a newer schema version; an
            unknown ``policy``.

    See the module docstrings (this one and :mod:`palfast.active.answer_log`) for the
    guarantees. Use as a context manager or call :meth:`close` to release the file.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        policy: str = "first",
        timeout: float = 30.0,
        readonly: bool = False,
        accept_loss: bool = False,
    ):
        timeout = check_number("RelationStore", "timeout", timeout, 0.0, maximum=_MAX_TIMEOUT)
        self.readonly = check_bool("RelationStore", "readonly", readonly)
        accept_loss = check_bool("RelationStore", "accept_loss", accept_loss)
        self.policy = check_policy("RelationStore", policy)
        self.path = None if path is None else os.fspath(path)
        # The answers read through the policy, and the relation they imply (one object
        # under "first": the answers feed the union-find directly, as they always did).
        self._answers = make_relation(self.policy, "RelationStore")
        self._relation: Relation = self._answers.relation
        # Read when annotators() is first asked: the sources in order of first sight
        # (source -> code) and the code of the source of answer id k + 1.
        self._source_code: dict[str, int] = {}
        self._source_of: list[int] = []
        self._annotators: dict | None = None
        if self.readonly and self.path is None:
            raise ValueError("RelationStore: readonly=True needs the path of an existing store")
        self._log: AnswerLog
        if is_postgres_url(self.path):
            if accept_loss:
                raise ValueError(
                    "RelationStore: accept_loss applies to SQLite stores (their "
                    "'-acked' record); a PostgreSQL store has none"
                )
            self._log = PostgresAnswerLog(self.path, timeout=timeout, readonly=self.readonly)
        else:
            self._log = SQLiteAnswerLog(self.path, timeout=timeout, readonly=self.readonly, accept_loss=accept_loss)
        self._apply_new(self._log.load())

    def _apply_new(self, new: NewRows) -> list[int]:
        """Apply what the log read; returns the positions (in :meth:`answers`) of the
        answers among them that contradicted what was known."""
        if new.rebuild:
            self._answers.clear()
        if new.answers or new.retractions:
            self._annotators = None
        retracted = self._log.retracted
        return self._answers.extend((i, j, a) for seq, i, j, a, _, _ in new.answers if seq not in retracted)

    def close(self) -> None:
        """Close the database (idempotent). Everything recorded is already on disk;
        queries on the loaded relation keep working, :meth:`record`, :meth:`refresh`
        and :meth:`backup` raise :class:`StoreError`."""
        self._log.close()

    def __enter__(self) -> RelationStore:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------- recording
    def record(self, pairs, answers, source: str = "oracle", *, state: dict | None = None) -> list[int]:
        """Append answers to the log (one transaction) and update the relation.

        Args:
            pairs: ``[Q, 2]`` integer sample ids (int64 ≥ 0), ``i != j`` in each row.
            answers: ``[Q]`` bool, True = "alike".
            source: free text stored with each answer (e.g. ``"oracle"``, ``"prior"``).
            state: ``{key: value}`` saved as :meth:`save_state` does, in the same
                transaction as the answers (a strategy's state that these answers go with).

        Returns the log ids of the new rows, in order (what :meth:`retract` takes).
        When this returns the answers are durable (file-backed store) and recorded
        as acknowledged in ``<path>-acked`` (see :mod:`palfast.active.answer_log`).
        Answers that are contradictions once applied (under the store's ``policy``) are
        kept and warned about (:class:`ContradictionWarning`). On any error nothing of
        this call is recorded.
        """
        where = "RelationStore.record"
        p = as_pairs(pairs)
        a = torch.as_tensor(answers)
        if a.dim() != 1 or a.shape[0] != p.shape[0]:
            raise ValueError(
                f"{where}: answers must be a [Q] vector with Q = "
                f"{p.shape[0]} (one per pair), got shape {tuple(a.shape)}"
            )
        if (
            a.numel()
            and a.dtype != torch.bool
            and (a.dtype.is_floating_point or a.dtype.is_complex or not bool(((a == 0) | (a == 1)).all()))
        ):
            raise TypeError(f"{where}: answers must be bool (or 0/1 integers), got {a.dtype}")
        source_bytes(where, source)
        texts = self._state_texts(where, state)
        if p.numel() and bool((p[:, 0] == p[:, 1]).any()):
            q = int((p[:, 0] == p[:, 1]).nonzero()[0, 0])
            raise ValueError(
                f"{where}: pairs must join two different samples, got pair {q} = ({int(p[q, 0])}, {int(p[q, 1])})"
            )
        if p.numel() == 0:
            self._log.check_writable(where)
            if texts:
                self._log.save_state(where, texts)
            return []
        new, ids = self._log.append(where, p.tolist(), a.tolist(), source, texts)
        conflicts = self._apply_new(new)
        # Our rows are the last of the log (never retracted yet): their conflicts are
        # those at positions from n_queries - len(ids) on.
        mine = [c for c in conflicts if c >= self.n_queries - len(ids)]
        if mine:
            i, j, ans = self._answers.answer_at(mine[0])
            warnings.warn(
                f"{where}: {len(mine)} of {len(ids)} answers contradict what the store "
                f"knows (first: ({i}, {j}) answered {'alike' if ans else 'different'}, "
                f"known {'different' if ans else 'alike'}). They are kept in the log and the "
                f"relation does not follow them (policy {self.policy!r}); see "
                f"RelationStore.contradictions()",
                ContradictionWarning,
                stacklevel=2,
            )
        return ids

    # --------------------------------------------------------- strategy state
    def save_state(self, key: str, value: dict) -> None:
        """Save a strategy's state ``value`` under ``key`` (e.g. ``"pal"``: what
        :func:`select_queries` carries from call to call), replacing the earlier value:
        one transaction, durable on return like :meth:`record`, checksummed. ``value``
        must be a dict of JSON types only (dicts with str keys, lists, str, int, finite
        float, bool, None; TypeError/ValueError otherwise), so that :meth:`load_state`
        gives back an equal value of the same types. Processes sharing the store share
        the keys: the last save of a key wins. Raises :class:`StoreError` on a
        read-only or closed store."""
        where = "RelationStore.save_state"
        self._log.save_state(where, {key: state_text(where, key, value)})

    def load_state(self, key: str) -> dict | None:
        """The value last saved under ``key`` (:meth:`save_state`, or ``record(...,
        state=)``), read and verified from the store now; None when none was saved (or
        a store of schema 3 or older opened read-only). Raises
        :class:`StoreCorruptError` when the saved row fails its checksum."""
        where = "RelationStore.load_state"
        state_text(where, key, {})  # the key's check
        return self._log.load_state(where, key)

    @staticmethod
    def _state_texts(where: str, state) -> dict[str, str]:
        if state is None:
            return {}
        if type(state) is not dict:
            raise TypeError(f"{where}: state must be a dict {{key: value}} or None, got {type(state).__name__}")
        return {key: state_text(where, key, value, f"state[{key!r}]") for key, value in state.items()}

    def retract(self, answer_ids, source: str = "oracle") -> None:
        """Supersede earlier answers (undo): appends one retraction per answer id, in one
        transaction, and rebuilds the relation from the log without them. The answers
        stay in the log (see :meth:`log`); :meth:`answers`, :attr:`n_queries` and the
        relation leave them out. Each id must be a log id (what :meth:`record` returned)
        not yet retracted; on any error nothing is retracted."""
        where = "RelationStore.retract"
        t = torch.as_tensor(answer_ids).reshape(-1)
        if t.numel() and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
            raise TypeError(f"{where}: answer_ids must be integer log ids, got {t.dtype}")
        ids = t.tolist()
        if len(set(ids)) != len(ids):
            raise ValueError(f"{where}: answer_ids repeat an id: {ids}")
        source_bytes(where, source)
        if not ids:
            self._log.check_writable(where)
            return
        self._apply_new(self._log.retract(where, ids, source))

    def refresh(self) -> int:
        """Apply the answers and retractions other processes appended since we last
        looked; returns how many rows (of both tables) were new."""
        before = self._log.last_answer
        new = self._log.read_new("RelationStore.refresh")
        self._apply_new(new)
        return self._log.last_answer - before + len(new.retractions)

    def log(self) -> list[tuple]:
        """Every answer of the log, retracted ones included, read (and verified) from the
        file, in id order: ``(id, i, j, answer: bool, time, source, retracted_by)`` where
        ``retracted_by`` is the source of the retraction, or None."""
        return self._log.rows("RelationStore.log")

    # --------------------------------------------------------------- queries
    n_queries = _query("n_queries", "_answers")
    num_ids = _query("num_ids")
    ids = _query("ids")
    same = _query("same")
    is_known = _query("is_known")
    known_mask = _query("known_mask")
    roots = _query("roots")
    components = _query("components")
    answers = _query("answers", "_answers")
    graph = _query("graph")

    @property
    def n_conflicts(self) -> int:
        """Number of contradictions (:meth:`contradictions`)."""
        return self._answers.n_conflicts

    def contradictions(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The contradictions, in log order: ``(positions LongTensor [C], pairs
        LongTensor [C, 2], answers BoolTensor [C])``, ``positions`` into :meth:`answers`.

        A contradiction is an answer (not retracted) whose pair the relation knows with
        the opposite answer: it is in the log, and the relation does not follow it.
        ``"first"``: the answers that contradicted what the answers before them implied
        (the relation only grows, so this never changes until a retraction).
        ``"majority"``: the answers their pair's majority, or the pairs before it by
        transitivity, overruled; a later answer can turn an earlier one into a
        contradiction or back. ``"confirm"``: as ``"first"``; an answer whose merge is
        pending (:meth:`unconfirmed`) is not one, and becomes one when a "different"
        answer drops its merge."""
        return self._answers.contradictions()

    def unconfirmed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The "alike" answers whose merge waits for a confirming answer (policy
        ``"confirm"``; empty under the others), in log order: ``(ids LongTensor [P],
        pairs LongTensor [P, 2])``, ``ids`` the log ids (what :meth:`record` returned,
        what :meth:`retract` takes). Asking a pair again, or any pair across the same
        two components, confirms or drops the merge."""
        if self.policy != "confirm":
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, 2, dtype=torch.long)
        positions, pairs = self._answers.unconfirmed()
        return torch.from_numpy(self._log_ids()[positions.numpy()]), pairs

    def reask_candidates(self) -> ReaskCandidates:
        """The answers that asking the same pair again could overturn, what
        :func:`palfast.active.select_queries` re-asks (its ``reask``): a
        :class:`~palfast.active.policy.ReaskCandidates` ``(pairs [P, 2], consequence [P],
        single [P], contested [P])``, the consequence being the number of sample pairs
        the answer joins (or would join), |C_i|·|C_j|; ``single`` when one of the two
        components was one sample; ``contested`` when the pair's answers tie (policy
        ``"majority"``: no answer applied; the next one settles it).

        * ``"confirm"``: one pair per pending merge (:meth:`unconfirmed`), the pair of
          its earliest waiting answer, with the sizes of the two components now (never
          single: an "alike" answer touching one sample is applied at once);
        * ``"majority"``: the pairs whose majority answer "alike" joined two components,
          a single sample too, with their sizes when it joined them, while the majority
          rests on one vote (one more "alike" answer than "different"); then the tied
          pairs the relation does not know, ``contested``, with the sizes of their
          components now (see
          :meth:`palfast.active.policy.MajorityRelation.reask_candidates`);
        * ``"first"``: none (a repeated answer changes nothing)."""
        if self.policy == "first":
            return ReaskCandidates.of([])
        return self._answers.reask_candidates()

    def _log_ids(self) -> np.ndarray:
        """The log id of each answer of :meth:`answers` (position -> id): the ids read so
        far without the retracted ones."""
        ids = np.arange(1, self._log.last_answer + 1, dtype=np.int64)
        if self._log.retracted:
            ids = ids[~np.isin(ids, np.fromiter(self._log.retracted, dtype=np.int64))]
        return ids

    def annotators(self) -> dict[str, AnnotatorStats]:
        """Per source (who answered; :meth:`record`'s ``source``), what its answers
        contributed: ``{source: AnnotatorStats(answers, repeated, agreement,
        contradictions)}`` (see :class:`AnnotatorStats`), over the answers not
        retracted, sources in order of their first answer. Works under every policy; the
        majority is the one of policy ``"majority"`` whatever the store's policy,
        ``contradictions`` are the store's.

        The sources are read from the log the first time (then only the new rows), so
        this raises :class:`StoreError` on a closed store that never read them."""
        if self._annotators is None:
            self._annotators = self._count_annotators()
        return dict(self._annotators)

    def _count_annotators(self) -> dict[str, AnnotatorStats]:
        last = self._log.last_answer
        if len(self._source_of) < last:  # read the sources of the rows not read yet
            rows = self._log.rows("RelationStore.annotators", after=len(self._source_of))
            code = self._source_code
            self._source_of += [code.setdefault(row[5], len(code)) for row in rows if row[0] <= last]
        pairs, alike = (t.numpy() for t in self._answers.answers())
        if alike.size == 0:
            return {}
        who = np.asarray(self._source_of, dtype=np.int64)[self._log_ids() - 1]
        pair = _pair_groups(pairs)
        n_alike, n_all = np.bincount(pair, weights=alike), np.bincount(pair)
        majority, decided = 2 * n_alike > n_all, 2 * n_alike != n_all  # a tie: no majority
        repeated = (n_all[pair] > 1) & decided[pair]
        agrees = repeated & (alike == majority[pair])
        conflict = np.zeros(alike.size, dtype=bool)
        conflict[self._answers.contradictions()[0].numpy()] = True
        count = functools.partial(np.bincount, who, minlength=len(self._source_code))
        n, n_rep, n_agree, n_conf = count(), count(repeated), count(agrees), count(conflict)
        names = list(self._source_code)
        present, first = np.unique(who, return_index=True)
        return {
            names[s]: AnnotatorStats(
                int(n[s]), int(n_rep[s]), float(n_agree[s] / n_rep[s]) if n_rep[s] else None, int(n_conf[s])
            )
            for s in present[np.argsort(first)]
        }

    # ------------------------------------------------------- copies, recovery
    def backup(self, path: str | os.PathLike) -> None:
        """Copy the store, WAL content included, into a new file ``path`` (SQLite's online
        backup API: a consistent snapshot even while other processes write). ``path``
        must not exist. The copy is verified by opening it read-only.

        Copying the main file alone (``cp answers.sqlite``) can lose the answers that
        are still in ``answers.sqlite-wal``: use this, or copy while no process has the
        store open and after one closed it cleanly."""
        self._log.backup("RelationStore.backup", os.fspath(path))

    salvage = staticmethod(_salvage)

    def __repr__(self) -> str:
        path = shown(self.path) if is_postgres_url(self.path) else self.path
        return (
            f"RelationStore(path={path!r}, policy={self.policy!r}, n_queries={self.n_queries}, "
            f"components={self._relation.n_components()}, conflicts={self.n_conflicts}"
            f"{', readonly' if self.readonly else ''})"
        )
