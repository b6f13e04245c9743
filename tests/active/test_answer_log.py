"""The answer log of a RelationStore (palfast/active/answer_log.py): foreign, corrupt
and edited files, per-row CRC-32, salvage, schema migrations, lost '-wal' frames and the
'-acked' record."""

import collections
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from palfast.active import RelationStore
from palfast.active.answer_log import (
    ACKED_SUFFIX,
    APPLICATION_ID,
    SCHEMA_VERSION,
    StoreCorruptError,
    StoreError,
    _read_acked,
    _write_acked,
    row_crc,
)

from _store_helpers import child_env, execute_sql, is_url, random_answers


def test_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "garbage.sqlite"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="not a palfast RelationStore"):
        RelationStore(path)


def test_foreign_database_is_refused(store_path):
    """A database holding an ``answers`` table of another application is refused, on
    both backends, and nothing is written into it."""
    path = store_path
    execute_sql(path, "CREATE TABLE answers (x INTEGER)")
    for readonly in (False, True):
        with pytest.raises(ValueError, match="foreign|not a palfast RelationStore|no palfast"):
            RelationStore(path, readonly=readonly)
    if is_url(path):
        assert _postgres_tables(path) == ["answers"]
        return
    execute_sql(path, "PRAGMA application_id = 1234")
    with pytest.raises(ValueError, match="another application"):
        RelationStore(path)


def test_newer_schema_is_refused(store_path):
    path = store_path
    RelationStore(path).close()
    execute_sql(path, "UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    for readonly in (False, True):
        with pytest.raises(ValueError, match="schema version 99, newer than this palfast understands") as e:
            RelationStore(path, readonly=readonly)
        assert not isinstance(e.value, StoreCorruptError)  # not damage: upgrade palfast


def test_damaged_store_is_refused(tmp_path):
    path = tmp_path / "damaged.sqlite"
    RelationStore(path).close()
    execute_sql(path, "DROP TABLE meta")
    with pytest.raises(ValueError, match="missing or damaged"):
        RelationStore(path)


def test_empty_file_becomes_a_store(tmp_path):
    path = tmp_path / "empty.sqlite"
    path.touch()
    with RelationStore(path) as s:
        s.record([[0, 1]], [True])
    with RelationStore(path) as s:
        assert s.same(0, 1) is True


def test_foreign_database_is_left_untouched(tmp_path):
    path = tmp_path / "foreign.sqlite"
    execute_sql(path, "CREATE TABLE t (x)")
    before = path.read_bytes()
    with pytest.raises(ValueError, match="foreign"):
        RelationStore(path)
    assert path.read_bytes() == before
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_readonly_refuses_a_foreign_file(tmp_path):
    path = tmp_path / "foreign.sqlite"
    execute_sql(path, "CREATE TABLE t (x)")
    with pytest.raises(ValueError, match="not a palfast RelationStore"):
        RelationStore(path, readonly=True)


def _tamper(path, *statements, params=()):
    """Edit a store as another tool would: triggers and CHECK constraints bypassed."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA ignore_check_constraints = ON")
    db.execute("DROP TRIGGER IF EXISTS answers_no_update")
    db.execute("DROP TRIGGER IF EXISTS answers_no_delete")
    for st in statements:
        db.execute(st, params) if "?" in st else db.execute(st)
    db.close()


def _store_with_rows(path, n=5):
    with RelationStore(path) as s:
        s.record(torch.stack([torch.arange(n), torch.arange(1, n + 1)], 1), torch.ones(n, dtype=torch.bool))


@pytest.mark.parametrize(
    "i, j, answer, match",
    [
        (0, 1, 7, "answer is 7, not 0 or 1"),
        (4, 4, 1, "pair \\(4, 4\\) is not two different"),
        (-3, 1, 0, "pair \\(-3, 1\\) is not two different"),
    ],
)
def test_rows_inserted_by_another_tool_are_refused(tmp_path, i, j, answer, match):
    path = tmp_path / "tampered.sqlite"
    _store_with_rows(path)
    t = time.time()
    _tamper(
        path,
        "INSERT INTO answers (id, i, j, answer, time, source, crc) VALUES (6, ?, ?, ?, ?, 'tool', ?)",
        params=(i, j, answer, t, row_crc(6, i, j, answer, t, b"tool")),
    )
    with pytest.raises(StoreCorruptError, match=f"row id=6 fails its check: {match}.*salvage"):
        RelationStore(path)
    with pytest.raises(StoreCorruptError, match="row id=6"):
        RelationStore(path, readonly=True)
    report = RelationStore.salvage(path, tmp_path / "saved.sqlite")
    assert report.kept == 5 and [d[0] for d in report.dropped] == [6]
    with RelationStore(tmp_path / "saved.sqlite") as s:
        assert s.n_queries == 5 and s.same(0, 5) is True


def test_edited_row_fails_its_checksum(tmp_path):
    path = tmp_path / "edited.sqlite"
    _store_with_rows(path)
    _tamper(path, "UPDATE answers SET answer = 0 WHERE id = 3")
    with pytest.raises(StoreCorruptError, match="row id=3 fails its check: its checksum"):
        RelationStore(path)
    report = RelationStore.salvage(path, tmp_path / "saved.sqlite")
    assert report.kept == 4 and report.dropped[0][0] == 3 and report.unverified == []


def test_salvage_keeps_valid_rows_without_checksum(tmp_path):
    """A schema-1 palfast still running after a migration writes rows without a crc:
    the store refuses to open, salvage keeps them and says they were unverified."""
    path = tmp_path / "migrated.sqlite"
    _v1_store(path, [(0, 1, 1, 1.5, "oracle")])
    RelationStore(path).close()  # migrated to schema 2
    _tamper(path, "INSERT INTO answers (i, j, answer, time, source) VALUES (1, 2, 1, 2.0, 'v1')")
    with pytest.raises(StoreCorruptError, match="row id=2 fails its check: checksum is None"):
        RelationStore(path)
    report = RelationStore.salvage(path, tmp_path / "saved.sqlite")
    assert report == (2, [], [2], 0, [], [], [])
    with RelationStore(tmp_path / "saved.sqlite") as s:
        assert s.same(0, 2) is True
    with pytest.raises(ValueError, match="already exists"):
        RelationStore.salvage(path, tmp_path / "saved.sqlite")


@pytest.mark.parametrize(
    "row, match", [(5, "ends at row id=4 but SQLite handed out ids up to 5"), (2, "row id=2 is missing")]
)
def test_deleted_rows_are_detected(tmp_path, row, match):
    path = tmp_path / "deleted.sqlite"
    _store_with_rows(path)
    _tamper(path, f"DELETE FROM answers WHERE id = {row}")
    with pytest.raises(StoreCorruptError, match=match):
        RelationStore(path)
    report = RelationStore.salvage(path, tmp_path / "saved.sqlite")
    assert report.kept == 4 and (row == 5 or report.dropped[0][0] == row)


@pytest.mark.slow
def test_bit_flips_never_change_the_log_silently(tmp_path):
    """Single bit flips anywhere in a closed store (seeded, N trials): each leaves the log
    identical or makes the open raise. Before the checksums: 15 of 300 changed it silently."""
    path = tmp_path / "base.sqlite"
    pairs, ans = random_answers(50, 40, 4, seed=7)
    with RelationStore(path) as s:
        s.record(pairs[:25], ans[:25])
        s.record(pairs[25:], ans[25:], source="prior")
        ref_pairs, ref_answers = s.answers()
    assert not os.path.exists(f"{path}-wal")  # the last close checkpointed
    data = path.read_bytes()
    rng = random.Random(0)
    outcome = collections.Counter()
    silent = []
    trial_path = tmp_path / "trial.sqlite"
    for trial in range(400):
        bit = rng.randrange(len(data) * 8)
        flipped = bytearray(data)
        flipped[bit >> 3] ^= 1 << (bit & 7)
        for suffix in ("", "-wal", "-shm", ACKED_SUFFIX):  # the main file's checks alone
            if os.path.exists(f"{trial_path}{suffix}"):
                os.remove(f"{trial_path}{suffix}")
        trial_path.write_bytes(flipped)
        try:
            with RelationStore(trial_path) as s:
                got_pairs, got_answers = s.answers()
        except (StoreError, ValueError) as e:
            # A palfast error (StoreCorruptError, or ValueError "not a RelationStore"),
            # never a raw one (UnicodeDecodeError is a ValueError too).
            assert type(e) in (StoreCorruptError, StoreError, ValueError), repr(e)
            outcome[type(e).__name__] += 1
            continue
        if torch.equal(got_pairs, ref_pairs) and torch.equal(got_answers, ref_answers):
            outcome["identical"] += 1
        else:
            silent.append((trial, bit))
    assert not silent, f"silent changes at (trial, bit) {silent}; outcomes {dict(outcome)}"
    assert outcome["StoreCorruptError"] > 0 and outcome["identical"] > 0


_SCHEMA_V1 = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE answers (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        i INTEGER NOT NULL CHECK (i >= 0),
        j INTEGER NOT NULL CHECK (j >= 0 AND j != i),
        answer INTEGER NOT NULL CHECK (answer IN (0, 1)),
        time REAL NOT NULL,
        source TEXT NOT NULL)""",
    """CREATE TRIGGER answers_no_update BEFORE UPDATE ON answers
        BEGIN SELECT RAISE(ABORT, 'palfast RelationStore: the answers log is append-only'); END""",
    """CREATE TRIGGER answers_no_delete BEFORE DELETE ON answers
        BEGIN SELECT RAISE(ABORT, 'palfast RelationStore: the answers log is append-only'); END""",
)


def _v1_store(path, rows):
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    for st in _SCHEMA_V1:
        db.execute(st)
    db.executemany(
        "INSERT INTO meta VALUES (?, ?)",
        [("application", "palfast.RelationStore"), ("schema_version", "1"), ("created", "0.0")],
    )
    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    db.execute("PRAGMA user_version = 1")
    db.executemany("INSERT INTO answers (i, j, answer, time, source) VALUES (?, ?, ?, ?, ?)", rows)
    db.close()


def test_version_1_store_is_migrated_in_place(tmp_path):
    path = tmp_path / "v1.sqlite"
    rows = [(0, 1, 1, 1.5, "oracle"), (1, 2, 0, 2.5, "prior"), (3, 4, 1, 3.5, "oracle")]
    _v1_store(path, rows)
    before = path.read_bytes()
    with RelationStore(path, readonly=True) as s:  # reads a v1 store, migrates nothing
        assert s.n_queries == 3 and s.same(0, 2) is False
    assert path.read_bytes() == before
    with RelationStore(path) as s:
        assert s.answers()[0].tolist() == [[0, 1], [1, 2], [3, 4]]
        s.record([[4, 5]], [True])
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    got = db.execute("SELECT id, i, j, answer, time, source, crc FROM answers").fetchall()
    assert [r[1:6] for r in got[:3]] == rows
    assert all(r[6] == row_crc(r[0], r[1], r[2], r[3], r[4], r[5].encode()) for r in got)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE answers SET answer = 1 - answer")
    db.close()
    with RelationStore(path) as s:
        assert s.n_queries == 4 and s.same(3, 5) is True
        s.retract([3])  # 1 → 3 also brought the retractions table
        assert s.n_queries == 3 and s.same(3, 5) is None


def test_invalid_version_1_row_stops_the_migration(tmp_path):
    path = tmp_path / "v1bad.sqlite"
    _v1_store(path, [(0, 1, 1, 1.5, "oracle")])
    _tamper(path, "INSERT INTO answers (i, j, answer, time, source) VALUES (2, 2, 1, 2.0, 'x')")
    with pytest.raises(StoreCorruptError, match="row id=2 fails its check"):
        RelationStore(path)
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "1"
    db.close()


@pytest.mark.parametrize("older", "123")
def test_damaged_schema_version_is_refused_not_trusted(tmp_path, older):
    """meta.schema_version has no checksum: a damaged record naming an older schema
    (one flipped bit turned schema 3's '3' into '2') made a read-only open take that
    schema's path and drop the retractions (and now the state table) silently. It is
    cross-checked against the tables the file has."""
    path = tmp_path / "s.sqlite"
    with RelationStore(path) as s:
        s.record([[0, 1], [1, 2]], [True, True])
        s.retract([2])
    assert not os.path.exists(f"{path}-wal")  # the close checkpointed: one file to edit
    data = bytearray(path.read_bytes())
    at = data.find(b"schema_version" + str(SCHEMA_VERSION).encode())
    assert at > 0 and data.find(b"schema_version" + str(SCHEMA_VERSION).encode(), at + 1) < 0
    data[at + len(b"schema_version")] = ord(older)
    path.write_bytes(bytes(data))
    for readonly in (True, False):
        with pytest.raises(
            StoreCorruptError,
            match=f"schema_version is '{older}' but the file's tables are those of schema {SCHEMA_VERSION}.*salvage",
        ):
            RelationStore(path, readonly=readonly)
    report = RelationStore.salvage(path, tmp_path / "saved.sqlite")  # trusts the tables
    assert report == (2, [], [], 1, [], [], [])
    with RelationStore(tmp_path / "saved.sqlite") as s:
        assert s.n_queries == 1 and s.same(1, 2) is None


IDLE_WRITER = textwrap.dedent("""
    import sys, time
    from palfast.active import RelationStore
    path, count = sys.argv[1], int(sys.argv[2])
    store = RelationStore(path)
    for t in range(count):
        store.record([[2 * t, 2 * t + 1]], [t % 3 != 0])
        if t % 5 == 4:
            store.retract([t])
    print("acknowledged", flush=True)  # every record() and retract() above returned
    time.sleep(600)                    # killed here: no close, no checkpoint
""")


KILLED_ANSWERS = 30


@pytest.fixture(scope="module")
def killed_store(tmp_path_factory):
    """The files a writer leaves when SIGKILLed after KILLED_ANSWERS acknowledged
    answers (and one retraction per 5 answers), none of them checkpointed."""
    folder = tmp_path_factory.mktemp("killed")
    path = str(folder / "s.sqlite")
    child = subprocess.Popen(
        [sys.executable, "-c", IDLE_WRITER, path, str(KILLED_ANSWERS)],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
        cwd=folder,
    )
    try:
        assert child.stdout.readline().strip() == "acknowledged"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    # Every answer is still in the -wal: the main file alone has none of them.
    assert os.path.getsize(path + "-wal") > 32
    files = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    return files


def _place(files, folder, damage=None):
    """Write the killed store's files into ``folder``; ``damage(name, bytes)`` may edit
    (return bytes) or delete (return None) each one. Returns the store's path."""
    folder.mkdir()
    for name, data in files.items():
        data = damage(name, data) if damage else data
        if data is not None:
            (folder / name).write_bytes(data)
    return folder / "s.sqlite"


def _expected_after_kill():
    retracted = {t + 1 for t in range(KILLED_ANSWERS) if t % 5 == 4}
    return KILLED_ANSWERS - len(retracted)


def _rows(store):
    """(answers, retractions) in the store's log, retracted answers included."""
    log = store.log()
    return len(log), sum(row[6] is not None for row in log)


@pytest.mark.slow
def test_reopen_after_kill_has_no_false_alarm(tmp_path, killed_store):
    path = _place(killed_store, tmp_path / "a")
    n = _expected_after_kill()
    with RelationStore(path, readonly=True) as r:
        assert r.n_queries == n and r.same(0, 1) is False and r.same(2, 3) is True
        r.backup(tmp_path / "copy.sqlite")
    with RelationStore(tmp_path / "copy.sqlite", readonly=True) as c:
        assert c.n_queries == n
    with RelationStore(path) as s:
        assert s.n_queries == n and len(s.log()) == KILLED_ANSWERS
        s.record([[100, 101]], [True])
        s.backup(tmp_path / "copy2.sqlite")
    assert not os.path.exists(f"{path}-wal")  # the clean close checkpointed
    for readonly in (True, False):
        with RelationStore(path, readonly=readonly) as s:
            assert s.n_queries == n + 1 and s.refresh() == 0
    for copy in ("copy.sqlite", "copy2.sqlite"):
        with RelationStore(tmp_path / copy) as c:
            assert c.n_queries >= n


def _flip(bit):
    def damage(name, data):
        if not name.endswith("-wal"):
            return data
        data = bytearray(data)
        data[bit >> 3] ^= 1 << (bit & 7)
        return bytes(data)

    return damage


@pytest.mark.parametrize("how", ["flip", "delete", "truncate", "truncate-to-frame"])
@pytest.mark.slow
def test_lost_wal_frames_are_an_error_not_fewer_answers(tmp_path, killed_store, how):
    """SQLite stops replaying a -wal at the first frame whose checksum fails and drops
    the transactions from there on; a deleted or truncated -wal loses them too. The
    answers were acknowledged (record() had returned), so the open must refuse."""
    wal = next(d for name, d in killed_store.items() if name.endswith("-wal"))
    page = int.from_bytes(wal[8:12], "big")  # WAL header: page size
    frame = 24 + page  # frame header + one page
    # The end of the first transaction (the schema): its last frame is the first whose
    # header records a database size (a commit frame). Damage before it loses the store.
    commits = (k for k in range(32, len(wal), frame) if int.from_bytes(wal[k + 4 : k + 8], "big"))
    schema_end = next(commits) + frame
    if how == "flip":
        rng = random.Random(1)
        bits = [rng.randrange(len(wal) * 8) for _ in range(12)]
        bits.append((32 + (len(wal) - 32) // frame // 2 * frame + 24 + 100) * 8)
        trials = [_flip(bit) for bit in bits]
        no_store = [bit >> 3 < schema_end for bit in bits]
    elif how == "delete":
        trials = [lambda name, data: None if name.endswith("-wal") else data]
    elif how == "truncate":
        trials = [lambda name, data: data[: len(data) // 2] if name.endswith("-wal") else data]
    else:  # whole frames cut off the end: the last transactions vanish cleanly
        trials = [lambda name, data: data[: len(data) - 3 * frame] if name.endswith("-wal") else data]
    if how != "flip":
        no_store = [how == "delete"] * len(trials)
    n_retractions = KILLED_ANSWERS - _expected_after_kill()
    for k, damage in enumerate(trials):
        path = _place(killed_store, tmp_path / str(k), damage)
        for readonly in (True, False):
            with pytest.raises(StoreCorruptError, match=r"acknowledged .* lost.*-wal.*backup.*accept_loss=True"):
                RelationStore(path, readonly=readonly)
        if no_store[k]:  # the schema itself was in the lost part of the -wal: no store is left
            with pytest.raises(ValueError, match="not a palfast RelationStore"):
                RelationStore(path, accept_loss=True, readonly=True)
        else:
            with RelationStore(path, accept_loss=True, readonly=True) as r:
                assert _rows(r) < (KILLED_ANSWERS, n_retractions)
        with RelationStore(path, accept_loss=True) as s:  # continues with what is left
            assert _rows(s) < (KILLED_ANSWERS, n_retractions)
            left = s.n_queries
            s.record([[1000, 1001]], [True])
        with RelationStore(path) as s:  # the loss was accepted once
            assert s.n_queries == left + 1


def test_acked_record_damage_and_torn_writes(tmp_path):
    path = tmp_path / "s.sqlite"
    side = f"{path}{ACKED_SUFFIX}"
    with RelationStore(path) as s:
        for t in range(4):
            s.record([[t, t + 1]], [True])
    good = open(side, "rb").read()
    newest = _read_acked(side)
    assert newest.tops[0][0] == 4 and newest.tops[1] == (0, 0)
    # A write cut short damages the newest slot only: the older record is used.
    torn = bytearray(good)
    torn[(newest.seq % 2) * 4096 + 20] ^= 0x10
    open(side, "wb").write(bytes(torn))
    with RelationStore(path, readonly=True) as r:
        assert r.n_queries == 4
    # Both slots damaged: no record to check against; refused, not ignored.
    open(side, "wb").write(b"\xff" * len(good))
    for readonly in (True, False):
        with pytest.raises(StoreCorruptError, match="-acked.*is damaged.*accept_loss=True"):
            RelationStore(path, readonly=readonly)
    with RelationStore(path, accept_loss=True) as s:  # rewrites the record
        assert s.n_queries == 4
    assert _read_acked(side).tops[0][0] == 4
    with RelationStore(path, readonly=True) as r:
        assert r.n_queries == 4


def test_deleting_a_store_starts_a_new_one(tmp_path):
    """Deleting the main file (as palfast demo does to start over) is a fresh start:
    the -acked record of the old store is replaced, not held against the new one."""
    path = tmp_path / "s.sqlite"
    with RelationStore(path) as s:
        s.record([[0, 1], [1, 2]], [True, True])
    os.remove(path)
    with RelationStore(path) as s:
        assert s.n_queries == 0
        s.record([[5, 6]], [False])
    with RelationStore(path, readonly=True) as r:
        assert r.n_queries == 1
    # backup() into a path whose store was deleted: the copy verifies.
    with RelationStore(tmp_path / "b.sqlite") as b:
        b.record([[0, 1], [1, 2], [2, 3]], [True] * 3)
    os.remove(tmp_path / "b.sqlite")
    with RelationStore(path) as s:
        s.backup(tmp_path / "b.sqlite")
    with RelationStore(tmp_path / "b.sqlite") as b:
        assert b.n_queries == 1


def test_replaced_store_and_loss_seen_by_refresh(tmp_path):
    path = tmp_path / "s.sqlite"
    with RelationStore(path) as s:
        s.record([[0, 1], [1, 2]], [True, True])
    other = tmp_path / "other.sqlite"
    with RelationStore(other) as o:
        o.record([[7, 8], [8, 9], [9, 10]], [False] * 3)
    os.replace(other, path)  # another store with more rows, under the old record
    with pytest.raises(StoreCorruptError, match="answers row id=2 is not the row .* records"):
        RelationStore(path)
    with RelationStore(path, accept_loss=True) as s:
        assert s.n_queries == 3
    # A loss while processes have the store open: refresh() and record() see it.
    r, w = RelationStore(path, readonly=True), RelationStore(path)
    side = f"{path}{ACKED_SUFFIX}"
    _write_acked(side, ((9, 0), (0, 0)), _read_acked(side))  # as if rows 4..9 were lost
    with pytest.raises(StoreCorruptError, match="acknowledged answers were lost"):
        r.refresh()
    with pytest.raises(StoreCorruptError, match="acknowledged answers were lost"):
        w.record([[0, 1]], [True])
    r.close()
    w.close()


# ------------------------------------------------------------ PostgreSQL only
def _postgres_tables(url) -> list[str]:
    """The tables of the first schema of ``url``'s search_path, sorted."""
    return [
        r[0]
        for r in execute_sql(
            url, "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY tablename"
        )
    ]


@pytest.mark.parametrize(
    "damage, exc, match",
    [
        # Another application's tables: refused as foreign, never written into.
        ("CREATE TABLE meta (x INTEGER)", ValueError, "meta table that is not palfast's"),
        (
            "CREATE TABLE meta (key TEXT, value TEXT); CREATE TABLE answers (x INTEGER)",
            ValueError,
            "meta table that is not palfast's",
        ),
        # palfast's meta, tables of another layout: damage.
        ("STORE; ALTER TABLE answers RENAME COLUMN source TO src", StoreCorruptError, "missing or damaged"),
        ("STORE; ALTER TABLE retractions RENAME TO r", StoreCorruptError, "missing or damaged"),
        ("STORE; UPDATE meta SET value = '2' WHERE key = 'schema_version'", StoreCorruptError, "invalid schema"),
        ("STORE; UPDATE meta SET value = 'x' WHERE key = 'schema_version'", StoreCorruptError, "invalid schema"),
    ],
)
def test_postgres_foreign_or_damaged_tables_are_refused(postgres_url, damage, exc, match):
    """A database whose tables are not those of a PostgreSQL RelationStore (schema 3) is
    refused with ValueError (another application's) or StoreCorruptError (palfast's,
    damaged), naming the store, opened writable or read-only; nothing is written."""
    for statement in damage.split("; "):
        if statement == "STORE":
            RelationStore(postgres_url).close()
        else:
            execute_sql(postgres_url, statement)
    before = _postgres_tables(postgres_url)
    for readonly in (False, True):
        with pytest.raises(exc, match=match) as e:
            RelationStore(postgres_url, readonly=readonly)
        assert postgres_url in str(e.value)
    assert _postgres_tables(postgres_url) == before


def _edit_postgres_row(url, update: str) -> None:
    """Run ``update`` on the answers table as a superuser could, its triggers disabled."""
    execute_sql(url, "ALTER TABLE answers DISABLE TRIGGER ALL", update, "ALTER TABLE answers ENABLE TRIGGER ALL")


def test_postgres_edited_row_fails_its_checksum(postgres_url):
    """A row edited behind the store's back (triggers disabled, as a superuser could) is
    refused at open and by a refresh that reads it; the store that refused keeps what it
    had read."""
    _store_with_rows(postgres_url)
    _edit_postgres_row(postgres_url, "UPDATE answers SET answer = 0 WHERE id = 3")
    for readonly in (False, True):
        with pytest.raises(StoreCorruptError, match="answers row id=3 fails its check: its checksum") as e:
            RelationStore(postgres_url, readonly=readonly)
        assert postgres_url in str(e.value)
    _edit_postgres_row(postgres_url, "UPDATE answers SET answer = 1 WHERE id = 3")
    reader = RelationStore(postgres_url, readonly=True)
    with RelationStore(postgres_url) as writer:
        writer.record([[10, 11]], [True])
    _edit_postgres_row(postgres_url, "UPDATE answers SET i = 12 WHERE id = 6")
    with pytest.raises(StoreCorruptError, match="answers row id=6 fails its check: its checksum"):
        reader.refresh()
    assert reader.n_queries == 5 and reader.same(10, 11) is None and reader.same(12, 11) is None
    reader.close()
