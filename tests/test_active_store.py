"""RelationStore: transitive closure, cannot-link propagation, graphs, durability
(a real SIGKILL), concurrent writers, foreign/corrupt files, bad input."""

import collections
import math
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

import palfast
from palfast.active import RelationStore
from palfast.active.store import (
    ACKED_SUFFIX,
    APPLICATION_ID,
    MAX_IMPLICIT_IDS,
    SCHEMA_VERSION,
    ContradictionWarning,
    StoreCorruptError,
    StoreError,
    _read_acked,
    _write_acked,
    row_crc,
)


# --------------------------------------------------------------- reference
def closure_reference(n, pairs, answers):
    """Brute force: components of the positive answers (flood fill), negatives lifted to
    components, first answer wins on contradictions. Returns an [n, n] matrix of
    1 (alike), 0 (different), -1 (unknown)."""
    comp = list(range(n))

    def relabel(old, new):
        for t in range(n):
            if comp[t] == old:
                comp[t] = new

    negatives = set()
    for (i, j), a in zip(pairs, answers):
        ci, cj = comp[i], comp[j]
        if a:
            if ci != cj and (min(ci, cj), max(ci, cj)) not in negatives:
                relabel(cj, ci)
                negatives = {tuple(sorted((ci if x == cj else x, ci if y == cj else y)))
                             for x, y in negatives}
        elif ci != cj:
            negatives.add((min(ci, cj), max(ci, cj)))
    out = torch.full((n, n), -1)
    for i in range(n):
        for j in range(n):
            if comp[i] == comp[j]:
                out[i, j] = 1
            elif (min(comp[i], comp[j]), max(comp[i], comp[j])) in negatives:
                out[i, j] = 0
    return out


def _execute(path, *statements: str) -> None:
    """Run SQL on a store file behind RelationStore's back (to damage or age it)."""
    db = sqlite3.connect(path)
    for sql in statements:
        db.execute(sql)
    db.commit()
    db.close()


def relation_of(store, n):
    code = {True: 1, False: 0, None: -1}
    return torch.tensor([[code[store.same(i, j)] for j in range(n)] for i in range(n)])


def random_answers(n, q, n_classes, seed, noise=0.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, n_classes, (n,), generator=g)
    a = torch.randint(0, n, (q,), generator=g)
    b = (a + torch.randint(1, n, (q,), generator=g)) % n
    pairs = torch.stack([a, b], 1)
    ans = y[a] == y[b]
    if noise:
        ans ^= torch.rand(q, generator=g) < noise
    return pairs, ans


# ----------------------------------------------------------------- relation
def test_transitivity():
    s = RelationStore()
    s.record(torch.tensor([[0, 1], [1, 2], [5, 4]]), torch.tensor([True, True, True]))
    assert s.same(0, 2) is True and s.is_known(2, 0)
    assert s.same(0, 4) is None and not s.is_known(0, 4)
    assert s.same(3, 3) is True
    comp = s.components(torch.tensor([0, 1, 2, 3, 4, 5, 9]))
    assert comp[0] == comp[1] == comp[2] and comp[4] == comp[5] and comp[0] != comp[4]
    assert comp[3] == -1 and comp[6] == -1  # no known positive; id 9 never seen
    assert s.n_queries == 3


def test_cannot_link_propagates_through_components_and_merges():
    s = RelationStore()
    s.record(torch.tensor([[0, 1], [1, 2]]), torch.tensor([True, False]))  # A~B, B≁C
    assert s.same(0, 2) is False                                           # ⇒ A≁C
    s.record(torch.tensor([[2, 3]]), torch.tensor([True]))                 # C~D
    assert s.same(0, 3) is False and s.same(1, 3) is False
    s.record(torch.tensor([[4, 0], [5, 3]]), torch.tensor([True, True]))   # grow both sides
    assert s.same(4, 5) is False
    assert s.known_mask(torch.tensor([[4, 5], [4, 1], [4, 6]])).tolist() == [True, True, False]


@pytest.mark.filterwarnings("ignore::palfast.active.store.ContradictionWarning")
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("noise", [0.0, 0.2])
def test_relation_matches_brute_force_closure(seed, noise):
    n = 23
    pairs, ans = random_answers(n, 40, 4, seed, noise)
    s = RelationStore()
    for chunk in range(0, 40, 7):  # several transactions
        s.record(pairs[chunk:chunk + 7], ans[chunk:chunk + 7])
    expected = closure_reference(n, pairs.tolist(), ans.tolist())
    assert torch.equal(relation_of(s, n), expected)
    all_pairs = torch.cartesian_prod(torch.arange(n), torch.arange(n))
    assert torch.equal(s.known_mask(all_pairs), (expected >= 0).reshape(-1))


def test_contradictions_are_logged_not_applied():
    s = RelationStore()
    with pytest.warns(ContradictionWarning, match="2 of 5 answers contradict"):
        s.record(torch.tensor([[0, 1], [1, 2], [0, 2], [0, 3], [3, 0]]),
                 torch.tensor([True, True, False, False, True]))
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


# -------------------------------------------------------------------- graph
def test_graph_is_the_label_graph_of_components():
    pairs, ans = random_answers(30, 60, 3, seed=5)
    s = RelationStore()
    s.record(pairs, ans)
    idx = torch.tensor([3, 17, 0, 29, 8, 12, 3 + 1, 21, 44])  # 44: never seen
    g = s.graph(idx)
    expected = torch.tensor([[float(s.same(int(a), int(b)) is True) for b in idx] for a in idx])
    expected.fill_diagonal_(0)
    assert torch.equal(g.to_dense(), expected)
    assert g.labels.shape == (1, idx.numel())  # class ids, not Σ n_c² edges
    assert g.indices.numel() == 0


def test_graph_with_views_is_views_plus_labels_repeated():
    s = RelationStore()
    s.record(torch.tensor([[0, 2], [2, 5]]), torch.tensor([True, True]))
    idx = torch.tensor([0, 1, 2, 5])
    g = s.graph(idx, n_views=3, label_weight=0.7, view_weight=0.3)
    b = idx.numel()
    expected = torch.zeros(3 * b, 3 * b)
    for r in range(3 * b):
        for c in range(3 * b):
            u, w = int(idx[r % b]), int(idx[c % b])
            known_class = u != 1 and w != 1 and s.same(u, w)  # sample 1 has no positive
            expected[r, c] = 0.7 * known_class + 0.3 * (r % b == c % b)
    expected.fill_diagonal_(0)
    assert torch.allclose(g.to_dense(), expected)


def test_graph_trains_info_nce():
    s = RelationStore()
    s.record(torch.tensor([[0, 1]]), torch.tensor([True]))
    z = torch.randn(8, 5, requires_grad=True)
    loss = palfast.info_nce(z, s.graph(torch.tensor([0, 1, 2, 3]), n_views=2))
    loss.backward()
    assert torch.isfinite(z.grad).all()


# -------------------------------------------------------------- persistence
def test_reopen_resumes_and_log_is_append_only(tmp_path):
    path = tmp_path / "answers.sqlite"
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
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert db.execute("SELECT count(*) FROM answers WHERE source = 'prior'").fetchone()[0] == 20
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE answers SET answer = 1 - answer")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM answers")
    db.close()


def _child_env():
    # The children import the palfast these tests import. They also run in a
    # temporary cwd: `python -c` puts the cwd first on sys.path, and a checkout's
    # palfast/ (no compiled _C) would shadow the installed package.
    root = os.path.dirname(os.path.dirname(os.path.abspath(palfast.__file__)))
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


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


def test_sigkill_loses_nothing_recorded(tmp_path):
    path = str(tmp_path / "killed.sqlite")
    child = subprocess.Popen([sys.executable, "-c", WRITER, path, "1", "1000000"],
                             stdout=subprocess.PIPE, text=True, env=_child_env(), cwd=tmp_path)
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
        assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_two_processes_write_one_file(tmp_path):
    path = str(tmp_path / "shared.sqlite")  # does not exist yet: both create it
    count = 60
    children = [subprocess.Popen([sys.executable, "-c", WRITER, path, str(tag), str(count)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=_child_env(), cwd=tmp_path) for tag in (1, 2)]
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
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT count(DISTINCT source) FROM answers").fetchone()[0] == 2


def test_refresh_sees_other_writers(tmp_path):
    path = tmp_path / "two.sqlite"
    a, b = RelationStore(path), RelationStore(path)
    a.record(torch.tensor([[0, 1]]), torch.tensor([True]))
    assert b.same(0, 1) is None
    assert b.refresh() == 1 and b.same(0, 1) is True
    b.record(torch.tensor([[1, 2]]), torch.tensor([True]))
    a.record(torch.tensor([[2, 3]]), torch.tensor([False]))  # replays b's row first
    assert a.same(0, 3) is False and a.n_queries == 3
    a.close()
    b.close()


# --------------------------------------------------------- foreign / corrupt
def test_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "garbage.sqlite"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="not a palfast RelationStore"):
        RelationStore(path)


def test_foreign_sqlite_is_refused(tmp_path):
    path = tmp_path / "foreign.sqlite"
    _execute(path, "CREATE TABLE answers (x)")
    with pytest.raises(ValueError, match="foreign"):
        RelationStore(path)
    _execute(path, "PRAGMA application_id = 1234")
    with pytest.raises(ValueError, match="another application"):
        RelationStore(path)


def test_newer_schema_and_damaged_store_are_refused(tmp_path):
    path = tmp_path / "newer.sqlite"
    RelationStore(path).close()
    _execute(path, "UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(ValueError, match="schema version 99"):
        RelationStore(path)
    path = tmp_path / "damaged.sqlite"
    RelationStore(path).close()
    _execute(path, "DROP TABLE meta")
    with pytest.raises(ValueError, match="missing or damaged"):
        RelationStore(path)


def test_empty_file_becomes_a_store(tmp_path):
    path = tmp_path / "empty.sqlite"
    path.touch()
    with RelationStore(path) as s:
        s.record([[0, 1]], [True])
    with RelationStore(path) as s:
        assert s.same(0, 1) is True


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("pairs, answers, exc, match", [
    (torch.tensor([0, 1]), [True], ValueError, "pairs must be a \\[Q, 2\\]"),
    (torch.tensor([[0.0, 1.0]]), [True], TypeError, "pairs must hold integer"),
    (torch.tensor([[0, -1]]), [True], ValueError, "pairs must hold sample ids >= 0"),
    (torch.tensor([[3, 3]]), [True], ValueError, "pairs must join two different"),
    (torch.tensor([[0, 1]]), [True, False], ValueError, "answers must be a \\[Q\\]"),
    (torch.tensor([[0, 1]]), torch.tensor([0.5]), TypeError, "answers must be bool"),
    (torch.tensor([[0, 1]]), torch.tensor([2]), TypeError, "answers must be bool"),
])
def test_record_bad_input(pairs, answers, exc, match):
    s = RelationStore()
    with pytest.raises(exc, match=match):
        s.record(pairs, answers)
    assert s.n_queries == 0


@pytest.mark.parametrize("kw,error,message", [
    ({"label_weight": "1"}, TypeError, "RelationStore.graph: label_weight must be a number"),
    ({"view_weight": "0.5", "n_views": 2}, TypeError,
     "RelationStore.graph: view_weight must be a number"),
    ({"label_weight": -1.0}, ValueError, "RelationStore.graph: label_weight must be a finite"),
    ({"device": "bogus"}, ValueError, "RelationStore.graph: device must be a torch.device"),
])
def test_graph_arguments_are_checked(kw, error, message):
    s = RelationStore()
    s.record([[0, 1]], [True])
    with pytest.raises(error, match=message):
        s.graph(torch.tensor([0, 1]), **kw)


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
    with pytest.raises(ValueError, match="at least one sample id"):
        s.graph(torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="must be a file"):
        RelationStore(tmp_path)
    with pytest.raises(ValueError, match="timeout"):
        RelationStore(timeout=-1)


@pytest.mark.parametrize("timeout, exc", [(math.nan, ValueError), (math.inf, ValueError),
                                          (-0.5, ValueError), (1e300, ValueError),
                                          ("3", TypeError), (True, TypeError)])
def test_bad_timeout_is_refused(timeout, exc):
    with pytest.raises(exc, match="RelationStore: timeout must"):
        RelationStore(timeout=timeout)


def test_foreign_database_is_left_untouched(tmp_path):
    path = tmp_path / "foreign.sqlite"
    _execute(path, "CREATE TABLE t (x)")
    before = path.read_bytes()
    with pytest.raises(ValueError, match="foreign"):
        RelationStore(path)
    assert path.read_bytes() == before
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "delete"


# ------------------------------------------------------- arbitrary int64 ids
def test_huge_sample_ids_are_mapped_to_dense_indices(tmp_path):
    """Nothing is sized by the largest id: 10**10 used to raise MemoryError in record()
    and on every later open."""
    path = tmp_path / "huge.sqlite"
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


# ------------------------------------------------------------ errors of I/O
def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="does not exist; create it first"):
        RelationStore(tmp_path / "no" / "such" / "store.sqlite")
    with pytest.raises(StoreError, match="does not exist"):
        RelationStore(tmp_path / "absent.sqlite", readonly=True)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root ignores file permissions")
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
    s._db.close()
    s._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
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
    pages = s._db.execute("PRAGMA page_count").fetchone()[0]
    s._db.execute(f"PRAGMA max_page_count = {pages + 1}")  # the disk is full after one page
    pairs = torch.stack([torch.arange(2, 2002), torch.arange(3, 2003)], 1)
    with pytest.raises(StoreError, match="disk .* is full.*nothing of this call was written"):
        s.record(pairs, torch.ones(2000, dtype=torch.bool), source="x" * 200)
    assert s.n_queries == 1
    s.record([[5, 6]], [False])  # still usable for what fits
    s.close()
    with RelationStore(path) as s:
        assert s.answers()[0].tolist() == [[0, 1], [5, 6]]


def test_closed_store_is_a_clear_error(tmp_path):
    s = RelationStore(tmp_path / "c.sqlite")
    s.record([[0, 1]], [True])
    s.close()
    s.close()  # idempotent
    for call in (lambda: s.record([[1, 2]], [True]), s.refresh,
                 lambda: s.backup(tmp_path / "b.sqlite")):
        with pytest.raises(StoreError, match="is closed"):
            call()
    assert s.same(0, 1) is True  # the loaded relation still answers
    assert palfast.active.StoreError is StoreError and issubclass(StoreCorruptError, ValueError)


def test_lock_held_too_long_is_a_clear_error(tmp_path):
    path = tmp_path / "locked.sqlite"
    RelationStore(path).close()
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


# -------------------------------------------------------------- read-only mode
def test_readonly_mode_never_writes_and_sees_writers(tmp_path):
    path = tmp_path / "store.sqlite"
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
    after = path.read_bytes(), os.stat(path).st_mtime_ns
    for _ in range(2):
        with RelationStore(path, readonly=True) as r:
            assert r.n_queries == 3
    assert (path.read_bytes(), os.stat(path).st_mtime_ns) == after
    with pytest.raises(ValueError, match="readonly=True needs the path"):
        RelationStore(readonly=True)
    with pytest.raises(TypeError, match="readonly must be True or False"):
        RelationStore(path, readonly="yes")


def test_readonly_refuses_a_foreign_file(tmp_path):
    path = tmp_path / "foreign.sqlite"
    _execute(path, "CREATE TABLE t (x)")
    with pytest.raises(ValueError, match="not a palfast RelationStore"):
        RelationStore(path, readonly=True)


# ---------------------------------------------------------------- integrity
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
        s.record(torch.stack([torch.arange(n), torch.arange(1, n + 1)], 1),
                 torch.ones(n, dtype=torch.bool))


@pytest.mark.parametrize("i, j, answer, match", [
    (0, 1, 7, "answer is 7, not 0 or 1"),
    (4, 4, 1, "pair \\(4, 4\\) is not two different"),
    (-3, 1, 0, "pair \\(-3, 1\\) is not two different"),
])
def test_rows_inserted_by_another_tool_are_refused(tmp_path, i, j, answer, match):
    path = tmp_path / "tampered.sqlite"
    _store_with_rows(path)
    t = time.time()
    _tamper(path, "INSERT INTO answers (id, i, j, answer, time, source, crc) "
                  "VALUES (6, ?, ?, ?, ?, 'tool', ?)",
            params=(i, j, answer, t, row_crc(6, i, j, answer, t, b"tool")))
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
    RelationStore(path).close()                                        # migrated to schema 2
    _tamper(path, "INSERT INTO answers (i, j, answer, time, source) VALUES (1, 2, 1, 2.0, 'v1')")
    with pytest.raises(StoreCorruptError, match="row id=2 fails its check: checksum is None"):
        RelationStore(path)
    report = RelationStore.salvage(path, tmp_path / "saved.sqlite")
    assert report == (2, [], [2], 0, [])
    with RelationStore(tmp_path / "saved.sqlite") as s:
        assert s.same(0, 2) is True
    with pytest.raises(ValueError, match="already exists"):
        RelationStore.salvage(path, tmp_path / "saved.sqlite")


@pytest.mark.parametrize("row, match", [(5, "ends at row id=4 but SQLite handed out ids up to 5"),
                                        (2, "row id=2 is missing")])
def test_deleted_rows_are_detected(tmp_path, row, match):
    path = tmp_path / "deleted.sqlite"
    _store_with_rows(path)
    _tamper(path, f"DELETE FROM answers WHERE id = {row}")
    with pytest.raises(StoreCorruptError, match=match):
        RelationStore(path)
    report = RelationStore.salvage(path, tmp_path / "saved.sqlite")
    assert report.kept == 4 and (row == 5 or report.dropped[0][0] == row)


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


# ------------------------------------------------------------ schema upgrade
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
    db.executemany("INSERT INTO meta VALUES (?, ?)", [("application", "palfast.RelationStore"),
                                                      ("schema_version", "1"),
                                                      ("created", "0.0")])
    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    db.execute("PRAGMA user_version = 1")
    db.executemany("INSERT INTO answers (i, j, answer, time, source) VALUES (?, ?, ?, ?, ?)",
                   rows)
    db.close()


def test_version_1_store_is_migrated_in_place(tmp_path):
    path = tmp_path / "v1.sqlite"
    rows = [(0, 1, 1, 1.5, "oracle"), (1, 2, 0, 2.5, "prior"), (3, 4, 1, 3.5, "oracle")]
    _v1_store(path, rows)
    before = path.read_bytes()
    with RelationStore(path, readonly=True) as s:   # reads a v1 store, migrates nothing
        assert s.n_queries == 3 and s.same(0, 2) is False
    assert path.read_bytes() == before
    with RelationStore(path) as s:
        assert s.answers()[0].tolist() == [[0, 1], [1, 2], [3, 4]]
        s.record([[4, 5]], [True])
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(
        SCHEMA_VERSION)
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


# ------------------------------------------------------------- backup, copies
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


# -------------------------------------------------- meta.schema_version damaged
@pytest.mark.parametrize("bit", [0, 1])  # '3' (0x33) becomes '2' or '1'
def test_flipped_schema_version_is_refused_not_trusted(tmp_path, bit):
    """meta.schema_version has no checksum: one flipped bit made a read-only open take
    the schema-2 path and drop the retractions silently. It is cross-checked against the
    tables the file has."""
    path = tmp_path / "s.sqlite"
    with RelationStore(path) as s:
        s.record([[0, 1], [1, 2]], [True, True])
        s.retract([2])
    assert not os.path.exists(f"{path}-wal")  # the close checkpointed: one file to flip
    data = bytearray(path.read_bytes())
    at = data.find(b"schema_version" + str(SCHEMA_VERSION).encode())
    assert at > 0 and data.find(b"schema_version" + str(SCHEMA_VERSION).encode(), at + 1) < 0
    data[at + len(b"schema_version")] ^= 1 << bit
    path.write_bytes(bytes(data))
    for readonly in (True, False):
        with pytest.raises(StoreCorruptError, match="schema_version is '[12]' but the file's "
                                                    "tables are those of schema 3.*salvage"):
            RelationStore(path, readonly=readonly)
    report = RelationStore.salvage(path, tmp_path / "saved.sqlite")  # trusts the tables
    assert report == (2, [], [], 1, [])
    with RelationStore(tmp_path / "saved.sqlite") as s:
        assert s.n_queries == 1 and s.same(1, 2) is None


# ------------------------------------------ acknowledged answers and a damaged -wal
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
#: Answers the killed writer records (one transaction each), few enough that SQLite's
#: automatic checkpoint (at 1000 WAL pages) never runs: they all live in the -wal.
KILLED_ANSWERS = 30


@pytest.fixture(scope="module")
def killed_store(tmp_path_factory):
    """The files a writer leaves when SIGKILLed after KILLED_ANSWERS acknowledged
    answers (and one retraction per 5 answers), none of them checkpointed."""
    folder = tmp_path_factory.mktemp("killed")
    path = str(folder / "s.sqlite")
    child = subprocess.Popen([sys.executable, "-c", IDLE_WRITER, path, str(KILLED_ANSWERS)],
                             stdout=subprocess.PIPE, text=True, env=_child_env(), cwd=folder)
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
def test_lost_wal_frames_are_an_error_not_fewer_answers(tmp_path, killed_store, how):
    """SQLite stops replaying a -wal at the first frame whose checksum fails and drops
    the transactions from there on; a deleted or truncated -wal loses them too. The
    answers were acknowledged (record() had returned), so the open must refuse."""
    wal = next(d for name, d in killed_store.items() if name.endswith("-wal"))
    page = int.from_bytes(wal[8:12], "big")          # WAL header: page size
    frame = 24 + page                                # frame header + one page
    if how == "flip":
        rng = random.Random(1)
        trials = [_flip(rng.randrange(len(wal) * 8)) for _ in range(12)]
        trials.append(_flip((32 + (len(wal) - 32) // frame // 2 * frame + 24 + 100) * 8))
    elif how == "delete":
        trials = [lambda name, data: None if name.endswith("-wal") else data]
    elif how == "truncate":
        trials = [lambda name, data: data[:len(data) // 2] if name.endswith("-wal") else data]
    else:  # whole frames cut off the end: the last transactions vanish cleanly
        trials = [lambda name, data: data[:len(data) - 3 * frame] if name.endswith("-wal")
                  else data]
    n_retractions = KILLED_ANSWERS - _expected_after_kill()
    for k, damage in enumerate(trials):
        path = _place(killed_store, tmp_path / str(k), damage)
        for readonly in (True, False):
            with pytest.raises(StoreCorruptError,
                               match=r"acknowledged .* lost.*-wal.*backup.*accept_loss=True"):
                RelationStore(path, readonly=readonly)
        if how == "delete":  # the schema itself was in the -wal: no store is left
            with pytest.raises(ValueError, match="not a palfast RelationStore"):
                RelationStore(path, accept_loss=True, readonly=True)
        else:
            with RelationStore(path, accept_loss=True, readonly=True) as r:
                assert _rows(r) < (KILLED_ANSWERS, n_retractions)
        with RelationStore(path, accept_loss=True) as s:  # continues with what is left
            assert _rows(s) < (KILLED_ANSWERS, n_retractions)
            left = s.n_queries
            s.record([[1000, 1001]], [True])
        with RelationStore(path) as s:                     # the loss was accepted once
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
    with RelationStore(path, accept_loss=True) as s:   # rewrites the record
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
