"""RelationStore: every answer an oracle ever gave, crash-safe in SQLite (SPEC §4).

An answer is "sample i and sample j are alike" (positive) or "are not" (negative),
about global sample ids i ≠ j. The store keeps

* an **append-only log** (SQLite table ``answers``: id, i, j, answer, time, source);
  UPDATE and DELETE on it are refused by triggers;
* **retractions** (SQLite table ``retractions``: id, answer_id, time, source, also
  append-only): :meth:`RelationStore.retract` supersedes earlier answers (an "undo")
  by appending a record, never by editing the log. The relation, :meth:`answers`
  and :attr:`n_queries` are those of the log without the retracted answers;
  :meth:`log` shows every row with what retracted it;
* a **union-find** over positive answers (transitivity: i~j, j~k ⇒ i~k);
* **cannot-link** pairs between components from negative answers, propagated by
  construction: the negative is stored between the two *components*, so
  A~B and B≁C give A≁C, and merging two components merges their cannot-links.

Guarantees (file-backed store)
------------------------------
* Durability: the database runs in WAL mode with ``synchronous=FULL`` and each
  :meth:`RelationStore.record` call is one transaction, so once ``record`` returns,
  the answers survive the process being killed (SIGKILL) or the machine losing power.
* Resume: opening an existing file replays the log in id order and rebuilds the
  union-find and the cannot-links exactly.
* Several processes may append to one file: writes take the lock up front
  (``BEGIN IMMEDIATE``) and wait up to ``timeout`` seconds for it (busy timeout).
  Each ``record`` first replays the rows other processes appended, so every
  process applies the log in the same order; :meth:`RelationStore.refresh` does
  it on demand for a reader.
* A file that is not SQLite, or an SQLite database that is not a RelationStore
  (``PRAGMA application_id`` and the ``meta`` table are checked), or one written
  by a newer schema version raises ``ValueError`` naming the path, never
  silently mixes data.

Contradictions (a noisy oracle saying i~j after i≁j was implied, or the reverse)
are logged like any answer but do not change the relation: the first answer
wins, in log order. :attr:`RelationStore.n_conflicts` counts them.

Example::

    >>> import torch
    >>> from palfast.active import RelationStore
    >>> store = RelationStore()                       # in memory; pass a path to persist
    >>> store.record(torch.tensor([[0, 1], [1, 2], [2, 3]]), torch.tensor([True, True, False]))
    >>> store.same(0, 2), store.same(0, 3), store.same(0, 4)
    (True, False, None)
    >>> store.graph(torch.tensor([0, 2, 3, 4])).to_dense()
    tensor([[0., 1., 0., 0.],
            [1., 0., 0., 0.],
            [0., 0., 0., 0.],
            [0., 0., 0., 0.]])
"""

from __future__ import annotations

import os
import sqlite3
import time

import numpy as np
import torch

from ..graph import PairGraph

__all__ = ["RelationStore"]

#: ``PRAGMA application_id`` of a RelationStore file: b"PALF" as a big-endian int32.
APPLICATION_ID = 0x50414C46
#: 2 added the ``retractions`` table; a version-1 file is upgraded when opened (so an
#: older palfast, which would ignore retractions, refuses it instead of misreading it).
SCHEMA_VERSION = 2
_RETRACTIONS_SINCE = 2  # first schema version with the retractions table

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE answers (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        i INTEGER NOT NULL CHECK (i >= 0),
        j INTEGER NOT NULL CHECK (j >= 0 AND j != i),
        answer INTEGER NOT NULL CHECK (answer IN (0, 1)),
        time REAL NOT NULL,
        source TEXT NOT NULL)""",
    # The log is append-only: refuse edits at the database level, not just in this class.
    """CREATE TRIGGER answers_no_update BEFORE UPDATE ON answers
        BEGIN SELECT RAISE(ABORT, 'palfast RelationStore: the answers log is append-only'); END""",
    """CREATE TRIGGER answers_no_delete BEFORE DELETE ON answers
        BEGIN SELECT RAISE(ABORT, 'palfast RelationStore: the answers log is append-only'); END""",
)
# Schema version 2: undo without editing the log. UNIQUE: an answer is retracted once.
_SCHEMA_V2 = (
    """CREATE TABLE retractions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        answer_id INTEGER NOT NULL UNIQUE REFERENCES answers(id),
        time REAL NOT NULL,
        source TEXT NOT NULL)""",
    """CREATE TRIGGER retractions_no_update BEFORE UPDATE ON retractions
        BEGIN SELECT RAISE(ABORT, 'palfast RelationStore: the retractions log is append-only'); END""",
    """CREATE TRIGGER retractions_no_delete BEFORE DELETE ON retractions
        BEGIN SELECT RAISE(ABORT, 'palfast RelationStore: the retractions log is append-only'); END""",
)


def _as_pairs(pairs, name: str = "pairs") -> torch.Tensor:
    t = torch.as_tensor(pairs)
    if t.numel() == 0:
        t = t.reshape(0, 2)
    if t.dim() != 2 or t.shape[1] != 2:
        raise ValueError(f"{name} must be a [Q, 2] tensor of sample ids, got shape {tuple(t.shape)}")
    if t.numel() and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"{name} must hold integer sample ids, got {t.dtype}")
    t = t.to(device="cpu", dtype=torch.long)
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"{name} must hold sample ids >= 0, got {int(t.min())}")
    return t


def _as_ids(answer_ids) -> list[int]:
    t = torch.as_tensor(answer_ids).reshape(-1)
    if t.numel() and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"RelationStore.retract: answer_ids must be integer log ids, got {t.dtype}")
    return [int(v) for v in t.tolist()]


class RelationStore:
    """Answers of an oracle about pairs of samples, with transitive closure.

    Args:
        path: SQLite file to create or resume; ``None`` keeps everything in memory.
        timeout: seconds a writer waits for another process's lock (busy timeout).

    See the module docstring for the guarantees. Use as a context manager or call
    :meth:`close` to release the file.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, timeout: float = 30.0):
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
            raise ValueError(f"RelationStore: timeout must be a number of seconds >= 0, "
                             f"got {timeout!r}")
        self.path = None if path is None else os.fspath(path)
        self._timeout = float(timeout)
        if self.path is not None and os.path.isdir(self.path):
            raise ValueError(f"RelationStore: path must be a file, got the directory {self.path!r}")
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (one transaction per record).
        self._db = sqlite3.connect(self.path or ":memory:", timeout=float(timeout),
                                   isolation_level=None, check_same_thread=False)
        try:
            self._open()
        except sqlite3.OperationalError as e:
            self._db.close()
            if "locked" in str(e):
                raise TimeoutError(f"RelationStore: {self.path!r} stayed locked by another process "
                                   f"for more than timeout={timeout} s") from e
            raise ValueError(f"RelationStore: {self.path!r} is not a palfast RelationStore "
                             f"(SQLite says: {e})") from e
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise ValueError(f"RelationStore: {self.path!r} is not a palfast RelationStore "
                             f"(SQLite says: {e})") from e
        except BaseException:
            self._db.close()
            raise
        self._reset()
        self.refresh()

    def _reset(self) -> None:
        """Forget the in-memory relation; the next refresh replays the whole log."""
        self._parent: list[int] = []   # union-find forest over ids 0..len-1
        self._size: list[int] = []
        self._cannot: dict[int, set[int]] = {}  # root -> roots it cannot be linked to
        self._log_i: list[int] = []
        self._log_j: list[int] = []
        self._log_a: list[bool] = []
        self._last_id = 0
        self._retracted: set[int] = set()  # answer ids superseded by a retraction
        self._last_retraction = 0
        self._n_conflicts = 0
        self._roots_cache: np.ndarray | None = None
        self._keys_cache: tuple[int, np.ndarray] | None = None  # sorted cannot-link keys

    # ------------------------------------------------------------------ SQLite
    def _open(self) -> None:
        db = self._db
        db.execute("PRAGMA foreign_keys = ON")
        app_id = db.execute("PRAGMA application_id").fetchone()[0]  # reads the header
        if self.path is not None and app_id == APPLICATION_ID:
            self._set_wal()
        db.execute("PRAGMA synchronous = FULL")
        if app_id not in (0, APPLICATION_ID):
            raise ValueError(f"RelationStore: {self.path!r} is an SQLite database of another "
                             f"application (application_id {app_id:#x}, expected "
                             f"{APPLICATION_ID:#x}); refusing to write into it")
        if app_id == 0:
            self._initialise()
        self._check_meta()
        self._upgrade()

    def _set_wal(self) -> str:
        """Switch to WAL, retrying while another process holds the file: SQLite does not
        apply the busy timeout to a journal-mode change (seen with two processes
        creating one store at the same moment)."""
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                return self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _initialise(self) -> None:
        """Create the schema in an empty database (or find that another process did)."""
        db = self._db
        # Refuse a foreign database before touching it (switching to WAL writes the file);
        # re-read the marker: another process may have just initialised this file.
        if db.execute("PRAGMA application_id").fetchone()[0] == 0:
            self._refuse_foreign(db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0])
        if self.path is not None:
            # WAL must be set outside a transaction; it is persistent in the file.
            mode = self._set_wal()
            if mode.lower() != "wal":
                raise ValueError(f"RelationStore: could not switch {self.path!r} to WAL mode "
                                 f"(got journal_mode={mode!r})")
        db.execute("BEGIN IMMEDIATE")
        try:
            app_id = db.execute("PRAGMA application_id").fetchone()[0]
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if app_id == 0:
                self._refuse_foreign(tables)
                for statement in _SCHEMA + _SCHEMA_V2:
                    db.execute(statement)
                db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                               [("application", "palfast.RelationStore"),
                                ("schema_version", str(SCHEMA_VERSION)),
                                ("created", repr(time.time()))])
                db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _refuse_foreign(self, n_objects: int) -> None:
        if n_objects:
            raise ValueError(f"RelationStore: {self.path!r} is an SQLite database with "
                             f"{n_objects} objects but no palfast marker; refusing to write "
                             "into a foreign database")

    def _check_meta(self) -> None:
        try:
            meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
            self._db.execute("SELECT id, i, j, answer, time, source FROM answers LIMIT 0")
        except sqlite3.DatabaseError as e:
            raise ValueError(f"RelationStore: {self.path!r} carries the palfast marker but its "
                             f"tables are missing or damaged ({e})") from e
        if meta.get("application") != "palfast.RelationStore":
            raise ValueError(f"RelationStore: {self.path!r} has no palfast meta record "
                             f"(got application={meta.get('application')!r})")
        version = int(meta.get("schema_version", -1))
        if version > SCHEMA_VERSION:
            raise ValueError(f"RelationStore: {self.path!r} has schema version {version}, newer "
                             f"than this palfast understands ({SCHEMA_VERSION}); upgrade palfast")
        if version < 1:
            raise ValueError(f"RelationStore: {self.path!r} has an invalid schema version "
                             f"{meta.get('schema_version')!r}")

    def _upgrade(self) -> None:
        """Bring a version-1 store (no retractions table) to the current schema, once."""
        db = self._db
        version = "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'schema_version'"
        if db.execute(version).fetchone()[0] >= _RETRACTIONS_SINCE:
            return
        db.execute("BEGIN IMMEDIATE")
        try:  # re-read under the lock: another process may have upgraded it meanwhile
            if db.execute(version).fetchone()[0] < _RETRACTIONS_SINCE:
                for statement in _SCHEMA_V2:
                    db.execute(statement)
                db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                           (str(SCHEMA_VERSION),))
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close the database. Everything recorded is already on disk."""
        self._db.close()

    def __enter__(self) -> RelationStore:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------- recording
    def record(self, pairs, answers, source: str = "oracle") -> list[int]:
        """Append answers to the log (one transaction) and update the relation.

        Args:
            pairs: ``[Q, 2]`` integer sample ids, ``i != j`` in each row.
            answers: ``[Q]`` bool, True = "alike".
            source: free text stored with each answer (e.g. ``"oracle"``, ``"prior"``).

        Returns the log ids of the new rows, in order (what :meth:`retract` takes).
        When this returns the answers are durable (file-backed store)."""
        p = _as_pairs(pairs)
        a = torch.as_tensor(answers)
        if a.dim() != 1 or a.shape[0] != p.shape[0]:
            raise ValueError(f"RelationStore.record: answers must be a [Q] vector with Q = "
                             f"{p.shape[0]} (one per pair), got shape {tuple(a.shape)}")
        if a.numel() and a.dtype != torch.bool and (
                a.dtype.is_floating_point or a.dtype.is_complex
                or not bool(((a == 0) | (a == 1)).all())):
            raise TypeError(f"RelationStore.record: answers must be bool (or 0/1 integers), "
                            f"got {a.dtype}")
        if not isinstance(source, str):
            raise TypeError(f"RelationStore.record: source must be a str, got {type(source).__name__}")
        if p.numel() and bool((p[:, 0] == p[:, 1]).any()):
            q = int((p[:, 0] == p[:, 1]).nonzero()[0, 0])
            raise ValueError(f"RelationStore.record: pairs must join two different samples, "
                             f"got pair {q} = ({int(p[q, 0])}, {int(p[q, 1])})")
        if p.numel() == 0:
            return []
        now = time.time()
        rows = [(i, j, int(x), now, source) for (i, j), x in zip(p.tolist(), a.tolist())]
        db = self._db
        db.execute("BEGIN IMMEDIATE")  # take the write lock now: no upgrade deadlock
        try:
            db.executemany("INSERT INTO answers (i, j, answer, time, source) VALUES (?, ?, ?, ?, ?)",
                           rows)
            # Rows other processes appended since our last look come first (smaller ids),
            # so every process replays the same log in the same order.
            new_rows, new_retractions = self._read_new()
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._apply_new(new_rows, new_retractions)
        # We held the write lock, so our rows are the last ones read.
        return [r[0] for r in new_rows[len(new_rows) - len(rows):]]

    def retract(self, answer_ids, source: str = "oracle") -> None:
        """Supersede earlier answers (undo): appends one retraction per answer id, in one
        transaction; the relation is rebuilt from the log without them. The answers stay
        in the log (see :meth:`log`). Each id must be in the log and not yet retracted."""
        ids = _as_ids(answer_ids)
        if not isinstance(source, str):
            raise TypeError(f"RelationStore.retract: source must be a str, got {type(source).__name__}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"RelationStore.retract: answer_ids repeat an id: {ids}")
        if not ids:
            return
        now = time.time()
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            marks = ",".join("?" * len(ids))
            found = {r[0] for r in db.execute(f"SELECT id FROM answers WHERE id IN ({marks})", ids)}
            done = {r[0] for r in db.execute(
                f"SELECT answer_id FROM retractions WHERE answer_id IN ({marks})", ids)}
            if missing := [a for a in ids if a not in found]:
                raise ValueError(f"RelationStore.retract: no answer with id {missing} in the log "
                                 "(ids are what record() returned)")
            if done:
                raise ValueError(f"RelationStore.retract: answers {sorted(done)} are already retracted")
            db.executemany("INSERT INTO retractions (answer_id, time, source) VALUES (?, ?, ?)",
                           [(a, now, source) for a in ids])
            new_rows, new_retractions = self._read_new()
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._apply_new(new_rows, new_retractions)

    def refresh(self) -> int:
        """Apply the rows and retractions other processes appended since we last looked;
        returns how many rows and retractions."""
        db = self._db
        db.execute("BEGIN")  # one snapshot: a retraction never refers to a row we did not read
        try:
            rows, retractions = self._read_new()
        finally:
            db.execute("COMMIT")
        self._apply_new(rows, retractions)
        return len(rows) + len(retractions)

    def _read_new(self):
        rows = self._db.execute("SELECT id, i, j, answer FROM answers WHERE id > ? ORDER BY id",
                                (self._last_id,)).fetchall()
        retractions = self._db.execute(
            "SELECT id, answer_id FROM retractions WHERE id > ? ORDER BY id",
            (self._last_retraction,)).fetchall()
        return rows, retractions

    def _apply_new(self, rows, retractions) -> None:
        if retractions:
            self._last_retraction = retractions[-1][0]
            new = {a for _, a in retractions}
            if any(a <= self._last_id for a in new):
                # An applied answer was retracted: union-find cannot remove an edge, so
                # replay the whole log without it (rare: a person pressing undo).
                retracted = self._retracted | new
                last_retraction = self._last_retraction
                upto = rows[-1][0] if rows else self._last_id
                self._reset()
                self._retracted, self._last_retraction = retracted, last_retraction
                rows = self._db.execute("SELECT id, i, j, answer FROM answers WHERE id <= ? "
                                        "ORDER BY id", (upto,)).fetchall()
            else:
                self._retracted |= new
        self._apply(rows)

    def log(self) -> list[tuple]:
        """Every row of the log, retracted ones included, read from the file, in id order:
        ``(id, i, j, answer: bool, time, source, retracted_by)`` where ``retracted_by`` is
        the source of the retraction, or None."""
        rows = self._db.execute(
            "SELECT a.id, a.i, a.j, a.answer, a.time, a.source, r.source FROM answers a "
            "LEFT JOIN retractions r ON r.answer_id = a.id ORDER BY a.id").fetchall()
        return [(i, a, b, bool(x), t, s, r) for i, a, b, x, t, s, r in rows]

    def _apply(self, rows) -> None:
        for row_id, i, j, ans in rows:
            if row_id in self._retracted:
                continue
            self._log_i.append(i)
            self._log_j.append(j)
            self._log_a.append(bool(ans))
            self._grow(max(i, j) + 1)
            ri, rj = self._find(i), self._find(j)
            if ans:
                if ri == rj:
                    continue
                if rj in self._cannot.get(ri, ()):
                    self._n_conflicts += 1
                    continue
                self._union(ri, rj)
            else:
                if ri == rj:
                    self._n_conflicts += 1
                    continue
                self._cannot.setdefault(ri, set()).add(rj)
                self._cannot.setdefault(rj, set()).add(ri)
        if rows:
            self._last_id = rows[-1][0]
        self._roots_cache = None  # also after a rebuild with no new rows
        self._keys_cache = None

    # ------------------------------------------------------------ union-find
    def _grow(self, n: int) -> None:
        if n > len(self._parent):
            start = len(self._parent)
            self._parent.extend(range(start, n))
            self._size.extend([1] * (n - start))

    def _find(self, i: int) -> int:
        parent = self._parent
        if i >= len(parent):
            return i
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:  # path compression
            parent[i], i = root, parent[i]
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

    def _roots(self, ids: np.ndarray) -> np.ndarray:
        """Root of each id (ids never seen are their own root), vectorised."""
        if self._roots_cache is None:
            r = np.asarray(self._parent, dtype=np.int64)
            while True:  # pointer jumping until every node points at its root
                nxt = r[r]
                if np.array_equal(nxt, r):
                    break
                r = nxt
            self._roots_cache = r
        roots = self._roots_cache
        ids = np.asarray(ids, dtype=np.int64)
        out = ids.copy()
        inside = ids < roots.shape[0]
        out[inside] = roots[ids[inside]]
        return out

    # --------------------------------------------------------------- queries
    @property
    def n_queries(self) -> int:
        """Number of answers in the log (every source, conflicts and repeats included),
        retracted ones excluded."""
        return len(self._log_a)

    @property
    def n_conflicts(self) -> int:
        """Answers that contradicted what was already known (ignored by the relation)."""
        return self._n_conflicts

    @property
    def num_ids(self) -> int:
        """1 + the largest sample id ever recorded (0 when empty)."""
        return len(self._parent)

    def _check_id(self, v, name: str) -> int:
        if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.dtype.is_floating_point:
            v = int(v)
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"RelationStore: {name} must be a sample id (int >= 0), got {v!r}")
        return int(v)

    def same(self, i, j) -> bool | None:
        """True if i and j are known alike (directly or by transitivity), False if known
        different (directly or propagated), None if unknown. ``same(i, i)`` is True."""
        i, j = self._check_id(i, "i"), self._check_id(j, "j")
        ri, rj = self._find(i), self._find(j)
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
        p = _as_pairs(pairs).numpy()
        if p.shape[0] == 0:
            return torch.zeros(0, dtype=torch.bool)
        ri, rj = self._roots(p[:, 0]), self._roots(p[:, 1])
        known = ri == rj
        if self._cannot:
            m = max(self.num_ids, int(p.max()) + 1)
            if self._keys_cache is None or self._keys_cache[0] != m:
                keys = np.fromiter((a * m + b for a, s in self._cannot.items() for b in s),
                                   dtype=np.int64)
                self._keys_cache = (m, np.sort(keys))
            keys = self._keys_cache[1]
            q = ri * m + rj
            pos = np.searchsorted(keys, q).clip(max=keys.shape[0] - 1)
            known |= keys[pos] == q
        return torch.from_numpy(known)

    def roots(self, indices=None) -> torch.Tensor:
        """Union-find root of each sample in ``indices`` (LongTensor ``[B]``); a sample
        with no known positive is its own root. Equal roots ⇔ known alike."""
        return torch.from_numpy(self._roots(self._indices(indices).numpy()))

    def components(self, indices=None) -> torch.Tensor:
        """Component id of each sample in ``indices`` (LongTensor ``[B]``), −1 for samples
        with no known positive. Ids are roots of the union-find: equal ⇔ known alike.
        ``indices=None`` means all ids ``0..num_ids-1``."""
        idx = self._indices(indices)
        roots = self._roots(idx.numpy())
        sizes = np.asarray(self._size, dtype=np.int64)
        size = np.ones_like(roots)
        inside = roots < sizes.shape[0]
        size[inside] = sizes[roots[inside]]
        return torch.from_numpy(np.where(size > 1, roots, -1))

    def answers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The log as ``(pairs LongTensor [Q, 2], answers BoolTensor [Q])``, in log order."""
        pairs = torch.tensor([self._log_i, self._log_j], dtype=torch.long).T.reshape(-1, 2)
        return pairs, torch.tensor(self._log_a, dtype=torch.bool)

    def _indices(self, indices) -> torch.Tensor:
        if indices is None:
            return torch.arange(self.num_ids)
        idx = torch.as_tensor(indices)
        if idx.dim() != 1:
            raise ValueError(f"RelationStore: indices must be a 1-D tensor of sample ids, "
                             f"got shape {tuple(idx.shape)}")
        if idx.numel() and (idx.dtype.is_floating_point or idx.dtype == torch.bool):
            raise TypeError(f"RelationStore: indices must hold integer sample ids, got {idx.dtype}")
        idx = idx.to(device="cpu", dtype=torch.long)
        if idx.numel() and int(idx.min()) < 0:
            raise ValueError(f"RelationStore: indices must be >= 0, got {int(idx.min())}")
        return idx

    def graph(self, indices=None, *, n_views: int = 1, label_weight: float = 1.0,
              view_weight: float = 1.0, device=None) -> PairGraph:
        """PairGraph of the known positives over a mini-batch.

        Row b of the batch is sample ``indices[b]``; rows b and b' are positives when
        the samples are in the same union-find component (answered or transitive).
        Built as ``PairGraph.from_labels(component ids)`` (−1 for samples with no
        known positive), so a component of size m never expands into m² edges.

        With ``n_views = V > 1`` the graph is over ``z = cat([view_0, ..., view_{V-1}])``
        of the batch (V·B rows, row ``b + v·B`` = view v of sample b)::

            G = view_weight · PairGraph.from_views(B, V)
              + label_weight · PairGraph.from_labels(component ids repeated V times)

        so all views of all samples of one component are positives, and two views
        of one sample in a component get weight ``view_weight + label_weight``.
        This is PAL's G = (1−α)·G_views + α·G_labels with view_weight = 1−α,
        label_weight = α.

        Args:
            indices: LongTensor ``[B]`` global sample ids (``None``: ``0..num_ids-1``).
            n_views: V ≥ 1.
            label_weight, view_weight: finite weights ≥ 0.
            device: where the graph lives (default CPU).
        """
        idx = self._indices(indices)
        if idx.numel() == 0:
            raise ValueError("RelationStore.graph: indices must hold at least one sample id")
        if isinstance(n_views, bool) or not isinstance(n_views, int) or n_views < 1:
            raise ValueError(f"RelationStore.graph: n_views must be an int >= 1, got {n_views!r}")
        comp = self.components(idx).to(device)
        g = PairGraph.from_labels(comp.repeat(n_views), weight=float(label_weight))
        if n_views > 1:
            g = float(view_weight) * PairGraph.from_views(idx.numel(), n_views, device=device) + g
        return g

    def __repr__(self) -> str:
        n_comp = sum(1 for i, p in enumerate(self._parent) if p == i and self._size[i] > 1)
        return (f"RelationStore(path={self.path!r}, n_queries={self.n_queries}, "
                f"components={n_comp}, conflicts={self.n_conflicts})")
