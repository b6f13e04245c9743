"""RelationStore: transitive closure, cannot-link propagation, graphs, durability
(a real SIGKILL), concurrent writers, foreign/corrupt files, bad input."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import palfast
from palfast.active import RelationStore
from palfast.active.store import APPLICATION_ID


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
    s.record(torch.tensor([[0, 1], [1, 2], [0, 2], [0, 3], [3, 0]]),
             torch.tensor([True, True, False, False, True]))
    assert s.n_queries == 5 and s.n_conflicts == 2
    assert s.same(0, 2) is True and s.same(0, 3) is False
    pairs, answers = s.answers()
    assert pairs.tolist() == [[0, 1], [1, 2], [0, 2], [0, 3], [3, 0]]
    assert answers.tolist() == [True, True, False, False, True]


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
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE answers (x)")
    db.commit()
    db.close()
    with pytest.raises(ValueError, match="foreign"):
        RelationStore(path)
    db = sqlite3.connect(path)
    db.execute("PRAGMA application_id = 1234")
    db.commit()
    db.close()
    with pytest.raises(ValueError, match="another application"):
        RelationStore(path)


def test_newer_schema_and_damaged_store_are_refused(tmp_path):
    path = tmp_path / "newer.sqlite"
    RelationStore(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(ValueError, match="schema version 99"):
        RelationStore(path)
    path = tmp_path / "damaged.sqlite"
    RelationStore(path).close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE meta")
    db.commit()
    db.close()
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


def test_foreign_database_is_left_untouched(tmp_path):
    path = tmp_path / "foreign.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    before = path.read_bytes()
    with pytest.raises(ValueError, match="foreign"):
        RelationStore(path)
    assert path.read_bytes() == before
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "delete"
