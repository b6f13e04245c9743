"""RelationStore: record, retract, refresh, reopen, durability (a real SIGKILL),
concurrent writers, read-only mode, backups, errors of I/O, bad input. The relation
itself: tests/active/test_relation.py; the log's file format and checks:
tests/active/test_answer_log.py."""

import collections
import json
import math
import os
import pathlib
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import urllib.parse
import warnings

import pytest
import torch

import palfast
from palfast.active import RelationStore
from palfast.active.store import (
    APPLICATION_ID,
    MAX_IMPLICIT_IDS,
    ContradictionWarning,
    StoreCorruptError,
    StoreError,
)

from _store_helpers import child_env, execute_sql, is_url, random_answers, relation_of


@pytest.mark.slow
def test_contradictions_are_logged_not_applied(store_path):
    s = RelationStore(store_path)
    with pytest.warns(ContradictionWarning, match="2 of 5 answers contradict"):
        s.record(torch.tensor([[0, 1], [1, 2], [0, 2], [0, 3], [3, 0]]), torch.tensor([True, True, False, False, True]))
    assert s.n_queries == 5 and s.n_conflicts == 2
    pos, cpairs, canswers = s.contradictions()
    assert pos.tolist() == [2, 4] and cpairs.tolist() == [[0, 2], [3, 0]]
    assert canswers.tolist() == [False, True]
    assert s.same(0, 2) is True and s.same(0, 3) is False
    pairs, answers = s.answers()
    assert pairs.tolist() == [[0, 1], [1, 2], [0, 2], [0, 3], [3, 0]]
    assert answers.tolist() == [True, True, False, False, True]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ContradictionWarning)
        s.record(torch.tensor([[0, 1], [2, 3], [5, 6]]), torch.tensor([True, False, True]))
    assert s.n_conflicts == 2 and s.n_queries == 8  # repeats and new facts: no warning


@pytest.mark.slow
def test_reopen_resumes_and_log_is_append_only(store_path):
    path = store_path
    pairs, ans = random_answers(20, 30, 3, seed=3)
    with RelationStore(path) as s:
        s.record(pairs[:10], ans[:10])
        s.record(pairs[10:], ans[10:], source="prior")
        before = relation_of(s, 20)
    with RelationStore(path) as s:
        assert s.n_queries == 30
        assert torch.equal(relation_of(s, 20), before)
        p, a = s.answers()
        assert torch.equal(p, pairs) and torch.equal(a, ans)
    if not is_url(path):
        assert execute_sql(path, "PRAGMA journal_mode") == [("wal",)]
        assert execute_sql(path, "PRAGMA application_id") == [(APPLICATION_ID,)]
    prior = "source = 'prior'" if not is_url(path) else "source = 'prior'::bytea"
    assert execute_sql(path, f"SELECT count(*) FROM answers WHERE {prior}") == [(20,)]
    for edit in ("UPDATE answers SET answer = 1 - answer", "DELETE FROM answers"):
        with pytest.raises(Exception, match="append-only"):  # sqlite3's or psycopg's error
            execute_sql(path, edit)


WRITER = textwrap.dedent("""
    import sys, torch
    from palfast.active import RelationStore
    path, tag, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = RelationStore(path)
    g = torch.Generator().manual_seed(tag)
    for t in range(count):
        i = int(torch.randint(0, 1000, (1,), generator=g))
        pair = torch.tensor([[tag * 100000 + 2 * t, tag * 100000 + 2 * t + 1]])
        store.record(pair, torch.tensor([i % 3 == 0]), source=f"writer{tag}")
        print(t, i % 3 == 0, flush=True)   # reported only once record() returned
""")


@pytest.mark.slow
def test_sigkill_loses_nothing_recorded(tmp_path, store_path):
    path = store_path
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, path, "1", "1000000"],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
        cwd=tmp_path,
    )
    reported = []
    try:
        deadline = time.monotonic() + 60
        while len(reported) < 40 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            t, ans = line.split()
            reported.append((int(t), ans == "True"))
        os.kill(child.pid, signal.SIGKILL)  # mid-run: it would write a million answers
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert len(reported) == 40
    with RelationStore(path) as s:
        pairs, answers = s.answers()
        logged = {(int(p[0]), bool(a)) for p, a in zip(pairs, answers)}
        assert s.n_queries >= len(reported)
        for t, ans in reported:
            assert (100000 + 2 * t, ans) in logged
            assert s.same(100000 + 2 * t, 100000 + 2 * t + 1) is ans
    if not is_url(path):
        assert execute_sql(path, "PRAGMA integrity_check") == [("ok",)]


#: Answers per record() call of the batch writers: a batch is one transaction, so a kill
#: or a restart must leave all of it or none.
BATCH = 25
#: The batch writer: batch t of writer ``tag`` holds the pairs (first(t) + 2k, first(t) +
#: 2k + 1), k < BATCH, and the source "w<tag>b<t>", so each row says which batch it is of.
#: It prints "t errors" once record() returned (acknowledged). With "retry" it survives
#: StoreError the way docs/active.md says (refresh, then record again only if the batch
#: is not in the log: a connection lost during COMMIT may have committed it).
BATCH_WRITER = textwrap.dedent("""
    import sys, time
    from palfast.active import RelationStore
    from palfast.active.store import StoreError
    path, tag, count, retry = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "retry"
    store = RelationStore(path)
    errors = 0
    for t in range(count):
        first = tag * 10_000_000 + 2 * %(batch)d * t
        pairs = [[first + 2 * k, first + 2 * k + 1] for k in range(%(batch)d)]
        answers = [(t + k) %% 3 == 0 for k in range(%(batch)d)]
        while True:
            try:
                store.record(pairs, answers, source=f"w{tag}b{t}")
                break
            except StoreError:
                if not retry:
                    raise
                errors += 1
                while True:
                    try:
                        store.refresh()
                        break
                    except StoreError:
                        time.sleep(0.05)
                if store.is_known(*pairs[0]):  # committed before the connection broke
                    break
        print(t, errors, flush=True)
""") % {"batch": BATCH}


def _batch_writer(path, tag, count, folder, retry=False):
    return subprocess.Popen(
        [sys.executable, "-c", BATCH_WRITER, path, str(tag), str(count), "retry" if retry else "once"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        cwd=folder,
    )


def _batches(path, tag):
    """The batches of writer ``tag`` in the store: {t: its rows (i, j, answer)}, each row
    checked to be the one that batch wrote."""
    found = collections.defaultdict(list)
    with RelationStore(path) as s:
        for _, i, j, answer, _, source, _ in s.log():
            if source.startswith(f"w{tag}b"):
                found[int(source[len(f"w{tag}b") :])].append((i, j, answer))
    for t, rows in found.items():
        first = tag * 10_000_000 + 2 * BATCH * t
        assert rows == [(first + 2 * k, first + 2 * k + 1, (t + k) % 3 == 0) for k in range(len(rows))], t
    return found


#: Kills of a batch writer per backend, each at a random moment of its run.
KILLS = 3
#: Longest wait after a writer's first acknowledged batch before it is killed (seconds).
KILL_WITHIN_S = 1.5


@pytest.mark.slow
def test_sigkill_at_a_random_moment_keeps_every_acknowledged_batch_whole(tmp_path, store_path):
    """A writer recording batches of BATCH answers is SIGKILLed at a random moment, KILLS
    times: after reopening, every batch whose record() returned is there, and every batch
    is wholly there or wholly absent (at most one unacknowledged batch, the one in flight,
    may be there: it committed before the kill)."""
    import random

    seed = random.randrange(2**32)
    rng = random.Random(seed)
    for tag in range(1, KILLS + 1):
        child = _batch_writer(store_path, tag, 10**6, tmp_path)
        try:
            first = child.stdout.readline()  # the store is open and writing
            assert first, child.stderr.read()
            time.sleep(rng.uniform(0, KILL_WITHIN_S))
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
            acked = [first, *child.stdout.read().splitlines()]
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
            child.stderr.close()
        assert child.returncode == -signal.SIGKILL
        acked = [int(line.split()[0]) for line in acked]
        assert acked == list(range(len(acked)))
        found = _batches(store_path, tag)
        assert all(len(rows) == BATCH for rows in found.values()), (seed, tag)
        assert sorted(found) == list(range(len(found))), (seed, tag)  # in order, no hole
        assert len(acked) <= len(found) <= len(acked) + 1, (seed, tag)
    with RelationStore(store_path) as s:
        assert [r[0] for r in s.log()] == list(range(1, s.n_queries + 1))
    if not is_url(store_path):
        assert execute_sql(store_path, "PRAGMA integrity_check") == [("ok",)]


@pytest.mark.slow
def test_two_processes_write_one_file(tmp_path, store_path):
    path = store_path  # has no store yet: both create it
    count = 60
    children = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, path, str(tag), str(count)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
            cwd=tmp_path,
        )
        for tag in (1, 2)
    ]
    for c in children:
        out, err = c.communicate(timeout=120)
        assert c.returncode == 0, err
        assert len(out.splitlines()) == count
    with RelationStore(path) as s:
        assert s.n_queries == 2 * count
        pairs, _ = s.answers()
        for tag in (1, 2):
            firsts = {int(p) for p in pairs[:, 0]}
            assert all(tag * 100000 + 2 * t in firsts for t in range(count))
    if not is_url(path):
        assert execute_sql(path, "PRAGMA integrity_check") == [("ok",)]
    assert execute_sql(path, "SELECT count(DISTINCT source) FROM answers") == [(2,)]


def test_refresh_sees_other_writers(store_path):
    path = store_path
    a, b = RelationStore(path), RelationStore(path)
    a.record(torch.tensor([[0, 1]]), torch.tensor([True]))
    assert b.same(0, 1) is None
    assert b.refresh() == 1 and b.same(0, 1) is True
    b.record(torch.tensor([[1, 2]]), torch.tensor([True]))
    a.record(torch.tensor([[2, 3]]), torch.tensor([False]))  # replays b's row first
    assert a.same(0, 3) is False and a.n_queries == 3
    a.close()
    b.close()


@pytest.mark.parametrize(
    "pairs, answers, exc, match",
    [
        (torch.tensor([0, 1]), [True], ValueError, "pairs must be a \\[Q, 2\\]"),
        (torch.tensor([[0.0, 1.0]]), [True], TypeError, "pairs must hold integer"),
        (torch.tensor([[0, -1]]), [True], ValueError, "pairs must hold sample ids >= 0"),
        (torch.tensor([[3, 3]]), [True], ValueError, "pairs must join two different"),
        (torch.tensor([[0, 1]]), [True, False], ValueError, "answers must be a \\[Q\\]"),
        (torch.tensor([[0, 1]]), torch.tensor([0.5]), TypeError, "answers must be bool"),
        (torch.tensor([[0, 1]]), torch.tensor([2]), TypeError, "answers must be bool"),
    ],
)
def test_record_bad_input(pairs, answers, exc, match):
    s = RelationStore()
    with pytest.raises(exc, match=match):
        s.record(pairs, answers)
    assert s.n_queries == 0


def test_other_bad_input(tmp_path):
    s = RelationStore()
    with pytest.raises(ValueError, match="i must be a sample id"):
        s.same(-1, 0)
    with pytest.raises(TypeError, match="source must be a str"):
        s.record([[0, 1]], [True], source=3)
    with pytest.raises(ValueError, match="n_views must be an int >= 1"):
        s.graph(torch.tensor([0, 1]), n_views=0)
    with pytest.raises(ValueError, match="indices must be a 1-D"):
        s.graph(torch.tensor([[0, 1]]))
    with pytest.raises(TypeError, match="RelationStore: indices must hold integer sample ids, got torch.float32"):
        s.graph(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="RelationStore: indices must hold sample ids >= 0, got -1"):
        s.graph(torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="at least one sample id"):
        s.graph(torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="must be a file"):
        RelationStore(tmp_path)
    with pytest.raises(ValueError, match="timeout"):
        RelationStore(timeout=-1)


@pytest.mark.parametrize(
    "timeout, exc",
    [
        (math.nan, ValueError),
        (math.inf, ValueError),
        (-0.5, ValueError),
        (1e300, ValueError),
        ("3", TypeError),
        (True, TypeError),
    ],
)
def test_bad_timeout_is_refused(timeout, exc):
    with pytest.raises(exc, match="RelationStore: timeout must"):
        RelationStore(timeout=timeout)


def test_huge_sample_ids_are_mapped_to_dense_indices(store_path):
    """Nothing is sized by the largest id: 10**10 used to raise MemoryError in record()
    and on every later open."""
    path = store_path
    big = [10**10, 2**62, 2**63 - 1, 7]
    with RelationStore(path) as s:
        s.record([[big[0], big[1]], [big[1], big[3]], [big[2], big[0]]], [True, True, False])
        assert s.num_ids == 2**63 and s.ids().tolist() == sorted(big)
    with RelationStore(path) as s:
        assert s.same(big[0], big[3]) is True and s.same(big[2], big[3]) is False
        assert s.same(big[2], 5) is None and s.same(10**12, 10**12) is True
        mask = s.known_mask(torch.tensor([[big[2], big[1]], [5, big[0]], [5, 5]]))
        assert mask.tolist() == [True, False, True]
        idx = torch.tensor([big[0], 5, big[3], big[2], big[1]])
        comp = s.components(idx)
        assert comp[0] == comp[2] == comp[4] != -1 and comp[1] == -1 and comp[3] == -1
        roots = s.roots(idx)
        assert roots[0] == roots[2] == roots[4] and roots[1] == 5 and roots[3] == big[2]
        dense = s.graph(idx, n_views=2).to_dense()
        assert dense.shape == (10, 10)
        assert dense[0, 2] == 1 and dense[0, 4] == 1 and dense[0, 3] == 0 and dense[1, 6] == 1
        with pytest.raises(ValueError, match="pass the sample ids explicitly"):
            s.graph()
        with pytest.raises(ValueError, match="pass the sample ids explicitly"):
            s.components()
    assert MAX_IMPLICIT_IDS >= 1 << 20


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="does not exist; create it first"):
        RelationStore(tmp_path / "no" / "such" / "store.sqlite")
    with pytest.raises(StoreError, match="does not exist"):
        RelationStore(tmp_path / "absent.sqlite", readonly=True)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_directory_is_a_clear_error(tmp_path):
    path = tmp_path / "ro" / "store.sqlite"
    path.parent.mkdir()
    with RelationStore(path) as s:
        s.record([[0, 1]], [True])
    path.parent.chmod(0o555)
    try:
        with pytest.raises(StoreError, match="read-only.*readonly=True"):
            RelationStore(path)
        with RelationStore(path, readonly=True) as s:
            assert s.same(0, 1) is True
    finally:
        path.parent.chmod(0o755)


def test_sqlite_read_only_refusal_is_a_clear_error(tmp_path):
    """What SQLite says when the file cannot be written (a read-only directory, as
    root cannot be refused one here) becomes a StoreError saying what to do."""
    path = tmp_path / "store.sqlite"
    s = RelationStore(path)
    s.record([[0, 1]], [True])
    s._log._db.close()
    s._log._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    with pytest.raises(StoreError, match="read-only.*pass readonly=True") as e:
        s.record([[1, 2]], [True])
    assert not isinstance(e.value, sqlite3.Error)
    s.close()
    with RelationStore(path) as s:
        assert s.n_queries == 1


def test_disk_full_is_a_clear_error_and_records_nothing(tmp_path):
    path = tmp_path / "full.sqlite"
    s = RelationStore(path)
    s.record([[0, 1]], [True])
    pages = s._log._db.execute("PRAGMA page_count").fetchone()[0]
    s._log._db.execute(f"PRAGMA max_page_count = {pages + 1}")  # the disk is full after one page
    pairs = torch.stack([torch.arange(2, 2002), torch.arange(3, 2003)], 1)
    with pytest.raises(StoreError, match="disk .* is full.*nothing of this call was written"):
        s.record(pairs, torch.ones(2000, dtype=torch.bool), source="x" * 200)
    assert s.n_queries == 1
    s.record([[5, 6]], [False])  # still usable for what fits
    s.close()
    with RelationStore(path) as s:
        assert s.answers()[0].tolist() == [[0, 1], [5, 6]]


def test_closed_store_is_a_clear_error(tmp_path, store_path):
    s = RelationStore(store_path)
    s.record([[0, 1]], [True])
    s.close()
    s.close()  # idempotent
    for call in (lambda: s.record([[1, 2]], [True]), s.refresh, lambda: s.backup(tmp_path / "b.sqlite")):
        with pytest.raises(StoreError, match="is closed"):
            call()
    assert s.same(0, 1) is True  # the loaded relation still answers
    assert palfast.active.StoreError is StoreError and issubclass(StoreCorruptError, ValueError)


def test_lock_held_too_long_is_a_clear_error(store_path):
    path = store_path
    RelationStore(path).close()
    if is_url(path):
        import psycopg

        holder = psycopg.connect(path, autocommit=True)
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE answers IN EXCLUSIVE MODE")
    else:
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
    try:
        s = RelationStore(path, timeout=0.05)
        with pytest.raises(StoreError, match="locked by another process.*timeout="):
            s.record([[0, 1]], [True])
        s.close()
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_readonly_mode_never_writes_and_sees_writers(tmp_path, store_path):
    path = store_path
    with RelationStore(path) as s:
        s.record([[0, 1], [1, 2]], [True, False])
    with RelationStore(path, readonly=True) as r:
        assert r.readonly and r.n_queries == 2 and r.same(0, 2) is False
        with pytest.raises(StoreError, match="readonly=True"):
            r.record([[3, 4]], [True])
        with RelationStore(path) as w:
            w.record([[3, 4]], [True])
            assert r.refresh() == 1 and r.same(3, 4) is True
        backup = tmp_path / "copy.sqlite"
        r.backup(backup)
    with RelationStore(backup, readonly=True) as c:
        assert c.n_queries == 3

    def state():  # the file, or the log tables and their last ids
        if is_url(path):
            return execute_sql(path, "SELECT key, value FROM meta ORDER BY key")
        return path.read_bytes(), os.stat(path).st_mtime_ns

    path = path if is_url(path) else pathlib.Path(path)
    after = state()
    for _ in range(2):
        with RelationStore(path, readonly=True) as r:
            assert r.n_queries == 3
    assert state() == after
    with pytest.raises(ValueError, match="readonly=True needs the path"):
        RelationStore(readonly=True)
    with pytest.raises(TypeError, match="readonly must be True or False"):
        RelationStore(path, readonly="yes")


def test_backup_copies_the_wal_content(tmp_path):
    path = tmp_path / "live.sqlite"
    s = RelationStore(path)
    s.record([[0, 1], [1, 2]], [True, True])
    assert os.path.getsize(f"{path}-wal") > 0  # answers not yet in the main file
    # Copying the main file alone, as after a kill, loses acknowledged answers (SQLite's rule).
    shutil.copyfile(path, tmp_path / "naive.sqlite")
    with RelationStore(tmp_path / "naive.sqlite") as naive:
        assert naive.n_queries < 2
    s.backup(tmp_path / "backup.sqlite")
    assert not os.path.exists(tmp_path / "backup.sqlite-wal")  # one self-contained file
    with pytest.raises(ValueError, match="already exists"):
        s.backup(tmp_path / "backup.sqlite")
    s.close()
    with RelationStore(tmp_path / "backup.sqlite") as b:
        assert b.answers()[0].tolist() == [[0, 1], [1, 2]] and b.same(0, 2) is True
    mem = RelationStore()
    mem.record([[10**10, 3]], [False])
    mem.backup(tmp_path / "from_memory.sqlite")
    with RelationStore(tmp_path / "from_memory.sqlite") as b:
        assert b.same(3, 10**10) is False


def test_readonly_path_with_uri_characters(tmp_path):
    folder = tmp_path / "a?b#c%20d"
    folder.mkdir()
    path = folder / "s%3f.sqlite"
    with RelationStore(path) as s:
        s.record([[0, 1]], [True])
    with RelationStore(path, readonly=True) as s:
        assert s.same(0, 1) is True
    assert sorted(os.listdir(folder))[0] == "s%3f.sqlite"


# ------------------------------------------------ several writers, one log order
N_WRITERS, N_EACH, N_SAMPLES = 4, 2000, 300
#: Seconds the reader sleeps between refreshes while the writers write. Each refresh is a
#: transaction (on PostgreSQL 2.6 ms of wall time, and server CPU besides the client's):
#: with 0.01 s the reader's refreshes took so much of two shared cores that the
#: PostgreSQL case took 135 s, against 74 s with 0.05 s (2-core AMD EPYC shared with other
#: jobs, load average 5-6); with 0.05 s the reader still refreshed 580 (SQLite) and 950
#: (PostgreSQL) times during the writes.
READER_PAUSE_S = 0.05
#: Seconds per answer the writers took together at N_EACH = 2000 with READER_PAUSE_S, the
#: slowest of five runs: PostgreSQL (a throwaway local server), 92 s for 8000 answers
#: while other jobs raised the load average from 2 to 4 (other runs: 58 s and 74 s;
#: SQLite 35 s and 43 s). Each answer is one durable commit (on SQLite two fsyncs: the
#: -wal and the -acked record) and the write lock serialises the writers; one process
#: alone took 9 ms (SQLite) and 6 ms (PostgreSQL) per answer.
MEASURED_S_PER_ANSWER = 0.0115
#: Room for a slower disk or a busier CI machine: the runs above spread 1.6x with the
#: load of the shared machine; 6 leaves about four times that.
DEADLINE_MARGIN = 6
#: Seconds the writers may take before the test fails (552 s).
WRITERS_DEADLINE = N_WRITERS * N_EACH * MEASURED_S_PER_ANSWER * DEADLINE_MARGIN
#: The writers' noisy answers contradict the relation hundreds of times; the
#: ContradictionWarning they are meant to raise is silenced in the writer (the test
#: checks the contradictions themselves). Each writer's stderr goes to a file, never to
#: a pipe this test would not read until the writers are done: a 64 KiB pipe filled with
#: one warning line per contradiction blocked every writer in write(2) at about 1000
#: answers each, until WRITERS_DEADLINE failed the test.
MANY_WRITER = textwrap.dedent("""
    import json, os, sys, time, torch, warnings
    from palfast.active import RelationStore
    from palfast.active.store import ContradictionWarning
    warnings.simplefilter("ignore", ContradictionWarning)
    path, tag, count, folder = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    store = RelationStore(path, timeout=120)
    g = torch.Generator().manual_seed(tag)
    for _ in range(count):  # noisy answers about shared samples: the order matters
        a, b = (int(x) for x in torch.randperm(%(n)d, generator=g)[:2])
        noise = bool(torch.rand(1, generator=g) < 0.2)
        store.record([[a, b]], [(a %% 7 == b %% 7) != noise], source=f"writer{tag}")
    open(os.path.join(folder, f"done{tag}"), "w").close()
    while not os.path.exists(os.path.join(folder, "go")):
        time.sleep(0.05)
    store.refresh()
    pairs, answers = store.answers()
    print(json.dumps([pairs.tolist(), answers.tolist(),
                      store.components(torch.arange(%(n)d)).tolist(),
                      store.contradictions()[0].tolist()]), flush=True)
""") % {"n": N_SAMPLES}


def _view(store):
    """Everything a process knows: the log's answers in order, components, conflicts."""
    pairs, answers = store.answers()
    return [
        pairs.tolist(),
        answers.tolist(),
        store.components(torch.arange(N_SAMPLES)).tolist(),
        store.contradictions()[0].tolist(),
    ]


@pytest.mark.filterwarnings("ignore::palfast.active.store.ContradictionWarning")
@pytest.mark.slow
def test_writers_in_four_processes_keep_one_log_order(tmp_path, store_path):
    """N_WRITERS processes record N_EACH answers each at once, one transaction per
    answer, while a reader refreshes: nothing is lost, every process (and a fresh open)
    ends with the same log in the same order and the same relation, and the reader,
    which refreshed during the writes, skipped no row that committed late."""
    RelationStore(store_path).close()  # one creates the store; the race is the appends
    errors = [tmp_path / f"stderr{tag}" for tag in range(1, N_WRITERS + 1)]
    children = []
    for tag, error in enumerate(errors, 1):
        with open(error, "w") as err:  # the child keeps its own copy of the descriptor
            children.append(
                subprocess.Popen(
                    [sys.executable, "-c", MANY_WRITER, store_path, str(tag), str(N_EACH), str(tmp_path)],
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                    env=child_env(),
                    cwd=tmp_path,
                )
            )
    reader = RelationStore(store_path, readonly=True)
    try:
        deadline, seen, refreshes = time.monotonic() + WRITERS_DEADLINE, 0, 0
        while not all((tmp_path / f"done{t}").exists() for t in range(1, N_WRITERS + 1)):
            assert time.monotonic() < deadline and all(c.poll() is None for c in children), (
                f"{reader.n_queries} of {N_WRITERS * N_EACH} answers after {refreshes} refreshes; "
                f"exit codes {[c.poll() for c in children]}; stderr {[e.read_text() for e in errors]}"
            )
            reader.refresh()
            assert reader.n_queries >= seen  # the log only grows
            seen, refreshes = reader.n_queries, refreshes + 1
            time.sleep(READER_PAUSE_S)
        (tmp_path / "go").touch()
        views = []
        for c, error in zip(children, errors):
            out, _ = c.communicate(timeout=60)
            assert c.returncode == 0, error.read_text()
            views.append(json.loads(out.splitlines()[-1]))
        reader.refresh()
        views.append(_view(reader))
    finally:
        reader.close()
        for c in children:
            if c.poll() is None:
                c.kill()
    with RelationStore(store_path) as fresh:
        expected, log = _view(fresh), fresh.log()
    assert refreshes > 1  # the reader did read while the writers wrote
    assert [r[0] for r in log] == list(range(1, N_WRITERS * N_EACH + 1))
    assert collections.Counter(r[5] for r in log) == {f"writer{t}": N_EACH for t in range(1, N_WRITERS + 1)}
    assert expected[3], "the noise gave no contradiction: the order would not matter"
    for view in views:
        assert view == expected


# ------------------------------------------------------------ PostgreSQL only
@pytest.mark.slow
def test_lost_connection_is_a_store_error_naming_the_store(postgres_url, postgres_admin):
    """A session the server ends and a stopped server raise StoreError naming the store
    (its URL, never its password); the next call connects again."""
    import _postgres

    s = RelationStore(postgres_url)
    s.record([[0, 1]], [True])
    db_name = urllib.parse.urlsplit(postgres_url).path.lstrip("/")
    # The second argument: wait (ms) until the session has ended (PostgreSQL 14 and later).
    execute_sql(
        postgres_admin, f"SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity WHERE datname = '{db_name}'"
    )
    with pytest.raises(StoreError, match="cannot reach the PostgreSQL store") as e:
        s.record([[1, 2]], [True])
    assert postgres_url in str(e.value) and not isinstance(e.value, sqlite3.Error)
    assert "may have been committed just before the connection broke" in str(e.value)
    s.record([[1, 2]], [True])  # connects again
    assert s.same(0, 2) is True and s.n_queries == 2
    s.close()
    with pytest.raises(StoreError, match="cannot reach.*'postgresql://palfast:\\*\\*\\*@/x") as e:
        RelationStore("postgresql://palfast:secret@/x?host=/nonexistent-socket-folder")
    assert "secret" not in str(e.value) and "committed" not in str(e.value)  # nothing was written
    if os.environ.get(_postgres.ENV):
        return  # a server of someone else's: not ours to stop
    server = _postgres.Server()
    try:
        url = server.url()
        s = RelationStore(url)
        s.record([[0, 1]], [True])
        server.stop()
        for call in (lambda: s.record([[1, 2]], [True]), s.refresh, s.log):
            with pytest.raises(StoreError, match="cannot reach the PostgreSQL store") as e:
                call()
            assert url in str(e.value)
        assert s.same(0, 1) is True and s.n_queries == 1  # what was loaded still answers
        s.close()
    finally:
        server.close()


#: PostgreSQL restarts while the retrying writer runs, and its batches.
RESTARTS, RESTART_BATCHES = 2, 400


@pytest.mark.slow
def test_server_restart_mid_stream_loses_and_repeats_no_answer(tmp_path, postgres_server, postgres_url):
    """The server is restarted (pg_ctl restart -m fast) RESTARTS times while a writer
    records batches: the writer gets StoreError for the calls that fail, refreshes and
    retries as docs/active.md says, and in the end every batch it acknowledged is in the
    log exactly once, whole."""
    if postgres_server is None:
        pytest.skip("PALFAST_TEST_POSTGRES names someone else's server: not ours to restart")
    RelationStore(postgres_url).close()
    child = _batch_writer(postgres_url, 1, RESTART_BATCHES, tmp_path, retry=True)
    try:
        for k in range(RESTARTS):
            # A restart once the writer is well into its run, then again later.
            target = (k + 1) * RESTART_BATCHES // (RESTARTS + 2)
            while True:
                line = child.stdout.readline()
                assert line, child.stderr.read()
                if int(line.split()[0]) >= target:
                    break
            postgres_server.restart()
        out, err = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    last_t, errors = map(int, out.splitlines()[-1].split())
    assert last_t == RESTART_BATCHES - 1
    assert errors >= RESTARTS  # each restart broke the writer's connection: a StoreError
    found = _batches(postgres_url, 1)
    assert sorted(found) == list(range(RESTART_BATCHES))
    assert all(len(rows) == BATCH for rows in found.values())  # once each, whole
    with RelationStore(postgres_url) as s:
        assert s.n_queries == RESTART_BATCHES * BATCH
        assert [r[0] for r in s.log()] == list(range(1, s.n_queries + 1))


def _as_user(url: str, user: str, password: str | None = None, database: str | None = None) -> str:
    """``url`` with another user (and password, database)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    login = user if password is None else f"{user}:{password}"
    path = parts.path if database is None else "/" + database
    return parts._replace(netloc=f"{login}@{host}", path=path).geturl()


@pytest.mark.parametrize("what", ["database", "user"])
def test_missing_database_or_user_is_a_clear_error(postgres_url, what):
    """A URL naming a database or a user the server does not have raises StoreError
    naming the store (password hidden) and what the server said; nothing is created.
    (A wrong password: test_wrong_password_is_a_clear_error.)"""
    db = urllib.parse.urlsplit(postgres_url).path.lstrip("/")
    if what == "database":
        url = _as_user(postgres_url, "palfast", "secret", database=db + "_missing")
        said = f'database "{db}_missing" does not exist'
    else:
        url = _as_user(postgres_url, "palfast_no_such_user", "secret")
        said = 'role "palfast_no_such_user" does not exist'
    for readonly in (False, True):
        with pytest.raises(StoreError, match="cannot reach the PostgreSQL store") as e:
            RelationStore(url, readonly=readonly)
        assert said in str(e.value) and "secret" not in str(e.value)
        assert url.replace(":secret@", ":***@") in str(e.value)
    assert execute_sql(postgres_url, f"SELECT count(*) FROM pg_database WHERE datname = '{db}_missing'") == [(0,)]


@pytest.mark.slow
def test_wrong_password_is_a_clear_error(postgres_server, postgres_url):
    """A user that must give a password (scram-sha-256 in pg_hba.conf) and gets a wrong
    one: StoreError naming the store, the password hidden; the right one opens it."""
    if postgres_server is None:
        pytest.skip("PALFAST_TEST_POSTGRES names someone else's server: not ours to reconfigure")
    import psycopg

    user = f"palfast_pw_{os.getpid()}"
    hba = os.path.join(postgres_server.folder, "data", "pg_hba.conf")
    with open(hba) as f:
        before = f.read()
    execute_sql(postgres_url, f"CREATE ROLE {user} LOGIN PASSWORD 'right'", f"GRANT ALL ON SCHEMA public TO {user}")
    try:
        with open(hba, "w") as f:  # the first matching line wins
            f.write(f"local all {user} scram-sha-256\n" + before)
        execute_sql(postgres_url, "SELECT pg_reload_conf()")
        wrong = _as_user(postgres_url, user, "wrong-secret")
        deadline = time.monotonic() + 30
        while True:  # the server reloads its configuration asynchronously
            try:
                psycopg.connect(wrong).close()
            except psycopg.OperationalError:
                break
            assert time.monotonic() < deadline, "the server did not reload pg_hba.conf"
            time.sleep(0.05)
        with pytest.raises(StoreError, match="cannot reach the PostgreSQL store.*password authentication failed") as e:
            RelationStore(wrong)
        assert "wrong-secret" not in str(e.value) and f"{user}:***@" in str(e.value)
        with RelationStore(_as_user(postgres_url, user, "right")) as s:
            s.record([[0, 1]], [True])
    finally:
        with open(hba, "w") as f:
            f.write(before)
        execute_sql(postgres_url, "SELECT pg_reload_conf()")
        execute_sql(postgres_url, f"REASSIGN OWNED BY {user} TO palfast", f"DROP OWNED BY {user}", f"DROP ROLE {user}")


def test_read_only_user_cannot_record(postgres_url):
    """A user allowed only to SELECT: record and retract raise StoreError naming the store
    and saying what to grant, and write nothing; readonly=True reads the store."""
    user = f"palfast_ro_{os.getpid()}"
    with RelationStore(postgres_url) as s:
        ids = s.record([[0, 1], [1, 2]], [True, False])
    execute_sql(
        postgres_url,
        f"CREATE ROLE {user} LOGIN",
        f"GRANT SELECT ON answers, retractions, meta TO {user}",
    )
    try:
        url = _as_user(postgres_url, user)
        s = RelationStore(url)
        for call in (lambda: s.record([[2, 3]], [True]), lambda: s.retract(ids[:1])):
            with pytest.raises(StoreError, match=f"user of '{re.escape(url)}' lacks a privilege.*readonly=True") as e:
                call()
            assert "permission denied for table" in str(e.value)
        assert s.n_queries == 2 and s.same(0, 1) is True and s.same(0, 2) is False
        with RelationStore(url, readonly=True) as r:
            assert r.n_queries == 2 and len(r.log()) == 2
        with RelationStore(postgres_url) as owner:
            assert [row[0] for row in owner.log()] == [1, 2] and owner.log()[0][6] is None
        # What the error says a writer needs is enough.
        execute_sql(postgres_url, f"GRANT INSERT, UPDATE ON answers, retractions, meta TO {user}")
        assert s.record([[2, 3]], [True]) == [3]
        s.retract([1])
        assert s.same(0, 1) is None and s.same(2, 3) is True
        s.close()
    finally:
        execute_sql(postgres_url, f"DROP OWNED BY {user}", f"DROP ROLE {user}")
