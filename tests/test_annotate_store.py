"""RelationStore.retract: the undo that `palfast annotate` needs. The log stays append-only;
a retraction is a new record that supersedes an answer, seen by every process, on reopen,
and by stores written before retractions existed (schema version 1)."""

import sqlite3

import pytest
import torch

from palfast.active import RelationStore
from palfast.active.store import SCHEMA_VERSION


def test_record_returns_log_ids_and_retract_supersedes(tmp_path):
    path = tmp_path / "s.sqlite"
    with RelationStore(path) as s:
        first = s.record(torch.tensor([[0, 1], [1, 2]]), torch.tensor([True, True]), source="ann")
        second = s.record(torch.tensor([[2, 3]]), torch.tensor([False]), source="bob")
        assert first == [1, 2] and second == [3]
        assert s.same(0, 2) is True and s.same(0, 3) is False
        s.retract([2], source="ann")
        # 1~2 is gone, so 0~2 and (through 2~1) 0≁3 are no longer implied.
        assert s.same(0, 1) is True and s.same(0, 2) is None and s.same(0, 3) is None
        assert s.same(2, 3) is False
        assert s.n_queries == 2
        pairs, answers = s.answers()
        assert pairs.tolist() == [[0, 1], [2, 3]] and answers.tolist() == [True, False]
        log = s.log()
        assert [(r[0], r[1], r[2], r[3], r[5], r[6]) for r in log] == [
            (1, 0, 1, True, "ann", None), (2, 1, 2, True, "ann", "ann"), (3, 2, 3, False, "bob", None)]
    with RelationStore(path) as s:  # reopening replays the log without the retracted answer
        assert s.n_queries == 2 and s.same(0, 2) is None and s.same(2, 3) is False
        assert s.record([[5, 6]], [True]) == [4]


def test_retract_refuses_unknown_repeated_and_twice():
    s = RelationStore()
    ids = s.record([[0, 1]], [True])
    with pytest.raises(ValueError, match="no answer with id"):
        s.retract([ids[0] + 7])
    with pytest.raises(ValueError, match="repeat"):
        s.retract([ids[0], ids[0]])
    with pytest.raises(TypeError, match="integer log ids"):
        s.retract([1.5])
    s.retract(ids)
    with pytest.raises(ValueError, match="already retracted"):
        s.retract(ids)
    s.retract([])  # nothing to do
    assert s.n_queries == 0 and s.same(0, 1) is None


def test_retractions_are_append_only(tmp_path):
    with RelationStore(tmp_path / "s.sqlite") as s:
        s.retract(s.record([[0, 1]], [True]))
    db = sqlite3.connect(tmp_path / "s.sqlite")
    for sql in ("UPDATE retractions SET answer_id = 5", "DELETE FROM retractions"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute(sql)
    db.close()


def test_other_process_sees_retraction_after_refresh(tmp_path):
    path = tmp_path / "s.sqlite"
    with RelationStore(path) as a, RelationStore(path) as b:
        ids = a.record([[0, 1], [1, 2]], [True, True])
        b.refresh()
        assert b.same(0, 2) is True
        a.retract(ids[:1])
        assert b.refresh() == 1
        assert b.same(0, 2) is None and b.same(1, 2) is True and b.n_queries == 1
        # A writer replays the other's retraction before appending its own rows.
        b.retract(ids[1:])
        a.record([[3, 4]], [False])
        assert a.n_queries == 1 and a.same(1, 2) is None


def test_version_1_store_is_upgraded(tmp_path):
    path = tmp_path / "old.sqlite"
    with RelationStore(path) as s:
        s.record([[0, 1]], [True])
    db = sqlite3.connect(path)  # make it look like a store written before retractions existed
    db.execute("DROP TABLE retractions")
    db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    with RelationStore(path) as s:
        assert s.same(0, 1) is True
        s.retract([1])
        assert s.same(0, 1) is None
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(
        SCHEMA_VERSION)
    db.close()
