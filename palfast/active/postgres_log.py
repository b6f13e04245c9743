"""The answer log of a RelationStore in PostgreSQL: ``RelationStore("postgresql://...")``
(docs/active.md, "Choosing a backend"). Needs psycopg 3: ``pip install palfast[postgres]``.

The same tables as the SQLite log (palfast/active/answer_log.py), in the schema the
connection's ``search_path`` names first: ``meta``, ``answers(id, i, j, answer, time,
source, crc)``, ``retractions(id, answer_id, time, source, crc)`` and (schema 4, added
to an older store on its first writable open) ``state(key, value, time, crc)``, every
row with the same CRC-32 (:func:`palfast.active.answer_log.row_crc`; ``source`` is stored
as the UTF-8 bytes the checksum covers). UPDATE, DELETE and TRUNCATE of the two logs are
refused by triggers; a state row is replaced by each save.

One log order for every writer
------------------------------
A writer takes ``LOCK TABLE answers, retractions IN EXCLUSIVE MODE`` (it conflicts with
itself and with every INSERT, never with a plain SELECT) at the start of its
transaction, then reads what others appended, gives its rows the ids ``max(id) + 1, +2,
…`` and commits. Ids are not taken from a sequence: a sequence hands out numbers at
INSERT, so a transaction holding a smaller id can commit after one holding a larger
id, and a reader that remembers the largest id it saw would skip the late row for
ever. Under the lock, the next writer's first statement runs after the previous
writer's COMMIT has made its rows visible (PostgreSQL releases a transaction's locks
only after marking it committed), and its snapshot (READ COMMITTED: one per statement)
is taken after the lock is granted. So ids become visible in order: any snapshot holds
ids 1..n of each table and nothing above a gap, and ``refresh`` reads ``WHERE id > last
seen`` in one REPEATABLE READ snapshot, never skipping a row. Ids run 1, 2, 3, …
without a gap (a rolled-back writer used none), and ``meta`` keeps the last id of each
table, updated in the same transaction, so a row missing at the end is detected too.

Durability
----------
``record`` and ``retract`` are one transaction each and return after COMMIT with
``synchronous_commit = on`` (set for the store's sessions): the rows are in the
server's WAL, flushed to its disk. This rests on the server: ``fsync = on`` (the
default; with it off a crash of the server's machine can lose committed transactions)
and, for a replica, its own replication settings. The ``-acked`` record of the SQLite
store guards a failure of SQLite's ``-wal`` that PostgreSQL's own WAL does not have;
it is not kept here.

Errors: a connection that fails (server down, network, a terminated session) raises
:class:`StoreError` naming the store (its URL without a password) and saying what to
do; the next call connects again. If the connection broke during COMMIT the call's
rows may or may not have been recorded: ``refresh()`` shows which (the error says so).
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import time

from .answer_log import (
    _COLUMNS,
    APPLICATION_ID,
    SCHEMA_VERSION,
    STATE_SINCE,
    AnswerLog,
    NewRows,
    SQLiteAnswerLog,
    StoreCorruptError,
    StoreError,
    schema_version,
)

__all__ = ["URL_SCHEMES", "PostgresAnswerLog", "is_postgres_url"]

#: A RelationStore path starting with one of these is a PostgreSQL connection URL.
URL_SCHEMES = ("postgresql://", "postgres://")
#: ``pg_advisory_xact_lock`` key held while creating the tables, so that two processes
#: opening a new database at once create them once (palfast's application id).
_CREATE_LOCK = APPLICATION_ID
#: Seconds to wait for the server when connecting (libpq's ``connect_timeout`` is an int).
_CONNECT_TIMEOUT = 10

_APPEND_ONLY = """CREATE FUNCTION palfast_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN RAISE EXCEPTION 'palfast RelationStore: the % log is append-only', TG_TABLE_NAME;
    END $$"""
# Schema 4 (as the SQLite store's): the strategy state, one row per key, replaced by
# each save (RelationStore.save_state). A store created at schema 3 gains it on its first
# writable open (PostgresAnswerLog._migrate).
_STATE_TABLE = """CREATE TABLE state (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        time DOUBLE PRECISION NOT NULL,
        crc BIGINT NOT NULL CHECK (crc BETWEEN 0 AND 4294967295))"""
#: The first schema of a PostgreSQL store (schemas 1 and 2 are SQLite's only).
_FIRST_VERSION = 3
_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE answers (
        id BIGINT PRIMARY KEY CHECK (id >= 1),
        i BIGINT NOT NULL CHECK (i >= 0),
        j BIGINT NOT NULL CHECK (j >= 0 AND j <> i),
        answer SMALLINT NOT NULL CHECK (answer IN (0, 1)),
        time DOUBLE PRECISION NOT NULL,
        source BYTEA NOT NULL,
        crc BIGINT NOT NULL CHECK (crc BETWEEN 0 AND 4294967295))""",
    # An answer is retracted at most once and only if it is in the log.
    """CREATE TABLE retractions (
        id BIGINT PRIMARY KEY CHECK (id >= 1),
        answer_id BIGINT NOT NULL UNIQUE REFERENCES answers(id),
        time DOUBLE PRECISION NOT NULL,
        source BYTEA NOT NULL,
        crc BIGINT NOT NULL CHECK (crc BETWEEN 0 AND 4294967295))""",
    _STATE_TABLE,
    _APPEND_ONLY,
    *(
        f"""CREATE TRIGGER {t}_append_only BEFORE UPDATE OR DELETE ON {t}
          FOR EACH ROW EXECUTE FUNCTION palfast_append_only()"""
        for t in _COLUMNS
    ),
    *(
        f"""CREATE TRIGGER {t}_no_truncate BEFORE TRUNCATE ON {t}
          FOR EACH STATEMENT EXECUTE FUNCTION palfast_append_only()"""
        for t in _COLUMNS
    ),
)
#: The ``meta`` keys holding the last id of each log table (updated with the rows).
_TOP = {t: f"{t}_top" for t in _COLUMNS}


def is_postgres_url(path) -> bool:
    """Whether a RelationStore ``path`` names a PostgreSQL database."""
    return isinstance(path, str) and path.startswith(URL_SCHEMES)


def shown(url: str) -> str:
    """``url`` as messages show it: the password replaced by ``***``."""
    url = re.sub(r"(://[^:/@?]*):[^@/?]*@", r"\1:***@", url)
    return re.sub(r"(password=)[^&]*", r"\1***", url)


def _one_line(e: Exception) -> str:
    """A PostgreSQL error's message on one line (libpq's span several), so that a
    command-line tool can print the error as one line."""
    return " ".join(str(e).split())


def _psycopg():
    try:
        import psycopg
    except ImportError as e:
        raise StoreError(
            "RelationStore: a postgresql:// store needs psycopg 3; install it with pip install 'palfast[postgres]'"
        ) from e
    return psycopg


class PostgresAnswerLog(AnswerLog):
    """The log of a RelationStore in a PostgreSQL database (see the module docstring).

    Args (checked by :class:`palfast.active.RelationStore`):
        url: ``postgresql://user@host/db`` (any libpq URL).
        timeout: seconds a writer waits for another's lock (``lock_timeout``).
        readonly: never write (``default_transaction_read_only``); the tables must exist.
    """

    def __init__(self, url: str, *, timeout: float = 30.0, readonly: bool = False):
        self._psycopg = _psycopg()
        self.path = url
        self._shown = shown(url)
        self.readonly = readonly
        self._timeout = timeout
        self._db = None
        self._closed = False
        self._init_cursor()
        try:
            self._db = self._connect("RelationStore")
            self._open()
        except BaseException as e:
            self.close()
            if isinstance(e, self._psycopg.Error):
                raise self._error("RelationStore", e) from e
            raise

    # ------------------------------------------------------------- connection
    def _connect(self, where: str):
        psycopg = self._psycopg
        try:
            db = psycopg.connect(self.path, autocommit=True, connect_timeout=_CONNECT_TIMEOUT)
        except psycopg.Error as e:
            raise self._error(where, e) from e
        # lock_timeout is an int of milliseconds; 0 would mean "wait for ever".
        db.execute(f"SET lock_timeout = {max(1, round(self._timeout * 1000))}")
        db.execute("SET synchronous_commit = on")
        if self.readonly:
            db.execute("SET default_transaction_read_only = on")
        return db

    def _conn(self, where: str):
        if self._closed:
            raise StoreError(f"{where}: the store {self._shown!r} is closed; open it again with RelationStore(url)")
        if self._db is None or self._db.closed or self._db.broken:
            self._db = None
            self._db = self._connect(where)  # after a lost connection: connect again
        return self._db

    def close(self) -> None:
        """Close the connection (idempotent); later calls raise :class:`StoreError`."""
        self._closed = True
        if self._db is not None:
            self._db.close()
            self._db = None

    def _error(self, where: str, e: Exception, writing: bool = False) -> StoreError:
        """A psycopg exception as a palfast one that names the store and says what to do;
        ``writing``: it broke a write transaction (which may have committed)."""
        errors = self._psycopg.errors
        msg = _one_line(e)
        if isinstance(e, errors.LockNotAvailable):
            return StoreError(
                f"{where}: {self._shown!r} stayed locked by another process longer "
                f"than the timeout; retry, or open it with a larger timeout= "
                f"(PostgreSQL says: {msg})"
            )
        if isinstance(e, errors.ReadOnlySqlTransaction):
            return StoreError(
                f"{where}: {self._shown!r} is read-only here (opened with "
                f"readonly=True, or a read-only server or user); open it "
                f"without readonly on a writable server to record answers"
            )
        if isinstance(e, errors.InsufficientPrivilege):
            return StoreError(
                f"{where}: the user of {self._shown!r} lacks a privilege on the store's "
                f"tables (PostgreSQL says: {msg}). A reader needs SELECT on answers, "
                f"retractions, meta and state; a writer also INSERT and UPDATE on the four "
                f"(the write lock, LOCK TABLE ... IN EXCLUSIVE MODE, needs UPDATE; the "
                f"triggers still refuse every UPDATE of a log row), and CREATE on the schema "
                f"to create a new store or upgrade an older one: GRANT them, or open the store with readonly=True "
                f"to only read it. Nothing of this call was written"
            )
        if isinstance(e, errors.DiskFull):
            return StoreError(
                f"{where}: the disk of the server of {self._shown!r} is full; "
                f"nothing of this call was written. Free space and call it "
                f"again (PostgreSQL says: {msg})"
            )
        if isinstance(e, self._psycopg.OperationalError):
            return StoreError(
                f"{where}: cannot reach the PostgreSQL store {self._shown!r}: "
                f"check that the server runs and that the URL, user and "
                f"network are right; the next call connects again. "
                + (
                    "This call's writes may have been committed just before the "
                    "connection broke: refresh() shows the answers the store holds "
                    if writing
                    else ""
                )
                + f"(PostgreSQL says: {msg})"
            )
        return StoreError(f"{where}: PostgreSQL failed on {self._shown!r}: {msg}")

    # ------------------------------------------------------------------ tables
    def _open(self) -> None:
        db = self._db
        if not self.readonly:
            with db.transaction():
                db.execute("SELECT pg_advisory_xact_lock(%s)", (_CREATE_LOCK,))
                if not self._has("meta"):
                    if self._has("answers") or self._has("retractions"):
                        raise ValueError(
                            f"RelationStore: {self._shown!r} has an answers or retractions "
                            f"table but no palfast meta table: refusing to write into a "
                            f"foreign database (use another database or search_path)"
                        )
                    for statement in _SCHEMA:
                        db.execute(statement)
                    db.cursor().executemany(
                        "INSERT INTO meta (key, value) VALUES (%s, %s)",
                        [
                            ("application", "palfast.RelationStore"),
                            ("schema_version", str(SCHEMA_VERSION)),
                            ("created", repr(time.time())),
                            *((k, "0") for k in _TOP.values()),
                        ],
                    )
        if not self._has("meta"):
            raise ValueError(
                f"RelationStore: {self._shown!r} holds no palfast RelationStore "
                f"(no meta table; readonly=True never creates one)"
            )
        self._check_tables()
        if not self.readonly and self._version < SCHEMA_VERSION:
            self._migrate()
            self._check_tables()

    def _migrate(self) -> None:
        """Bring a store of an older schema to :data:`SCHEMA_VERSION` in one transaction
        (3 → 4: add the empty state table), under the creation lock; re-reads the
        version there, as another process may have migrated it meanwhile. Needs CREATE
        on the schema, like creating a store."""
        db = self._db
        with db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_CREATE_LOCK,))
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is not None and row[0] == str(_FIRST_VERSION):
                db.execute(_STATE_TABLE)
                db.execute("UPDATE meta SET value = %s WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))

    def _check_tables(self) -> None:
        """Refuse a ``meta`` table of another application (``ValueError``), a newer
        schema (``ValueError``: upgrade palfast) and palfast's tables with another
        layout or version (``StoreCorruptError``: a PostgreSQL store is created at
        schema 3 or later), as the SQLite store does. Sets ``_version``."""
        db, psycopg = self._db, self._psycopg
        try:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        except psycopg.Error as e:
            raise ValueError(
                f"RelationStore: {self._shown!r} has a meta table that is not palfast's "
                f"({_one_line(e)}); use another database or search_path"
            ) from e
        if meta.get("application") != "palfast.RelationStore":
            raise ValueError(
                f"RelationStore: {self._shown!r} has a meta table that is not "
                f"palfast's (application={meta.get('application')!r}); use another "
                f"database or search_path"
            )
        version = schema_version(meta, self._shown)
        if version < _FIRST_VERSION:
            raise self._corrupt(
                f"it has an invalid schema version {meta.get('schema_version')!r} "
                f"(a PostgreSQL store is {_FIRST_VERSION} to {SCHEMA_VERSION})"
            )
        try:
            for table, cols in _COLUMNS.items():
                db.execute(f"SELECT id, {', '.join(cols)}, time, source, crc FROM {table} LIMIT 0")
        except psycopg.Error as e:
            raise self._corrupt(
                f"its meta table is palfast's but its tables are missing or damaged ({_one_line(e)})"
            ) from e
        # Its existence only: a reader may lack SELECT on it (it needs it for load_state).
        if version >= STATE_SINCE and not self._has("state"):
            raise self._corrupt(f"its meta table records schema {version} but it has no state table")
        self._version = version

    _PARAM = "%s"

    def _shown_name(self) -> str:
        return repr(self._shown)

    def _has(self, table: str) -> bool:
        return self._db.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()[0]

    def _corrupt(self, what: str) -> StoreCorruptError:
        return StoreCorruptError(
            f"RelationStore: {self._shown!r}: {what}. The database was edited outside "
            f"palfast (or damaged); the store refuses to use it rather than drop or change "
            f"answers. Restore it from a backup"
        )

    def load(self) -> NewRows:
        """The first read: every row, verified, and the last ids ``meta`` records."""
        return self.read_new("RelationStore")

    def _check_snapshot(self, db, before, new: NewRows) -> None:
        """The last ids ``meta`` records (written with the rows) are those read: no row
        is missing at the end of either table."""
        tops = dict(db.execute("SELECT key, value FROM meta WHERE key = ANY(%s)", (list(_TOP.values()),)).fetchall())
        for table, rows, last in (
            ("answers", new.answers, self.last_answer),
            ("retractions", new.retractions, self.last_retraction),
        ):
            have = rows[-1][0] if rows else last
            if tops.get(_TOP[table]) != str(have):
                raise self._corrupt(
                    f"the {table} log ends at row id={have} but meta "
                    f"records {tops.get(_TOP[table])!r}: rows are missing"
                )

    def _before_snapshot(self):
        return None

    # ------------------------------------------------------------ transactions
    @contextlib.contextmanager
    def _transaction(self, where: str, *, write: bool = False):
        """A write takes the log's write lock (see the module docstring); a read is one
        REPEATABLE READ snapshot of both tables. Rolled back on any error."""
        psycopg = self._psycopg
        db = self.check_writable(where) if write else self._conn(where)
        try:
            with db.transaction():
                if write:
                    # READ COMMITTED whatever the server's default: each statement's
                    # snapshot is taken after the lock is granted.
                    db.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                    db.execute("LOCK TABLE answers, retractions IN EXCLUSIVE MODE")
                else:
                    db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                yield db
        except psycopg.Error as e:
            raise self._error(where, e, writing=write) from e

    def check_writable(self, where: str):
        db = self._conn(where)
        if self.readonly:
            raise StoreError(
                f"{where}: {self._shown!r} was opened with readonly=True; open it without readonly to change the log"
            )
        return db

    def _next_id(self, db, table: str) -> int:
        return db.execute(f"SELECT coalesce(max(id), 0) + 1 FROM {table}").fetchone()[0]

    def _insert(self, db, table: str, rows: list) -> None:
        """Insert ``rows`` (``(id, *integer columns, time, source, crc)``, ``source`` a
        str) and record the last id in ``meta`` (in the caller's transaction)."""
        if not rows:
            return
        cols = ("id", *_COLUMNS[table], "time", "source", "crc")
        src = cols.index("source")
        db.cursor().executemany(
            f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))})",
            [(*r[:src], r[src].encode("utf-8"), *r[src + 1 :]) for r in rows],
        )
        db.execute("UPDATE meta SET value = %s WHERE key = %s", (str(rows[-1][0]), _TOP[table]))

    def _fetch(self, db, table: str, after: int) -> list:
        cols = ", ".join(_COLUMNS[table])
        rows = db.execute(
            f"SELECT id, {cols}, time, source, crc FROM {table} WHERE id > %s ORDER BY id", (after,)
        ).fetchall()
        return [(*r[:-2], bytes(r[-2]), r[-1]) for r in rows]

    # ------------------------------------------------------------------ copies
    def backup(self, where: str, dst: str) -> None:
        """Copy one snapshot of the log into a new SQLite store ``dst`` (same ids, rows
        and checksums), verified by opening it read-only."""
        with self._transaction(where) as db:
            rows = {t: self._fetch(db, t, 0) for t in _COLUMNS}
            state = []
            if self._version >= STATE_SINCE:
                state = db.execute("SELECT key, value, time, crc FROM state").fetchall()
        if os.path.exists(dst):
            raise ValueError(f"{where}: {dst!r} already exists; choose a new path (a backup never overwrites a file)")
        out = SQLiteAnswerLog(dst)
        try:
            out.load()
            with out._transaction(where, write=True) as sq:
                for table, found in rows.items():
                    out._insert(sq, table, [(*r[:-2], r[-2].decode("utf-8"), r[-1]) for r in found])
                # As they are, checksums included: load_state verifies them in the copy.
                sq.executemany("INSERT INTO state (key, value, time, crc) VALUES (?, ?, ?, ?)", state)
        except sqlite3.Error as e:
            raise StoreError(f"{where}: could not write the copy {dst!r}: {e}") from e
        finally:
            out.close()
        copy = SQLiteAnswerLog(dst, readonly=True)
        try:
            copy.load()
        finally:
            copy.close()
        if (copy.last_answer, copy.last_retraction) != (len(rows["answers"]), len(rows["retractions"])):
            raise StoreError(f"{where}: the copy {dst!r} does not hold the rows read from {self._shown!r}")
