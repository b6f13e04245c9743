"""RelationStore.retract: the undo that `palfast annotate` needs. The log stays append-only;
a retraction is a new record that supersedes an answer, seen by every process and on
reopen; retraction rows are checksummed and verified like answers (schema version 3)."""

import sqlite3

import pytest
import torch

from palfast.active import RelationStore
from palfast.active.store import SCHEMA_VERSION, StoreCorruptError, StoreError, row_crc


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
            (1, 0, 1, True, "ann", None),
            (2, 1, 2, True, "ann", "ann"),
            (3, 2, 3, False, "bob", None),
        ]
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


def test_version_2_store_is_migrated(tmp_path):
    """A schema-2 store (checksums, no retractions table) gets the table on a writable
    open; a read-only open reads it as it is. (Version 1 → 3: test_active_answer_log.py.)"""
    path = tmp_path / "v2.sqlite"
    with RelationStore(path) as s:
        s.record([[0, 1]], [True])
    db = sqlite3.connect(path)  # the layout schema 2 had: the same, less retractions and state
    db.execute("DROP TABLE retractions")
    db.execute("DROP TABLE state")
    db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    db.execute("PRAGMA user_version = 2")
    db.commit()
    db.close()
    with RelationStore(path, readonly=True) as s:
        assert s.same(0, 1) is True and s.log()[0][6] is None
    with RelationStore(path) as s:
        assert s.same(0, 1) is True
        s.retract([1])
        assert s.same(0, 1) is None
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    db.close()


def test_readonly_store_refuses_retract(tmp_path):
    path = tmp_path / "s.sqlite"
    with RelationStore(path) as s:
        ids = s.record([[0, 1]], [True])
    with RelationStore(path, readonly=True) as r:
        for ids_ in (ids, []):
            with pytest.raises(StoreError, match="readonly=True"):
                r.retract(ids_)
    with RelationStore(path) as s:
        s.close()
        with pytest.raises(StoreError, match="is closed"):
            s.retract(ids)


# ---------------------------------------------------------------- integrity
def _store_with_retraction(path):
    with RelationStore(path) as s:
        s.record([[0, 1], [1, 2], [2, 3]], [True, True, False])
        s.retract([2], source="ann")


def _tamper(path, statement):
    """Edit the retractions as another tool would: triggers and CHECK constraints bypassed."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA ignore_check_constraints = ON")
    db.execute("DROP TRIGGER retractions_no_update")
    db.execute("DROP TRIGGER retractions_no_delete")
    db.execute(statement)
    db.close()


@pytest.mark.parametrize(
    "statement, match",
    [
        ("UPDATE retractions SET answer_id = 3", "retractions row id=1 fails its check: its checksum"),
        ("UPDATE retractions SET source = 'bob'", "retractions row id=1 fails its check: its checksum"),
        ("DELETE FROM retractions", "retractions log ends at row id=0 but SQLite handed out ids up to 1"),
        (
            "INSERT INTO retractions (id, answer_id, time, source, crc) "
            f"VALUES (2, 9, 1.0, 'x', {row_crc(2, 9, 1.0, b'x')})",
            "retractions row id=2 names answer id=9, which is not in the log",
        ),
        (
            "INSERT INTO retractions (id, answer_id, time, source, crc) "
            f"VALUES (2, 0, 1.0, 'x', {row_crc(2, 0, 1.0, b'x')})",
            "retractions row id=2 fails its check: answer_id is 0",
        ),
    ],
)
def test_tampered_retractions_are_refused_and_salvaged(tmp_path, statement, match):
    path = tmp_path / "s.sqlite"
    _store_with_retraction(path)
    _tamper(path, statement)
    for readonly in (False, True):
        with pytest.raises(StoreCorruptError, match=match):
            RelationStore(path, readonly=readonly)
    report = RelationStore.salvage(path, tmp_path / "saved.sqlite")
    assert report.kept == 3 and report.dropped == []
    with RelationStore(tmp_path / "saved.sqlite") as s:
        # The retraction survives only where it verifies and names a kept answer.
        assert s.n_queries == 3 - report.retractions_kept
        assert len(report.retractions_dropped) == (0 if "DELETE" in statement else 1)


def test_backup_and_salvage_keep_retractions(tmp_path):
    path = tmp_path / "s.sqlite"
    _store_with_retraction(path)
    with RelationStore(path) as s:
        s.backup(tmp_path / "copy.sqlite")
    report = RelationStore.salvage(path, tmp_path / "saved.sqlite")
    assert report == (3, [], [], 1, [], [], [])
    for copy in ("copy.sqlite", "saved.sqlite"):
        with RelationStore(tmp_path / copy) as s:
            assert s.n_queries == 2 and s.same(0, 2) is None and s.same(2, 3) is False
            assert [r[6] for r in s.log()] == [None, "ann", None]


def test_salvage_drops_the_retraction_of_a_dropped_answer(tmp_path):
    path = tmp_path / "s.sqlite"
    _store_with_retraction(path)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DROP TRIGGER answers_no_update")
    db.execute("UPDATE answers SET i = 7 WHERE id = 2")  # fails its checksum
    db.close()
    report = RelationStore.salvage(path, tmp_path / "saved.sqlite")
    assert report.kept == 2 and [d[0] for d in report.dropped] == [2]
    assert report.retractions_kept == 0 and report.retractions_dropped[0][0] == 1
    with RelationStore(tmp_path / "saved.sqlite") as s:
        assert s.n_queries == 2 and s.same(0, 1) is True and s.same(2, 3) is False
