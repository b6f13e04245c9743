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

Contradictions (a noisy oracle saying i~j after i≁j was implied, or the reverse)
are logged like any answer but do not change the relation: the first answer
wins, in log order. :meth:`RelationStore.record` warns with
:class:`ContradictionWarning`; :meth:`RelationStore.contradictions` lists them and
:attr:`RelationStore.n_conflicts` counts them.

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
from .postgres_log import PostgresAnswerLog, is_postgres_url, shown
from .relation import MAX_IMPLICIT_IDS, Relation, as_pairs  # noqa: F401

__all__ = ["ContradictionWarning", "RelationStore", "SalvageReport", "StoreCorruptError", "StoreError"]


class ContradictionWarning(UserWarning):
    """:meth:`RelationStore.record` logged answers that contradict what was known
    (kept in the log, ignored by the relation; see :meth:`RelationStore.contradictions`)."""


def _query(name: str):
    """The method ``name`` of :class:`Relation`, asked of the store's relation (same
    docstring and signature)."""
    method = getattr(Relation, name)
    if isinstance(method, property):
        return property(lambda self: method.fget(self._relation), doc=method.__doc__)

    @functools.wraps(method)
    def ask(self, *args, **kw):
        return method(self._relation, *args, **kw)

    return ask


class RelationStore:
    """Answers of an oracle about pairs of samples, with transitive closure.

    Args:
        path: SQLite file to create or resume; ``None`` keeps everything in memory.
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
        ValueError: the file is not a RelationStore, or a newer schema version.

    See the module docstrings (this one and :mod:`palfast.active.answer_log`) for the
    guarantees. Use as a context manager or call :meth:`close` to release the file.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        timeout: float = 30.0,
        readonly: bool = False,
        accept_loss: bool = False,
    ):
        timeout = check_number("RelationStore", "timeout", timeout, 0.0, maximum=_MAX_TIMEOUT)
        self.readonly = check_bool("RelationStore", "readonly", readonly)
        accept_loss = check_bool("RelationStore", "accept_loss", accept_loss)
        self.path = None if path is None else os.fspath(path)
        self._relation = Relation("RelationStore")
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
            self._relation.clear()
        retracted = self._log.retracted
        return self._relation.extend((i, j, a) for seq, i, j, a, _, _ in new.answers if seq not in retracted)

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
        Answers that contradict the known relation are kept and warned about
        (:class:`ContradictionWarning`). On any error nothing of this call is recorded.
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
            i, j, ans = self._relation.answer_at(mine[0])
            warnings.warn(
                f"{where}: {len(mine)} of {len(ids)} answers contradict what the store "
                f"already knew (first: ({i}, {j}) answered {'alike' if ans else 'different'}, "
                f"known {'different' if ans else 'alike'}). They are kept in the log and do "
                f"not change the relation; see RelationStore.contradictions()",
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
    n_queries = _query("n_queries")
    n_conflicts = _query("n_conflicts")
    num_ids = _query("num_ids")
    ids = _query("ids")
    contradictions = _query("contradictions")
    same = _query("same")
    is_known = _query("is_known")
    known_mask = _query("known_mask")
    roots = _query("roots")
    components = _query("components")
    answers = _query("answers")
    graph = _query("graph")

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
            f"RelationStore(path={path!r}, n_queries={self.n_queries}, "
            f"components={self._relation.n_components()}, conflicts={self.n_conflicts}"
            f"{', readonly' if self.readonly else ''})"
        )
