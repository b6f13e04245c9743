"""The answer log of a RelationStore: every answer an oracle ever gave, crash-safe in
SQLite (docs/active.md, "RelationStore").

:class:`SQLiteAnswerLog` keeps

* an **append-only log** (SQLite table ``answers``: id, i, j, answer, time, source,
  crc); UPDATE and DELETE on it are refused by triggers, and every row carries a
  CRC-32 of its content, verified whenever the row is read;
* **retractions** (SQLite table ``retractions``: id, answer_id, time, source, crc;
  append-only and checksummed the same way): :meth:`RelationStore.retract` supersedes
  earlier answers (an "undo", used by ``palfast annotate``) by appending a record,
  never by editing the log. The relation, :meth:`RelationStore.answers` and
  :attr:`RelationStore.n_queries` are those of the log without the retracted answers;
  :meth:`RelationStore.log` lists every row with who retracted it;
* **strategy state** (SQLite table ``state``: key, value, time, crc; schema 4): one
  JSON value per key, replaced by each save (:meth:`RelationStore.save_state`), its
  CRC-32 (:func:`state_crc`) verified when read;

and reads them back verified, in id order, remembering how far it has read; the
relation they imply is :mod:`palfast.active.relation`'s, and
:class:`palfast.active.RelationStore` joins the two. This module also holds the
store's errors (:class:`StoreError`, :class:`StoreCorruptError`), the schema and its
migrations, the per-row CRC-32 (:func:`row_crc`), :func:`salvage` and the ``-acked``
side file.

Guarantees (file-backed store)
------------------------------
* Durability: the database runs in WAL mode with ``synchronous=FULL`` and each
  :meth:`RelationStore.record` call is one transaction, so once ``record`` returns,
  the answers are flushed to ``<path>-wal`` (fsync) and survive the process being
  killed (SIGKILL) or the machine losing power, as long as that file is intact. Until
  a checkpoint the newest answers live only in ``<path>-wal``: copy a store with
  :meth:`RelationStore.backup`, never by copying the main file alone.
* Lost acknowledged answers are detected, not recovered: SQLite replays a ``-wal``
  only up to the first frame whose checksum fails and silently drops every committed
  transaction after it (all of them if the ``-wal`` is truncated or deleted). So after
  each write transaction, before ``record``/``retract`` returns, the store records the
  last row id and CRC-32 of each log table in ``<path>-acked`` (outside SQLite; two
  checksummed slots overwritten in turn and flushed, under SQLite's write lock). Every
  open and :meth:`RelationStore.refresh` reads it first and raises
  :class:`StoreCorruptError` when an acknowledged row is missing or differs; restore a
  backup, or pass ``accept_loss=True`` to continue with what is left. Not detected:
  ``<path>-acked`` lost together with the ``-wal`` (a deleted main file starts a new
  store and replaces it); a loss before the first writable open by a palfast that
  keeps the record; a loss of only the last transaction when the newest slot of
  ``<path>-acked`` is damaged too (the older slot is then used).
* Resume: opening an existing file replays the log in id order, leaving out the
  retracted answers, and rebuilds the union-find and the cannot-links exactly.
* Integrity: opening runs ``PRAGMA quick_check``, checks every row's values and
  CRC-32 (answers and retractions), that row ids are 1, 2, 3, … without a gap and
  that none is missing at the end, and that each retraction names an answer of the
  log, once; any failure raises :class:`StoreCorruptError` naming the row, and nothing
  is dropped silently (:meth:`RelationStore.salvage` copies the rows that verify).
* Several processes may append to one file: writes take the lock up front
  (``BEGIN IMMEDIATE``) and wait up to ``timeout`` seconds for it (busy timeout).
  Each ``record`` or ``retract`` first replays the rows other processes appended, so every
  process applies the log in the same order; :meth:`RelationStore.refresh` does
  it on demand for a reader.
* ``readonly=True`` opens with SQLite's ``mode=ro``: the database file and
  ``<path>-acked`` are never written (SQLite may create the ``-wal``/``-shm`` side
  files to read beside writers).
* A file that is not SQLite, or an SQLite database that is not a RelationStore
  (``PRAGMA application_id`` and the ``meta`` table are checked), or one written
  by a newer schema version raises ``ValueError`` naming the path, never
  silently mixes data. Stores of schema version 1 (no checksums), 2 (no
  retractions) or 3 (no state table) are migrated in one transaction when opened for
  writing. The ``meta.schema_version`` record has no checksum, so it must agree with the
  tables the file has (the crc column from 2 on, the retractions table from 3 on, the
  state table from 4 on); a mismatch
  raises :class:`StoreCorruptError` rather than reading the file as another version
  (which would ignore its retractions).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sqlite3
import struct
import threading
import time
import zlib
from typing import NamedTuple

__all__ = [
    "ACKED_SUFFIX",
    "APPLICATION_ID",
    "SCHEMA_VERSION",
    "AnswerLog",
    "NewRows",
    "SQLiteAnswerLog",
    "SalvageReport",
    "StoreCorruptError",
    "StoreError",
    "row_crc",
    "salvage",
    "source_bytes",
    "state_crc",
    "state_text",
]

#: ``PRAGMA application_id`` of a RelationStore file: b"PALF" as a big-endian int32.
APPLICATION_ID = 0x50414C46
#: 1: the first layout; 2: adds the per-row ``crc`` column; 3: adds the ``retractions``
#: table; 4: adds the ``state`` table (:meth:`RelationStore.save_state`). Older files are
#: migrated on a writable open (:meth:`SQLiteAnswerLog._migrate`); the version bump makes
#: an older palfast, which would ignore retractions, refuse a store that has them instead
#: of misreading it.
SCHEMA_VERSION = 4
#: The first schema with the ``state`` table; a store read read-only at an older schema
#: has no saved state (:meth:`RelationStore.load_state` returns None).
STATE_SINCE = 4
#: What a state key may be: short ASCII names (``"pal"``), the same text in SQLite and
#: in PostgreSQL whatever the server's encoding.
_STATE_KEY = re.compile(r"[A-Za-z0-9_.:/-]{1,200}")
#: SQLite's busy timeout is an int of milliseconds.
_MAX_TIMEOUT = 2_000_000.0
#: :meth:`RelationStore.salvage` reads a store whose scan fails row by row, up to this id.
_SALVAGE_PROBES = 10_000_000
#: Suffix of the side file ``<path>-acked`` recording how far each log table had been
#: acknowledged (``record``/``retract`` returned): the last row id and its CRC-32. It is
#: outside SQLite, so a damaged, truncated or deleted ``-wal`` cannot take it along.
ACKED_SUFFIX = "-acked"
#: The ``format`` field of the ``-acked`` file's records (bump if their content changes).
_ACKED_FORMAT = "palfast.RelationStore.acked/1"
#: Bytes of each of the ``-acked`` file's two slots: a filesystem block and memory page,
#: so rewriting one slot never rewrites (and a torn write never damages) the other.
_ACKED_SLOT = 4096
_LOG_TABLES = ("answers", "retractions")
#: The tops (see :class:`_Acked`) of a store without rows.
_NO_ROWS = ((0, 0), (0, 0))


def _append_only(table: str) -> tuple[str, str]:
    """Triggers refusing UPDATE and DELETE on ``table``: the logs are append-only at the
    database level, not just in this class."""
    return tuple(
        f"""CREATE TRIGGER {table}_no_{op} BEFORE {op.upper()} ON {table}
        BEGIN SELECT RAISE(ABORT, 'palfast RelationStore: the {table} log is append-only'); END"""
        for op in ("update", "delete")
    )


# Schema 3: an answer is retracted at most once (UNIQUE) and only if it is in the log
# (REFERENCES, with foreign_keys on; answers are never deleted).
_RETRACTIONS = (
    """CREATE TABLE retractions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        answer_id INTEGER NOT NULL UNIQUE REFERENCES answers(id)
            CHECK (typeof(answer_id) = 'integer' AND answer_id >= 1),
        time REAL NOT NULL,
        source TEXT NOT NULL,
        crc INTEGER NOT NULL CHECK (crc BETWEEN 0 AND 4294967295))""",
    *_append_only("retractions"),
)
# Schema 4: the strategy state, one row per key, replaced by each save (not a log: only
# the last value counts), checksummed like the log rows (:func:`state_crc`).
_STATE_TABLE = """CREATE TABLE state (
        key TEXT PRIMARY KEY NOT NULL,
        value TEXT NOT NULL,
        time REAL NOT NULL,
        crc INTEGER NOT NULL CHECK (crc BETWEEN 0 AND 4294967295))"""
_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE answers (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        i INTEGER NOT NULL CHECK (typeof(i) = 'integer' AND i >= 0),
        j INTEGER NOT NULL CHECK (typeof(j) = 'integer' AND j >= 0 AND j != i),
        answer INTEGER NOT NULL CHECK (answer IN (0, 1)),
        time REAL NOT NULL,
        source TEXT NOT NULL,
        crc INTEGER NOT NULL CHECK (crc BETWEEN 0 AND 4294967295))""",
    *_append_only("answers"),
    *_RETRACTIONS,
    _STATE_TABLE,
)
#: The integer columns of each log table, between ``id`` and ``time, source, crc``.
_COLUMNS = {"answers": ("i", "j", "answer"), "retractions": ("answer_id",)}


#: What each schema version added to the file, ``(version, what)``: the layout a file
#: has is checked against its ``meta.schema_version`` (:func:`_layout_version`).
_LAYOUT = ((2, "crc column of answers"), (3, "retractions table"), (4, "state table"))
#: Reads the state table (schema 4); it fails on an older layout.
_STATE_SELECT = "SELECT value, time, crc FROM state"


def _layout_version(db: sqlite3.Connection) -> int:
    """The schema version the tables of ``db`` have (1 to 4), read from the layout
    itself rather than from the unchecksummed ``meta.schema_version``."""
    version = 1
    for since, query in ((2, _select("answers", 2)), (3, _select("retractions", 3)), (4, _STATE_SELECT)):
        try:
            db.execute(query + " LIMIT 0")
        except sqlite3.OperationalError:  # no such table / column
            break
        version = since
    return version


def schema_version(meta: dict, shown: str) -> int:
    """The schema version a store's ``meta`` records (-1 when it is missing or not a
    number); a version newer than this palfast's is a ValueError naming the store
    ``shown`` (the backends check the older and invalid ones their own way)."""
    raw = meta.get("schema_version")
    version = int(raw) if isinstance(raw, str) and raw.isdigit() else -1
    if version > SCHEMA_VERSION:
        raise ValueError(
            f"RelationStore: {shown!r} has schema version {version}, newer "
            f"than this palfast understands ({SCHEMA_VERSION}); upgrade palfast"
        )
    return version


def _select(table: str, version: int) -> str:
    """SELECT of a log table's rows as ``(id, *integer columns, time, source bytes, crc)``;
    crc is NULL before schema 2 (reading a version-1 file read-only)."""
    return (
        f"SELECT id, {', '.join(_COLUMNS[table])}, time, CAST(source AS BLOB), "
        f"{'crc' if version >= 2 else 'NULL'} FROM {table}"
    )


# ----------------------------------------------------------------- errors
class StoreError(RuntimeError):
    """The store cannot do what was asked: missing or read-only directory, disk full,
    lock held too long, store closed, write on a read-only store. The message says
    what to do; nothing already recorded is affected."""


class StoreCorruptError(StoreError, ValueError):
    """The file is damaged or was edited outside palfast (a row fails its checks, a
    row is missing, SQLite finds the file malformed). The store refuses to open;
    :meth:`RelationStore.salvage` copies the rows that verify into a new store."""


class SalvageReport(NamedTuple):
    """What :meth:`RelationStore.salvage` copied: ``kept`` answers rows; ``dropped`` as
    ``(row id, reason)`` for each answers row that could not be read or verified;
    ``unverified``: ids of kept rows that had no checksum (valid values, written by a
    schema-1 palfast after the store was migrated); ``retractions_kept`` and
    ``retractions_dropped`` the same for the retractions table (a dropped retraction
    brings its answer back into the relation: check them); ``state_kept`` the keys of the
    strategy state copied (each row verified, its value and time kept) and
    ``state_dropped`` ``(key, reason)`` for each state row that failed its check (that
    strategy starts afresh on the salvaged store)."""

    kept: int
    dropped: list
    unverified: list
    retractions_kept: int
    retractions_dropped: list
    state_kept: list
    state_dropped: list


def row_crc(seq: int, *fields) -> int:
    """CRC-32 of one row of a log table, ``fields`` being its integer columns, then
    ``time`` and ``source`` (bytes): an answer is ``row_crc(id, i, j, answer, time,
    source)``, a retraction ``row_crc(id, answer_id, time, source)``. Little-endian int64
    ``id`` and integers, float64 ``time``, then the UTF-8 bytes of ``source``. Any single
    flipped bit changes it."""
    *ints, t, source = fields
    return zlib.crc32(struct.pack(f"<{1 + len(ints)}qd", seq, *ints, t) + source)


#: row_crc's packing of an answers row: id, i, j, answer, time.
_ANSWER_PACK = struct.Struct("<4qd").pack


def _check_row(table: str, row, version: int) -> tuple:
    """Validate one row of ``table`` read with :func:`_select`; returns ``(id, i, j,
    answer: bool, time, source)`` for answers, ``(id, answer_id, time, source)`` for
    retractions, or raises ``ValueError`` saying what is wrong (the caller names the file,
    the table and the row). Retractions exist from schema 3 on, so always have a crc."""
    if table == "answers" and version >= 2 and len(row) == 7:
        # Every reopen checks every row: one expression for a valid checksummed answer
        # (the same conditions as below), the step-by-step checks only to say what is wrong.
        seq, i, j, ans, t, src, crc = row
        if (
            type(i) is int
            and type(j) is int
            and type(ans) is int
            and type(t) is float
            and type(src) is bytes
            and type(crc) is int
            and i >= 0
            and j >= 0
            and i != j
            and (ans == 0 or ans == 1)
            and crc == zlib.crc32(_ANSWER_PACK(seq, i, j, ans, t) + src)
        ):
            with contextlib.suppress(UnicodeDecodeError):
                return (seq, i, j, ans == 1, t, src.decode("utf-8"))
    seq, *ints, t, src, crc = row
    for name, v in zip(_COLUMNS[table], ints):
        if type(v) is not int:
            raise ValueError(f"{name} is {v!r}, not an integer")
    if table == "answers":
        i, j, ans = ints
        if i < 0 or j < 0 or i == j:
            raise ValueError(f"pair ({i}, {j}) is not two different sample ids >= 0")
        if ans not in (0, 1):
            raise ValueError(f"answer is {ans}, not 0 or 1")
        values = (i, j, bool(ans))
    else:
        if ints[0] < 1:
            raise ValueError(f"answer_id is {ints[0]}, not a log id >= 1")
        values = (ints[0],)
    if type(t) is not float:
        raise ValueError(f"time is {t!r}, not a real number")
    if type(src) is not bytes:
        raise ValueError(f"source is {src!r}, not text")
    if version >= 2 and (type(crc) is not int or crc != row_crc(seq, *ints, t, src)):
        raise ValueError(
            "its checksum does not match its content" if type(crc) is int else f"checksum is {crc!r}, not an integer"
        )
    try:
        text = src.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"source is not valid UTF-8 ({e})") from None
    return (seq, *values, t, text)


def source_bytes(where: str, source) -> bytes:
    """The UTF-8 bytes of a row's ``source`` (what its checksum covers)."""
    if not isinstance(source, str):
        raise TypeError(f"{where}: source must be a str, got {type(source).__name__}")
    try:
        return source.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where}: source must be valid text ({e})") from None


def _json_problem(value, at: str) -> tuple[type[Exception], str] | None:
    """Why ``value`` (shown as ``at``) would not come back from JSON as it is, or None:
    only dicts with str keys, lists, str, int, float (finite), bool and None, of exactly
    these types (a tuple would come back as a list, an int key as a str)."""
    if value is None or type(value) in (str, int, bool):
        return None
    if type(value) is float:
        return None if math.isfinite(value) else (ValueError, f"{at} is {value}, and JSON has no NaN or infinity")
    if type(value) is list:
        items = ((f"{at}[{k}]", v) for k, v in enumerate(value))
    elif type(value) is dict:
        bad = next((k for k in value if type(k) is not str), None)
        if bad is not None:
            return TypeError, f"{at} has the key {bad!r} ({type(bad).__name__}); JSON keys are str"
        items = ((f"{at}[{k!r}]", v) for k, v in value.items())
    else:
        hint = "; use a list" if isinstance(value, tuple) else ""
        return TypeError, f"{at} is a {type(value).__name__}, not a JSON type{hint}"
    return next((p for a, v in items if (p := _json_problem(v, a))), None)


def state_text(where: str, key, value, name: str = "value") -> str:
    """The JSON text saved for a strategy state ``value`` (a dict, the argument ``name``)
    under ``key``; TypeError/ValueError naming ``where`` and the part of ``value`` that
    JSON would not give back as it is (:func:`_json_problem`)."""
    if not isinstance(key, str) or not _STATE_KEY.fullmatch(key):
        raise ValueError(f"{where}: key must be 1 to 200 ASCII letters, digits or '_.:/-' (e.g. 'pal'), got {key!r}")
    if type(value) is not dict:
        raise TypeError(f"{where}: {name} must be a dict (a JSON object), got {type(value).__name__}")
    problem = _json_problem(value, name)
    if problem:
        exc, what = problem
        raise exc(
            f"{where}: {name} must hold only JSON types (dict with str keys, list, str, int, "
            f"finite float, bool, None), so that load_state gives it back equal: {what}"
        )
    return json.dumps(value, allow_nan=False)


def state_crc(key: str, text: str, t: float) -> int:
    """CRC-32 of one row of the ``state`` table: :func:`row_crc` with id 0 (the row has
    none), the key's length as its integer column (so that key and value cannot trade
    bytes), ``time``, and the ASCII bytes of key then value."""
    return row_crc(0, len(key), t, (key + text).encode("ascii"))


def _verified_state(key: str, text, t, crc) -> tuple[dict | None, str | None]:
    """One row of the ``state`` table checked: ``(value, None)``, or ``(None, why it
    fails)`` (a wrong type, a checksum that does not match, a value that is not a JSON
    object). For :meth:`SQLiteAnswerLog.load_state` and :func:`salvage`."""
    if type(text) is not str or not text.isascii() or type(t) is not float or type(crc) is not int:
        return None, f"a value has the wrong type (value {type(text).__name__}, time {t!r}, crc {crc!r})"
    if crc != state_crc(key, text, t):
        return None, "its checksum does not match its content"
    try:
        value = json.loads(text)
    except ValueError as e:
        return None, f"its value is not JSON ({e})"
    if type(value) is not dict:
        return None, f"its value is a JSON {type(value).__name__}, not an object"
    return value, None


def _sqlite_error(
    where: str, path: str | None, e: sqlite3.Error, *, readonly: bool = False, opening: bool = False
) -> Exception:
    """Translate an sqlite3 exception into a palfast one that says what to do."""
    msg = str(e)
    low = msg.lower()
    name = getattr(e, "sqlite_errorname", "")
    shown = repr(path) if path is not None else "the in-memory store"
    if "locked" in low or "busy" in low:
        return StoreError(
            f"{where}: {shown} stayed locked by another process longer than the "
            f"busy timeout; retry, or open it with a larger timeout= "
            f"(SQLite says: {msg})"
        )
    if name == "SQLITE_FULL" or "disk is full" in low:
        return StoreError(
            f"{where}: the disk holding {shown} is full; nothing of this call was "
            f"written (the transaction was rolled back). Free space and call it "
            f"again (SQLite says: {msg})"
        )
    if "readonly" in low or "read-only" in low or name.startswith("SQLITE_READONLY"):
        if readonly:
            return StoreError(
                f"{where}: {shown} was opened with readonly=True; open it without readonly to record answers"
            )
        return StoreError(
            f"{where}: cannot write {shown}: the file or its directory is "
            f"read-only (SQLite writes the file and creates '-wal' and '-shm' "
            f"files beside it). Make both writable, or pass readonly=True to "
            f"read it (SQLite says: {msg})"
        )
    if "unable to open" in low or name == "SQLITE_CANTOPEN" or name.startswith("SQLITE_IOERR"):
        return StoreError(
            f"{where}: cannot {'open' if opening else 'access'} {shown}: check "
            f"that its directory exists and that the file and the directory can "
            f"be {'read' if readonly else 'read and written'} "
            f"(SQLite says: {msg})"
        )
    if opening or (isinstance(e, sqlite3.DatabaseError) and not isinstance(e, sqlite3.OperationalError)):
        what = "is not a palfast RelationStore, or is damaged" if opening else "is damaged"
        return StoreCorruptError(
            f"{where}: {shown} {what} (SQLite says: {msg}). If it is a "
            f"store, RelationStore.salvage(path, new_path) copies the rows "
            f"that still verify"
        )
    return StoreError(f"{where}: SQLite failed on {shown}: {msg}")


def _salvage_table(db: sqlite3.Connection, where: str, path: str, table: str, version: int) -> tuple[list, list, list]:
    """For :meth:`RelationStore.salvage`: the rows of ``table`` that verify (as
    :func:`_check_row` returns them), ``(id, reason)`` for each that does not, and the
    ids of answers kept without a checksum (valid rows a schema-1 palfast appended after
    the migration; a retraction always has one)."""
    sel = _select(table, version)
    kept, dropped, unverified = [], [], []
    try:
        rows, scanned = db.execute(sel + " ORDER BY id").fetchall(), True
    except sqlite3.Error:
        # A damaged page: read row by row, so it loses its rows, not the rest of the log.
        rows, scanned = [], False
        try:
            top = db.execute(f"SELECT max(id) FROM {table}").fetchone()[0] or 0
        except sqlite3.Error as e:
            raise _sqlite_error(where, path, e, readonly=True, opening=True) from e
        for seq_id in range(1, min(top, _SALVAGE_PROBES) + 1):
            try:
                row = db.execute(sel + " WHERE id = ?", (seq_id,)).fetchone()
            except sqlite3.Error as e:
                dropped.append((seq_id, f"unreadable ({e})"))
                continue
            if row is not None:
                rows.append(row)
    last = 0
    for row in rows:
        if scanned and isinstance(row[0], int) and row[0] > last + 1:
            dropped.append((last + 1, f"missing (ids {last + 1}..{row[0] - 1})"))
        no_crc = table == "answers" and version >= 2 and row[-1] is None
        try:
            kept.append(_check_row(table, row, 1 if no_crc else version))
            if no_crc:
                unverified.append(row[0])
        except ValueError as e:
            dropped.append((row[0], str(e)))
        last = row[0] if isinstance(row[0], int) else last
    return kept, dropped, unverified


def _uri(path: str) -> str:
    return "file:" + "".join({"%": "%25", "?": "%3f", "#": "%23"}.get(c, c) for c in os.path.abspath(path))


def _connect_ro(path: str, timeout: float) -> sqlite3.Connection:
    """Open ``path`` with SQLite's ``mode=ro``: the database file is never written."""
    kw = dict(timeout=timeout, isolation_level=None, check_same_thread=False, uri=True)
    db = sqlite3.connect(_uri(path) + "?mode=ro", **kw)
    try:
        db.execute("PRAGMA schema_version").fetchone()
        return db
    except sqlite3.OperationalError:
        db.close()
        if os.access(os.path.dirname(os.path.abspath(path)), os.W_OK):
            raise
        # A WAL store in a read-only directory without its -shm file: SQLite can only
        # read it as immutable (it then ignores a -wal file; no writer can be using it).
        return sqlite3.connect(_uri(path) + "?mode=ro&immutable=1", **kw)


# ------------------------------------------------- the acknowledged-rows side file
# ``<path>-acked`` holds two slots of _ACKED_SLOT bytes, each an (all-zero when unused)
# one-line record (:func:`_acked_slot`) with its own CRC-32. A write overwrites the slot
# of the older record in place and fdatasyncs it (one flush, the file's size and
# metadata unchanged); reading takes the valid record of the higher ``seq``. A crash in
# the middle of a write leaves that slot failing its check and the other, older one
# intact: the record falls back to fewer rows, never claims rows that were not committed.


class _Acked(NamedTuple):
    """One record of the ``-acked`` file: ``tops`` is ``((last answers id, its crc),
    (last retractions id, its crc))``, (0, 0) for an empty table; ``seq`` counts writes."""

    seq: int
    tops: tuple


def _acked_slot(seq: int, tops) -> bytes:
    """One slot: the line ``<format> <seq> <answers id> <crc> <retractions id> <crc>
    <CRC-32 of what precedes it>``, then zero bytes."""
    (a, a_crc), (r, r_crc) = tops
    line = b"%s %d %d %d %d %d" % (_ACKED_FORMAT.encode(), seq, a, a_crc, r, r_crc)
    return (line + b" %d\n" % zlib.crc32(line)).ljust(_ACKED_SLOT, b"\0")


def _parse_acked_slot(raw: bytes) -> _Acked:
    """One slot's record; ``ValueError`` saying why it does not verify."""
    line, newline, _ = raw.partition(b"\n")
    body, _, check = line.rpartition(b" ")
    fields = body.split(b" ")
    if (
        not newline
        or len(fields) != 6
        or fields[0] != _ACKED_FORMAT.encode()
        or not all(f.isdigit() for f in (*fields[1:], check))
    ):
        raise ValueError(f"not a {_ACKED_FORMAT} record")
    if int(check) != zlib.crc32(body):
        raise ValueError("its checksum does not match its content")
    seq, a, a_crc, r, r_crc = map(int, fields[1:])
    return _Acked(seq, ((a, a_crc), (r, r_crc)))


def _read_acked(side: str) -> _Acked | None:
    """The newest valid record of the ``-acked`` file ``side``, None when there is no
    file. ``ValueError`` saying what is wrong when no slot verifies (or the file has
    the wrong size), ``OSError`` when it cannot be read."""
    try:
        with open(side, "rb") as f:
            raw = f.read(2 * _ACKED_SLOT + 1)
    except FileNotFoundError:
        return None
    if len(raw) != 2 * _ACKED_SLOT:
        raise ValueError(f"it has {len(raw)} bytes, not {2 * _ACKED_SLOT}")
    records, problems = [], []
    for k in range(2):
        slot = raw[k * _ACKED_SLOT : (k + 1) * _ACKED_SLOT]
        if slot.count(0) == _ACKED_SLOT:
            continue  # never written
        try:
            records.append(_parse_acked_slot(slot))
        except ValueError as e:
            problems.append(f"slot {k}: {e}")  # a write cut short, if the other verifies
    if not records:
        raise ValueError("; ".join(problems) or "both slots are empty")
    return max(records)


def _fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (POSIX: fsync the directory). Windows cannot
    open a directory; its rename (MoveFileEx) is flushed with the file."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``os.write`` may write less than asked)."""
    os.lseek(fd, offset, os.SEEK_SET)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_acked(side: str, tops, previous: _Acked | None) -> None:
    """Record ``tops`` durably in the ``-acked`` file ``side``, whose newest record is
    ``previous`` (None: no file, or one to replace whole). In place: overwrite the
    other slot than ``previous``'s and flush it (fdatasync). A new file is written
    beside, fsynced, renamed over ``side`` and the directory fsynced: a crash leaves
    the old file or the new one, never a part."""
    if previous is not None:
        seq = previous.seq + 1
        fd = os.open(side, os.O_RDWR)
        try:
            _write_all(fd, _acked_slot(seq, tops), (seq % 2) * _ACKED_SLOT)
            getattr(os, "fdatasync", os.fsync)(fd)  # no fdatasync on macOS/Windows
        finally:
            os.close(fd)
        return
    data = bytearray(2 * _ACKED_SLOT)
    data[_ACKED_SLOT:] = _acked_slot(1, tops)  # seq 1 lives in slot 1
    # One name per process and thread: two writers never share a temporary file.
    tmp = f"{side}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _write_all(fd, bytes(data), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, side)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(side)))


class NewRows(NamedTuple):
    """What a read found appended since the previous one: ``answers`` as ``(id, i, j,
    alike: bool, time, source)`` and ``retractions`` as ``(id, answer_id, time,
    source)``, in id order. ``rebuild``: a retraction names an answer read before, so
    ``answers`` is the whole log, to replay from scratch (a union-find cannot remove
    an edge; rare: a person pressing undo)."""

    answers: list
    retractions: list
    rebuild: bool


class AnswerLog:
    """What :class:`palfast.active.RelationStore` needs of a log, whatever holds it
    (:class:`SQLiteAnswerLog` here, :class:`palfast.active.postgres_log.PostgresAnswerLog`):

    * ``load()`` once after opening, then ``read_new(where)``, ``append(where, pairs,
      answers, source)`` and ``retract(where, ids, source)`` return :class:`NewRows`:
      what was appended since the previous call, in log order, every row verified;
    * ``rows(where)``, ``backup(where, dst)``, ``check_writable(where)``, ``close()``;
    * ``path`` (how messages name the store), ``readonly``, and the cursor
      ``last_answer``, ``last_retraction``, ``retracted`` (answer ids retracted).

    Rows are ``(id, *integer columns, time, source bytes, crc)`` as a backend's
    ``_fetch`` reads them; this class checks them (:func:`_check_row`) and that ids run
    1, 2, 3, … without a gap, and keeps the cursor.
    """

    path: str | None
    readonly: bool
    _version = SCHEMA_VERSION

    def _init_cursor(self) -> None:
        self.retracted: set[int] = set()  # answer ids named by a retraction
        self.last_answer = 0  # id of the last answers row read
        self.last_retraction = 0  # id of the last retraction read

    def _fetch(self, db, table: str, after: int) -> list:
        """The raw rows of ``table`` with id > ``after``, in id order (see the class)."""
        raise NotImplementedError

    def _tables(self) -> tuple[str, ...]:
        return _LOG_TABLES

    def _corrupt(self, what: str) -> StoreCorruptError:
        raise NotImplementedError

    def _verified(self, table: str, row, version: int | None = None):
        try:
            return _check_row(table, row, self._version if version is None else version)
        except ValueError as e:
            raise self._corrupt(f"{table} row id={row[0]} fails its check: {e}") from None

    def _read(self, db, table: str, after: int) -> list:
        """The verified rows of ``table`` with id > ``after``, in id order."""
        rows = self._fetch(db, table, after)
        out, version, expected = [], self._version, after + 1
        for row in rows:
            try:
                checked = _check_row(table, row, version)
            except ValueError as e:
                raise self._corrupt(f"{table} row id={row[0]} fails its check: {e}") from None
            if checked[0] != expected:  # ids are 1, 2, 3, ... (no delete)
                raise self._corrupt(f"{table} row id={expected} is missing (the next row has id={checked[0]})")
            out.append(checked)
            expected += 1
        return out

    def _read_new(self, db) -> NewRows:
        """What was appended since our last look, read in the caller's transaction (one
        snapshot, so every retraction names an answer read here or before):
        ``(answers rows, retractions, rebuild)``. ``rebuild``: a retraction names an
        answer already applied; union-find cannot remove an edge, so the rows are then
        the whole log, to replay from scratch (rare: a person pressing undo)."""
        retractions = self._read(db, "retractions", self.last_retraction) if "retractions" in self._tables() else []
        rebuild = any(r[1] <= self.last_answer for r in retractions)
        rows = self._read(db, "answers", 0 if rebuild else self.last_answer)
        last = rows[-1][0] if rows else self.last_answer
        seen = set()
        for seq, answer_id, _, _ in retractions:
            if answer_id > last or answer_id in self.retracted or answer_id in seen:
                raise self._corrupt(
                    f"retractions row id={seq} names answer id={answer_id}, "
                    f"which is not in the log or already retracted"
                )
            seen.add(answer_id)
        return NewRows(rows, retractions, rebuild)

    def _advance(self, new: NewRows) -> None:
        """Move past ``new`` (once its transaction is over: a failed call reads it again)."""
        self.retracted.update(r[1] for r in new.retractions)
        if new.retractions:
            self.last_retraction = new.retractions[-1][0]
        if new.answers:
            self.last_answer = new.answers[-1][0]

    # The backend's part: ``_transaction(where, write=False)`` (a context manager giving
    # the connection: a write takes the log's write lock, a read is one snapshot),
    # ``_next_id(db, table)`` (under the write lock), ``_insert(db, table, rows)`` and,
    # around a read, ``_before_snapshot()`` / ``_check_snapshot(db, before, new)``.

    def append(
        self, where: str, pairs: list, answers: list, source: str, state: dict[str, str] | None = None
    ) -> tuple[NewRows, list[int]]:
        """Append one answers row per ``(i, j)`` of ``pairs`` and ``alike`` of ``answers``
        (checked by the caller), in one transaction, durable on return; ``state`` (key →
        JSON text of :func:`state_text`) is saved in the same transaction.
        Returns what is new since the last read, the rows of this call last, and their
        ids. On any error nothing of this call is written."""
        src = source.encode("utf-8")
        now = time.time()
        with self._transaction(where, write=True) as db:
            # Rows other processes appended since our last look come first (smaller ids),
            # so every process replays the same log in the same order. They are read
            # before our INSERT, under the write lock (nothing else is appended until
            # COMMIT), so our rows follow them and are applied from what we wrote rather
            # than read back and verified again (that was a third of record's time).
            others, retractions, rebuild = self._read_new(db)
            first = self._next_id(db, "answers")
            rows = [
                (first + k, i, j, int(x), now, source, row_crc(first + k, i, j, int(x), now, src))
                for k, ((i, j), x) in enumerate(zip(pairs, answers))
            ]
            self._insert(db, "answers", rows)
            if state:
                self._put_state(db, state)
        ours = [(seq, i, j, bool(x), t, source) for seq, i, j, x, t, _, _ in rows]
        new = NewRows(others + ours, retractions, rebuild)
        self._advance(new)
        return new, [r[0] for r in rows]

    def retract(self, where: str, ids: list, source: str) -> NewRows:
        """Append one retraction per answer id of ``ids`` (distinct, checked by the
        caller) in one transaction; ``ValueError`` when an id is not in the log or
        already retracted (nothing is written then). Returns what is new since the last
        read, this call's retractions included."""
        src = source.encode("utf-8")
        now = time.time()
        with self._transaction(where, write=True) as db:
            new = self._read_new(db)  # what other processes appended counts too
            last = new.answers[-1][0] if new.answers else self.last_answer
            if missing := [a for a in ids if not 1 <= a <= last]:  # log ids are 1..last
                raise ValueError(f"{where}: no answer with id {missing} in the log (ids are what record() returned)")
            done = self.retracted.union(r[1] for r in new.retractions).intersection(ids)
            if done:
                raise ValueError(f"{where}: answers {sorted(done)} are already retracted")
            first = self._next_id(db, "retractions")
            self._insert(
                db,
                "retractions",
                [(first + k, a, now, source, row_crc(first + k, a, now, src)) for k, a in enumerate(ids)],
            )
            new = self._read_new(db)
        self._advance(new)
        return new

    def read_new(self, where: str) -> NewRows:
        """What other processes appended since the last read (one snapshot)."""
        before = self._before_snapshot()
        with self._transaction(where) as db:
            new = self._read_new(db)
            self._check_snapshot(db, before, new)
        self._advance(new)
        return new

    def rows(self, where: str, after: int = 0) -> list[tuple]:
        """Every answer with id > ``after``, retracted ones included, read and verified,
        in id order: ``(id, i, j, answer: bool, time, source, retracted_by)``."""
        with self._transaction(where) as db:
            rows = self._read(db, "answers", after)
            by = {} if "retractions" not in self._tables() else {r[1]: r[3] for r in self._read(db, "retractions", 0)}
        return [(*row, by.get(row[0])) for row in rows]

    # ------------------------------------------------- strategy state (schema 4)
    #: The backend's SQL parameter marker.
    _PARAM = "?"

    def _put_state(self, db, state: dict[str, str]) -> None:
        """Save ``state`` (key → JSON text of :func:`state_text`) in the caller's write
        transaction, replacing the earlier value of each key."""
        now = time.time()
        marks = ", ".join([self._PARAM] * 4)
        for key, text in state.items():
            db.execute(
                f"INSERT INTO state (key, value, time, crc) VALUES ({marks}) ON CONFLICT (key) "
                f"DO UPDATE SET value = excluded.value, time = excluded.time, crc = excluded.crc",
                (key, text, now, state_crc(key, text, now)),
            )

    def save_state(self, where: str, state: dict[str, str]) -> None:
        """Save ``state`` (see :meth:`_put_state`) in one transaction, durable on return."""
        with self._transaction(where, write=True) as db:
            self._put_state(db, state)

    def load_state(self, where: str, key: str) -> dict | None:
        """The value last saved under ``key``, verified; None when there is none (or the
        store, read read-only, predates the state table)."""
        if self._version < STATE_SINCE:
            return None
        with self._transaction(where) as db:
            row = db.execute(f"{_STATE_SELECT} WHERE key = {self._PARAM}", (key,)).fetchone()
        if row is None:
            return None
        value, problem = _verified_state(key, *row)
        if problem:
            raise StoreCorruptError(
                f"{where}: {self._shown_name()}: state row key={key!r} fails its check: {problem}. "
                f"It was damaged or edited outside palfast; the answers are not affected. "
                f"save_state({key!r}, {{}}) replaces it (the strategy then starts afresh)"
            )
        return value

    def _shown_name(self) -> str:
        """The store as messages name it."""
        return repr(self.path) if self.path is not None else "the in-memory store"


class SQLiteAnswerLog(AnswerLog):
    """The answers and retractions of one store in an SQLite file (or in memory), with
    the guarantees of the module docstring. It reads and appends rows and remembers how
    far it has read (:attr:`last_answer`, :attr:`last_retraction`, :attr:`retracted`);
    :class:`palfast.active.RelationStore` turns the rows into the relation.

    Args (checked by the caller, :class:`palfast.active.RelationStore`):
        path: the file, ``None`` for an in-memory log.
        timeout, readonly, accept_loss: as :class:`palfast.active.RelationStore`'s.
    """

    def __init__(
        self, path: str | None = None, *, timeout: float = 30.0, readonly: bool = False, accept_loss: bool = False
    ):
        self.path = path
        self.readonly = readonly
        self._timeout = timeout
        self._accept_loss = accept_loss
        # Whether the main file was there before this open: if not, an -acked file
        # beside it belongs to a deleted store (see _initialise).
        self._existed = self.path is not None and os.path.exists(self.path)
        self._db: sqlite3.Connection | None = None
        self._version = SCHEMA_VERSION
        self._init_cursor()
        self._check_path()
        with self._opening():
            self._db = self._connect()
            self._open()

    @contextlib.contextmanager
    def _opening(self):
        """While opening: on any error close the database; sqlite3 errors (and the
        undecodable messages SQLite gives for some damaged files) become palfast ones."""
        try:
            yield
        except BaseException as e:
            if self._db is not None:
                self._db.close()
                self._db = None
            if isinstance(e, sqlite3.Error):
                raise _sqlite_error("RelationStore", self.path, e, readonly=self.readonly, opening=True) from e
            if isinstance(e, UnicodeDecodeError):  # SQLite's message quotes damaged bytes
                raise StoreCorruptError(
                    f"RelationStore: {self.path!r} is not a palfast RelationStore, or is "
                    f"damaged (SQLite's error message is not valid text: {e}). If it is a "
                    f"store, RelationStore.salvage(path, new_path) copies the rows that "
                    f"still verify"
                ) from e
            raise

    def load(self) -> NewRows:
        """The first read, once after opening: every row (verified), in one snapshot with
        the integrity checks (see the module docstring)."""
        with self._opening():
            return self._load()

    def _check_path(self) -> None:
        if self.path is None:
            return
        if os.path.isdir(self.path):
            raise ValueError(f"RelationStore: path must be a file, got the directory {self.path!r}")
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise StoreError(
                f"RelationStore: the directory {folder!r} of {self.path!r} does not exist; create it first"
            )
        if self.readonly:
            if not os.path.exists(self.path):
                raise StoreError(
                    f"RelationStore: {self.path!r} does not exist (readonly=True "
                    f"opens an existing store and never creates one)"
                )
        elif not os.access(folder, os.W_OK) or (os.path.exists(self.path) and not os.access(self.path, os.W_OK)):
            raise StoreError(
                f"RelationStore: cannot write {self.path!r}: the file or its "
                f"directory is read-only (SQLite writes the file and creates '-wal' "
                f"and '-shm' files beside it). Make both writable, or pass "
                f"readonly=True to read it"
            )

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (one transaction per record).
        if self.readonly:
            return _connect_ro(self.path, self._timeout)
        return sqlite3.connect(
            self.path or ":memory:", timeout=self._timeout, isolation_level=None, check_same_thread=False
        )

    def _conn(self, where: str) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"{where}: the store {self.path!r} is closed; open it again with RelationStore(path)")
        return self._db

    def _open(self) -> None:
        db = self._db
        app_id = db.execute("PRAGMA application_id").fetchone()[0]  # reads the header
        if app_id == 0 and self._existed:
            # An existing file without the marker: a new empty file, or a store whose
            # first transactions (the schema itself) were in a -wal that is gone.
            self._check_acked(db, self._acked(), _NO_ROWS)
        if self.readonly:
            if app_id != APPLICATION_ID:
                raise ValueError(
                    f"RelationStore: {self.path!r} is not a palfast RelationStore "
                    f"(application_id {app_id:#x}, expected {APPLICATION_ID:#x})"
                )
            self._check_meta()
            return
        db.execute("PRAGMA foreign_keys = ON")
        if self.path is not None and app_id == APPLICATION_ID:
            self._set_wal()
        db.execute("PRAGMA synchronous = FULL")
        if app_id not in (0, APPLICATION_ID) and bin(app_id ^ APPLICATION_ID).count("1") == 1:
            raise StoreCorruptError(
                f"RelationStore: {self.path!r} has application_id "
                f"{app_id:#x}, one bit away from palfast's "
                f"{APPLICATION_ID:#x}: a damaged store? "
                f"RelationStore.salvage(path, new_path) copies the rows "
                f"that still verify"
            )
        if app_id not in (0, APPLICATION_ID):
            raise ValueError(
                f"RelationStore: {self.path!r} is an SQLite database of another "
                f"application (application_id {app_id:#x}, expected "
                f"{APPLICATION_ID:#x}); refusing to write into it"
            )
        if app_id == 0:
            self._initialise()
        self._check_meta()
        if self._version < SCHEMA_VERSION:
            self._migrate()

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
                raise ValueError(
                    f"RelationStore: could not switch {self.path!r} to WAL mode (got journal_mode={mode!r})"
                )
        db.execute("BEGIN IMMEDIATE")
        try:
            app_id = db.execute("PRAGMA application_id").fetchone()[0]
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if app_id == 0:
                self._refuse_foreign(tables)
                if self.path is not None and not self._existed:
                    # The main file was deleted (a fresh start): the -acked record of
                    # the old store says nothing about this one. Under the write lock,
                    # before any row of the new store is acknowledged.
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self.path + ACKED_SUFFIX)
                for statement in _SCHEMA:
                    db.execute(statement)
                db.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [
                        ("application", "palfast.RelationStore"),
                        ("schema_version", str(SCHEMA_VERSION)),
                        ("created", repr(time.time())),
                    ],
                )
                db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _refuse_foreign(self, n_objects: int) -> None:
        if n_objects:
            raise ValueError(
                f"RelationStore: {self.path!r} is an SQLite database with "
                f"{n_objects} objects but no palfast marker; refusing to write "
                "into a foreign database"
            )

    def _check_meta(self) -> None:
        try:
            meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
            self._db.execute("SELECT id, i, j, answer, time, source FROM answers LIMIT 0")
        except sqlite3.DatabaseError as e:
            raise StoreCorruptError(
                f"RelationStore: {self.path!r} carries the palfast marker but its tables are missing or damaged ({e})"
            ) from e
        if meta.get("application") != "palfast.RelationStore":
            raise StoreCorruptError(
                f"RelationStore: {self.path!r} has no palfast meta record (got application={meta.get('application')!r})"
            )
        version = schema_version(meta, self.path)
        if version < 1:
            raise StoreCorruptError(
                f"RelationStore: {self.path!r} has an invalid schema version {meta.get('schema_version')!r}"
            )
        # meta.schema_version has no checksum: a flipped bit must not pick the code path
        # of another schema (an older one ignores the retractions), so the tables the
        # file has must be those of the version it names, no fewer and no more.
        found = _layout_version(self._db)
        if found != version:
            what = next(w for since, w in _LAYOUT if (version >= since) != (found >= since))
            raise StoreCorruptError(
                f"RelationStore: {self.path!r}: meta.schema_version is {meta.get('schema_version')!r} but the "
                f"file's tables are those of schema {found} (it "
                f"{'lacks' if version > found else 'has'} the {what}): the version record "
                f"or the tables are damaged. RelationStore.salvage(path, new_path) copies "
                f"the rows that verify (it reads the tables the file has)"
            )
        self._version = version

    def _migrate(self) -> None:
        """Bring an older file to :data:`SCHEMA_VERSION`, step by step, in one transaction
        (a crash leaves the old version intact):

        * 1 → 2: add and fill the answers' crc column. Rows are validated first: a
          version-1 row that is not a valid answer stops the migration (nothing is
          changed) with the error naming it.
        * 2 → 3: add the (empty) retractions table.
        * 3 → 4: add the (empty) state table.
        """
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            # Re-read under the lock: another process may have migrated it meanwhile.
            version = int(db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
            if version < 2:
                crcs = []
                for row in db.execute(_select("answers", 1) + " ORDER BY id").fetchall():
                    seq, i, j, a, t, _ = self._verified("answers", row, version=1)
                    crcs.append((row_crc(seq, i, j, int(a), t, row[5]), seq))
                db.execute("DROP TRIGGER answers_no_update")  # the UPDATE that fills crc
                db.execute("ALTER TABLE answers ADD COLUMN crc INTEGER CHECK (crc BETWEEN 0 AND 4294967295)")
                db.executemany("UPDATE answers SET crc = ? WHERE id = ?", crcs)
                db.execute(_append_only("answers")[0])
            if version < 3:
                for statement in _RETRACTIONS:
                    db.execute(statement)
            if version < STATE_SINCE:
                db.execute(_STATE_TABLE)
            if version < SCHEMA_VERSION:
                db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._version = SCHEMA_VERSION

    def _corrupt(self, what: str) -> StoreCorruptError:
        return StoreCorruptError(
            f"RelationStore: {self.path!r}: {what}. The file was damaged or edited outside "
            f"palfast; the store refuses to open rather than drop or change answers. "
            f"RelationStore.salvage(path, new_path) copies the rows that verify into a new "
            f"store"
        )

    def _fetch(self, db: sqlite3.Connection, table: str, after: int) -> list:
        return db.execute(_select(table, self._version) + " WHERE id > ? ORDER BY id", (after,)).fetchall()

    def _tables(self) -> tuple[str, ...]:
        """The log tables this file has (a read-only version 1 or 2 file: no retractions)."""
        return ("answers", "retractions") if self._version >= 3 else ("answers",)

    def _load(self) -> NewRows:
        """First read: every row (its check names it), the structure, nothing missing at
        the end of either table."""
        db = self._db
        # Read before the snapshot: every row it records was committed before it was
        # written, so the snapshot holds it unless the row was lost.
        acked = self._acked()
        # One snapshot: a row another process appends meanwhile must not look missing.
        db.execute("BEGIN")
        try:
            first = self._read_new(db)
            self._advance(first)
            if self.path is not None:
                problems = [r[0] for r in db.execute("PRAGMA quick_check(5)").fetchall()]
                if problems != ["ok"]:
                    raise StoreCorruptError(
                        f"RelationStore: {self.path!r} is damaged (SQLite quick_check: "
                        f"{'; '.join(map(str, problems))}). RelationStore.salvage(path, "
                        f"new_path) copies the rows that still verify into a new store"
                    )
            for table, last in zip(self._tables(), (self.last_answer, self.last_retraction)):
                seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
                seq = 0 if seq is None else seq[0]
                if seq != last:
                    raise self._corrupt(
                        f"the {table} log ends at row id={last} but SQLite "
                        f"handed out ids up to {seq!r}: rows are missing"
                    )
            tops = self._tops(db)
            self._check_acked(db, acked, tops)
        finally:
            if db.in_transaction:
                db.execute("ROLLBACK")  # it only read
        if self.path is not None and not self.readonly:
            # Bring the record up to the file: an older store without one, rows whose
            # writer was killed before acknowledging them, an accepted loss.
            if self._accept_loss or (acked.tops if acked else _NO_ROWS) != tops:
                self._acknowledge("RelationStore")
            self._accept_loss = False  # accepted once: the record now matches the file
        return first

    # ------------------------------------------------ acknowledged rows (-acked file)
    def _acked(self) -> _Acked | None:
        """The newest record of ``<path>-acked``, None if there is none (or an in-memory
        store, or ``accept_loss`` and it is unreadable). Read it *before* taking the
        snapshot it is compared with."""
        if self.path is None:
            return None
        side = self.path + ACKED_SUFFIX
        try:
            return _read_acked(side)
        except (ValueError, OSError) as e:
            if self._accept_loss:
                return None
            if isinstance(e, OSError):
                raise StoreError(
                    f"RelationStore: cannot read {side!r}, the record of the "
                    f"answers acknowledged in {self.path!r} ({e}); make it "
                    f"readable"
                ) from e
            raise StoreCorruptError(
                f"RelationStore: {side!r}, the record of the answers acknowledged in "
                f"{self.path!r}, is damaged: {e}. The store itself may be intact; open it "
                f"with RelationStore(path, accept_loss=True) to rewrite the record from "
                f"the rows the store holds (rows lost from its '-wal' would then go "
                f"unnoticed)"
            ) from None

    def _tops(self, db: sqlite3.Connection) -> tuple:
        """``((last answers id, its crc), (last retractions id, its crc))`` in ``db``'s
        snapshot; (0, 0) for an empty or absent table, crc 0 without a crc column."""
        tops = []
        for table in _LOG_TABLES:
            row = None
            if table in self._tables():
                crc = "coalesce(crc, 0)" if self._version >= 2 else "0"
                row = db.execute(f"SELECT id, {crc} FROM {table} ORDER BY id DESC LIMIT 1").fetchone()
            tops.append(tuple(row) if row else (0, 0))
        return tuple(tops)

    def _check_acked(self, db: sqlite3.Connection, acked: _Acked | None, tops) -> None:
        """Raise :class:`StoreCorruptError` when a row ``acked`` (read before ``db``'s
        snapshot) records as acknowledged is missing from the snapshot (whose last rows
        are ``tops``), or differs from the acknowledged one (another CRC-32)."""
        if acked is None or self._accept_loss:
            return
        for table, (n, crc), (have, have_crc) in zip(_LOG_TABLES, acked.tops, tops):
            if n == 0:
                continue
            if n < have:
                row = db.execute(f"SELECT coalesce(crc, 0) FROM {table} WHERE id = ?", (n,)).fetchone()
                have_crc = None if row is None else row[0]
            if n > have or have_crc is None:
                raise self._lost(acked.tops, tops)
            if have_crc != crc:
                raise StoreCorruptError(
                    f"RelationStore: {self.path!r}: {table} row id={n} is not the row "
                    f"{self.path + ACKED_SUFFIX!r} records as acknowledged (CRC-32 "
                    f"{have_crc:#010x}, recorded {crc:#010x}): the file was replaced by "
                    f"another store or a copy that diverged. Restore the store the record "
                    f"belongs to, or open with RelationStore(path, accept_loss=True) to "
                    f"continue with this one"
                )

    def _lost(self, acked, tops) -> StoreCorruptError:
        (a, _), (r, _) = acked
        (have_a, _), (have_r, _) = tops
        return StoreCorruptError(
            f"RelationStore: {self.path!r} holds answers up to id={have_a} and retractions "
            f"up to id={have_r}, but {self.path + ACKED_SUFFIX!r} records that answers up "
            f"to id={a} and retractions up to id={r} were acknowledged (record() or "
            f"retract() had returned): acknowledged answers were lost. The usual cause is "
            f"a damaged, truncated or deleted {self.path + '-wal'!r}: SQLite stops "
            f"replaying it at the first frame whose checksum fails and drops every later "
            f"transaction without an error; or the database file was replaced by an older "
            f"copy. Restore a backup that holds them (made with RelationStore.backup, or "
            f"the main file, '-wal' and '-shm' copied together), or open with "
            f"RelationStore(path, accept_loss=True) to continue with the answers that are "
            f"left (ask the lost ones again; RelationStore.salvage copies what is left too)"
        )

    def _acknowledge(self, where: str) -> None:
        """Bring ``<path>-acked`` up to the rows committed now, durably (see
        :func:`_write_acked`): after every write transaction, before ``record`` or
        ``retract`` returns, and after a writable open. Raises instead of lowering it
        when rows it records are gone (unless ``accept_loss`` at open)."""
        db = self._db
        try:
            # The write lock orders the writers of the record: each writes the rows
            # committed when it holds the lock, so the record never goes back.
            db.execute("BEGIN IMMEDIATE")
            acked = self._acked()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e).lower() and "busy" not in str(e).lower():
                raise
            # Another writer held the lock past the timeout. Our rows are committed:
            # record them without the lock, reading the record before the snapshot. A
            # concurrent writer's newer record may be overwritten by ours, which only
            # narrows what a later open can detect, never raises a false alarm.
            acked = self._acked()
            db.execute("BEGIN")
        try:
            tops = self._tops(db)
            self._check_acked(db, acked, tops)
            if acked is None or acked.tops != tops or self._accept_loss:
                side = self.path + ACKED_SUFFIX
                try:
                    # Accepting a loss (or a damaged record): a new file, so that no
                    # slot keeps the rows that were lost.
                    _write_acked(side, tops, None if self._accept_loss else acked)
                except OSError as e:
                    raise StoreError(
                        f"{where}: the rows of this call are committed to {self.path!r}, "
                        f"but {side!r}, the record of acknowledged answers, could not be "
                        f"written ({e}); do not record them again. Free space or fix the "
                        f"permissions of the directory"
                    ) from e
        finally:
            db.execute("ROLLBACK")  # it only read

    def close(self) -> None:
        """Close the database (idempotent); later calls raise :class:`StoreError`."""
        if self._db is not None:
            self._db.close()
            self._db = None

    # ------------------------------------------------------------- reading, appending
    @contextlib.contextmanager
    def _transaction(self, where: str, *, write: bool = False):
        """One transaction on the open database: ``write`` takes the write lock up front
        (``BEGIN IMMEDIATE``: no lock-upgrade deadlock between writers), a read is one
        snapshot. Rolled back on any error; sqlite3 errors become palfast ones."""
        db = self.check_writable(where) if write else self._conn(where)
        try:
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            if write and self.path is not None:
                self._acknowledge(where)  # before record/retract returns
        except sqlite3.Error as e:
            raise _sqlite_error(where, self.path, e, readonly=self.readonly) from e

    def check_writable(self, where: str) -> sqlite3.Connection:
        """The connection, or :class:`StoreError` when the log is closed or
        read-only."""
        db = self._conn(where)
        if self.readonly:
            raise StoreError(
                f"{where}: {self.path!r} was opened with readonly=True; open it without readonly to change the log"
            )
        return db

    @staticmethod
    def _next_id(db: sqlite3.Connection, table: str) -> int:
        """The id AUTOINCREMENT would give the next row of ``table`` (under the write lock),
        assigned by us so that the checksum can cover it."""
        return db.execute(
            f"SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = '{table}'), 0),"
            f" coalesce((SELECT max(id) FROM {table}), 0)) + 1"
        ).fetchone()[0]

    def _insert(self, db: sqlite3.Connection, table: str, rows: list) -> None:
        cols = ("id", *_COLUMNS[table], "time", "source", "crc")
        db.executemany(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", rows)

    def _before_snapshot(self):
        return self._acked()  # read before the snapshot it is compared with (see _load)

    def _check_snapshot(self, db: sqlite3.Connection, acked, new: NewRows) -> None:
        self._check_acked(db, acked, self._tops(db))

    # ------------------------------------------------------------------ copies
    def backup(self, where: str, dst: str) -> None:
        """Copy the store, WAL content included, into a new file ``path`` (SQLite's online
        backup API: a consistent snapshot even while other processes write). ``path``
        must not exist (the caller checked the path). The copy is verified by opening it
        read-only.

        Copying the main file alone (``cp answers.sqlite``) can lose the answers that
        are still in ``answers.sqlite-wal``: use this, or copy while no process has the
        store open and after one closed it cleanly."""
        db = self._conn(where)
        if os.path.exists(dst):
            raise ValueError(f"{where}: {dst!r} already exists; choose a new path (a backup never overwrites a file)")
        folder = os.path.dirname(os.path.abspath(dst))
        if not os.path.isdir(folder):
            raise StoreError(f"{where}: the directory {folder!r} does not exist; create it first")
        # An -acked record beside a path with no database belongs to a deleted store.
        with contextlib.suppress(FileNotFoundError):
            os.remove(dst + ACKED_SUFFIX)
        try:
            out = sqlite3.connect(dst)
            try:
                db.backup(out)
                if self.path is None:  # an in-memory store becomes a WAL file store
                    out.execute("PRAGMA journal_mode = WAL")
            finally:
                out.close()
        except sqlite3.Error as e:
            raise _sqlite_error(where, dst, e) from e
        copy = SQLiteAnswerLog(dst, readonly=True)
        try:
            copy.load()
        finally:
            copy.close()
        got = (copy.last_answer, copy.last_retraction)
        if got[0] < self.last_answer or got[1] < self.last_retraction:
            raise StoreError(
                f"{where}: the copy {dst!r} holds {got[0]} answers and "
                f"{got[1]} retractions, fewer than this store's "
                f"{self.last_answer} and {self.last_retraction}"
            )
        # The read-only check may leave an empty -wal and its -shm: the copy is one file.
        if os.path.exists(dst + "-wal") and os.path.getsize(dst + "-wal") == 0:
            for side in (dst + "-wal", dst + "-shm"):
                if os.path.exists(side):
                    os.remove(side)


def salvage(src: str | os.PathLike, dst: str | os.PathLike) -> SalvageReport:
    """Copy every row of a damaged store ``src`` that still verifies (values and
    checksum) into a new store ``dst``, in log order, keeping each answer's pair,
    time and source (row ids are renumbered 1, 2, …), and each retraction whose
    answer was kept (pointed at the answer's new id). ``src`` is only read. Rows
    without a checksum but with valid values (written by an older palfast after a
    migration) are kept and listed as ``unverified``. Returns :class:`SalvageReport`
    with the rows kept and, for each row dropped, its id and why. Check the report:
    the dropped answers may need to be asked again, and a dropped retraction brings
    its answer back. The strategy state (schema 4) is copied too, each row that
    verifies with its value and time (``state_kept``, ``state_dropped``)."""
    where = "RelationStore.salvage"
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.exists(dst):
        raise ValueError(f"{where}: {dst!r} already exists; choose a new path")
    if not os.path.isfile(src):
        raise StoreError(f"{where}: {src!r} does not exist")
    try:
        db = _connect_ro(src, 5.0)
    except sqlite3.Error as e:
        raise _sqlite_error(where, src, e, readonly=True, opening=True) from e
    try:
        # The tables say which version the rows have (meta.schema_version has no
        # checksum); a damaged schema falls back to the current layout.
        try:
            version = _layout_version(db)
        except sqlite3.Error:
            version = SCHEMA_VERSION
        answers, dropped, unverified = _salvage_table(db, where, src, "answers", version)
        retractions, r_dropped = [], []
        if version >= 3:
            retractions, r_dropped, _ = _salvage_table(db, where, src, "retractions", version)
        states, s_dropped = _salvage_state(db) if version >= STATE_SINCE else ([], [])
    finally:
        db.close()
    new_id = {row[0]: k + 1 for k, row in enumerate(answers)}
    kept_retractions = {}  # new answer id -> (time, source); UNIQUE in the new store
    for seq, answer_id, t, s in retractions:
        if answer_id not in new_id or new_id[answer_id] in kept_retractions:
            r_dropped.append(
                (seq, f"names answer id={answer_id}, which is not in the salvaged log or already retracted")
            )
        else:
            kept_retractions[new_id[answer_id]] = (t, s)
    out = SQLiteAnswerLog(dst)
    try:
        out.load()
        with out._transaction(where, write=True) as db:
            out._insert(
                db,
                "answers",
                [
                    (k + 1, i, j, int(a), t, s, row_crc(k + 1, i, j, int(a), t, s.encode()))
                    for k, (_, i, j, a, t, s) in enumerate(answers)
                ],
            )
            out._insert(
                db,
                "retractions",
                [
                    (k + 1, a, t, s, row_crc(k + 1, a, t, s.encode()))
                    for k, (a, (t, s)) in enumerate(kept_retractions.items())
                ],
            )
            db.executemany(
                "INSERT INTO state (key, value, time, crc) VALUES (?, ?, ?, ?)",
                [(key, text, t, state_crc(key, text, t)) for key, text, t in states],
            )
    finally:
        out.close()
    return SalvageReport(
        len(answers),
        dropped,
        unverified,
        len(kept_retractions),
        sorted(r_dropped),
        [key for key, _, _ in states],
        s_dropped,
    )


def _salvage_state(db: sqlite3.Connection) -> tuple[list, list]:
    """For :func:`salvage`: ``(key, value text, time)`` of each ``state`` row that passes
    its check, and ``(key, reason)`` for each that does not (the table unreadable: one
    entry with key None; a row whose key is not text cannot be named or checked)."""
    try:
        rows = db.execute("SELECT key, value, time, crc FROM state ORDER BY key").fetchall()
    except sqlite3.Error as e:
        return [], [(None, f"the state table is unreadable ({e})")]
    kept, dropped = [], []
    for key, text, t, crc in rows:
        if type(key) is not str or not key.isascii():
            dropped.append((repr(key), "its key is not ASCII text"))
            continue
        _, problem = _verified_state(key, text, t, crc)
        if problem:
            dropped.append((key, problem))
        else:
            kept.append((key, text, t))
    return kept, dropped
