"""RelationStore.save_state / load_state (schema 4): a strategy's state kept in the store
beside the answers, on both backends: round trip, reopen, same transaction as record,
checksums, read-only stores, bad values, stores of schema 3 gaining the table."""

import pytest
import torch

from palfast.active import RelationStore, StoreCorruptError, StoreError
from palfast.active.answer_log import SCHEMA_VERSION, state_crc

from _store_helpers import execute_sql, is_url

#: A state with every JSON type, nested, and values that a lossy encoding would change.
STATE = {
    "n_seeds": 7,
    "explore_credit": 0.30000000000000004,
    "exploring": True,
    "misses": 0,
    "pending": [[2**40, 3, False], [5, 6, True]],
    "note": 'é ∑ \x00 "quoted"',
    "nothing": None,
    "nested": {"a": [[], {}], "b": -1.5e-300},
}


def _types(value):
    """``value`` with every leaf replaced by its type (== compares 1 and True, 1 and 1.0)."""
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_types(v) for v in value]
    return type(value)


def test_state_round_trip_reopen_and_backup(store_path, tmp_path):
    with RelationStore(store_path) as s:
        assert s.load_state("pal") is None
        s.save_state("pal", STATE)
        s.save_state("other", {})
        got = s.load_state("pal")
        assert got == STATE and _types(got) == _types(STATE)
        s.backup(tmp_path / "copy.sqlite")
    with RelationStore(store_path) as s:  # reopened
        assert s.load_state("pal") == STATE and s.load_state("other") == {}
        s.save_state("pal", {"n_seeds": 8})  # replaces the value, whole
        assert s.load_state("pal") == {"n_seeds": 8} and s.n_queries == 0
    with RelationStore(tmp_path / "copy.sqlite", readonly=True) as c:  # the backup has it, verified
        got = c.load_state("pal")
        assert got == STATE and _types(got) == _types(STATE)


def test_state_saved_with_the_answers_in_one_transaction(store_path):
    """record(..., state=) saves the state with the answers; the last writer of a key wins."""
    with RelationStore(store_path) as a, RelationStore(store_path) as b:
        a.record([[0, 1]], [True], state={"pal": {"n_seeds": 1}})
        assert b.load_state("pal") == {"n_seeds": 1}  # read from the store, not a cache
        b.record([[1, 2]], [False], state={"pal": {"n_seeds": 2}, "x": {"k": [1]}})
        assert a.load_state("pal") == {"n_seeds": 2} and a.load_state("x") == {"k": [1]}
        # A bad state is refused before anything is written: no answer either.
        with pytest.raises(TypeError, match=r"RelationStore.record: state\['pal'\] must hold only JSON types"):
            a.record([[3, 4]], [True], state={"pal": {"pending": [(3, 4, True)]}})
        assert a.n_queries == 1 and b.n_queries == 2 and a.load_state("pal") == {"n_seeds": 2}
        assert a.record([], [], state={"pal": {"n_seeds": 4}}) == []  # state alone
        assert b.load_state("pal") == {"n_seeds": 4}


def _refuse_state_inserts(path) -> None:
    """A trigger that fails every INSERT into the state table (a write failing midway)."""
    if is_url(path):
        execute_sql(
            path,
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$",
            "CREATE TRIGGER refuse BEFORE INSERT ON state FOR EACH ROW EXECUTE FUNCTION refuse()",
        )
    else:
        execute_sql(path, "CREATE TRIGGER refuse BEFORE INSERT ON state BEGIN SELECT RAISE(ABORT, 'refused'); END")


def test_record_with_state_writes_both_or_neither(store_path):
    """The state is written in the answers' transaction: when writing it fails, the
    answers of that call are not recorded either (and the relation is unchanged)."""
    with RelationStore(store_path) as s:
        s.record([[0, 1]], [True], state={"pal": {"n_seeds": 1}})
    _refuse_state_inserts(store_path)
    with RelationStore(store_path) as s:
        with pytest.raises(StoreError, match="refused"):
            s.record([[1, 2]], [True], state={"pal": {"n_seeds": 2}})
        assert s.n_queries == 1 and s.same(0, 2) is None and s.refresh() == 0
        assert s.record([[1, 2]], [True]) == [2]  # without a state: recorded
    with RelationStore(store_path, readonly=True) as r:
        assert r.n_queries == 2 and r.load_state("pal") == {"n_seeds": 1}


@pytest.mark.parametrize(
    "value, exc, match",
    [
        ({"pending": [(1, 2, True)]}, TypeError, r"value\['pending'\]\[0\] is a tuple, not a JSON type; use a list"),
        ({1: "a"}, TypeError, r"value has the key 1 \(int\); JSON keys are str"),
        ({"a": {2: 0}}, TypeError, r"value\['a'\] has the key 2"),
        ({"s": {1, 2}}, TypeError, r"value\['s'\] is a set"),
        ({"t": torch.tensor(1)}, TypeError, r"value\['t'\] is a Tensor"),
        ({"x": float("nan")}, ValueError, r"value\['x'\] is nan, and JSON has no NaN"),
        ({"x": [float("-inf")]}, ValueError, r"value\['x'\]\[0\] is -inf"),
        ([1, 2], TypeError, "be a dict"),
        (None, TypeError, "be a dict"),
    ],
)
def test_save_state_bad_value_is_refused_naming_it(tmp_path, value, exc, match):
    with RelationStore(tmp_path / "s.sqlite") as s:
        s.save_state("pal", {"n": 1})
        with pytest.raises(exc, match=r"RelationStore\.save_state: value must .*" + match):
            s.save_state("pal", value)
        assert s.load_state("pal") == {"n": 1}


@pytest.mark.parametrize("key", ["", "pal key", "é", "x" * 201, 3, None])
def test_bad_state_key_is_refused(tmp_path, key):
    with RelationStore(tmp_path / "s.sqlite") as s:
        for call in (lambda: s.save_state(key, {}), lambda: s.load_state(key)):
            with pytest.raises(ValueError, match="key must be 1 to 200 ASCII letters"):
                call()


def test_readonly_store_loads_state_and_refuses_to_save(store_path):
    with RelationStore(store_path) as s:
        s.save_state("pal", {"n_seeds": 1})
    with RelationStore(store_path, readonly=True) as r:
        assert r.load_state("pal") == {"n_seeds": 1} and r.load_state("none") is None
        for call in (lambda: r.save_state("pal", {}), lambda: r.record([[0, 1]], [True], state={"pal": {}})):
            with pytest.raises(StoreError, match="readonly=True"):
                call()
    with RelationStore(store_path) as s:
        assert s.load_state("pal") == {"n_seeds": 1} and s.n_queries == 0


@pytest.mark.parametrize(
    "edit, why",
    [
        ("UPDATE state SET value = '{\"n_seeds\": 9}'", "its checksum does not match its content"),
        ("UPDATE state SET time = time + 1", "its checksum does not match its content"),
        ("UPDATE state SET crc = 0", "its checksum does not match its content"),
        ("UPDATE state SET key = 'pam'", "its checksum does not match its content"),
        ("UPDATE state SET value = '[1]', crc = CRC_OF_LIST", "its value is a JSON list, not an object"),
    ],
)
def test_damaged_state_row_is_detected(store_path, edit, why):
    """A state row edited behind the store's back fails its checksum at load_state
    (StoreCorruptError naming the store and the key); the answers are unaffected and a
    save replaces the row."""
    with RelationStore(store_path) as s:
        s.record([[0, 1]], [True], state={"pal": {"n_seeds": 1}})
        t = execute_sql(store_path, "SELECT time FROM state WHERE key = 'pal'")[0][0]
    # Behind the store's back: no trigger guards the state table (each save replaces a row).
    execute_sql(store_path, edit.replace("CRC_OF_LIST", str(state_crc("pal", "[1]", t))))
    key = "pam" if "key = 'pam'" in edit else "pal"
    for readonly in (True, False):
        with RelationStore(store_path, readonly=readonly) as s:
            assert s.n_queries == 1 and s.same(0, 1) is True  # the store opens
            with pytest.raises(StoreCorruptError, match=f"state row key='{key}' fails its check: {why}") as e:
                s.load_state(key)
            assert str(store_path) in str(e.value) and "save_state('" in str(e.value)
    with RelationStore(store_path) as s:
        s.save_state(key, {"n_seeds": 2})
        assert s.load_state(key) == {"n_seeds": 2}


def _make_schema_3(path) -> None:
    """A store as a schema-3 palfast wrote it: answers, the same tables without
    ``state``, and ``meta`` (and SQLite's user_version) saying 3."""
    with RelationStore(path) as s:
        s.record([[0, 1], [1, 2]], [True, False])
    statements = ["DROP TABLE state", "UPDATE meta SET value = '3' WHERE key = 'schema_version'"]
    if not is_url(path):
        statements.append("PRAGMA user_version = 3")
    execute_sql(path, *statements)


def _schema_version(path) -> str:
    return execute_sql(path, "SELECT value FROM meta WHERE key = 'schema_version'")[0][0]


def test_schema_3_store_gains_the_state_table_on_a_writable_open(store_path):
    _make_schema_3(store_path)
    with RelationStore(store_path, readonly=True) as r:  # read as it is: no state table
        assert r.n_queries == 2 and r.load_state("pal") is None
        with pytest.raises(StoreError, match="readonly=True"):
            r.save_state("pal", {})
    assert _schema_version(store_path) == "3"
    with RelationStore(store_path) as s:  # migrated
        assert _schema_version(store_path) == str(SCHEMA_VERSION)
        assert s.n_queries == 2 and s.load_state("pal") is None
        s.record([[2, 3]], [True], state={"pal": {"n_seeds": 1}})
    with RelationStore(store_path) as s:  # reopened
        assert s.load_state("pal") == {"n_seeds": 1} and s.n_queries == 3
    with RelationStore(store_path, readonly=True) as r:
        assert r.load_state("pal") == {"n_seeds": 1}


def test_salvage_copies_the_state_rows_that_verify(tmp_path):
    """salvage() copies each state row that passes its check, value and time unchanged
    (the learner on the salvaged store continues), and names each one it drops."""
    path = tmp_path / "answers.sqlite"
    with RelationStore(path) as s:
        s.record([[0, 1]], [True], state={"pal": {"n_seeds": 3, "pending": [[0, 1, True]]}})
        s.save_state("other", {"a": 1})
    saved = execute_sql(path, "SELECT key, value, time FROM state ORDER BY key")
    report = RelationStore.salvage(path, tmp_path / "saved.sqlite")
    assert report.kept == 1 and report.state_kept == ["other", "pal"] and report.state_dropped == []
    assert execute_sql(tmp_path / "saved.sqlite", "SELECT key, value, time FROM state ORDER BY key") == saved
    with RelationStore(tmp_path / "saved.sqlite") as s:
        assert s.load_state("pal") == {"n_seeds": 3, "pending": [[0, 1, True]]}
    execute_sql(path, "UPDATE state SET value = '{\"a\": 2}' WHERE key = 'other'")  # fails its checksum
    report = RelationStore.salvage(path, tmp_path / "saved2.sqlite")
    assert report.state_kept == ["pal"]
    assert report.state_dropped == [("other", "its checksum does not match its content")]
    with RelationStore(tmp_path / "saved2.sqlite") as s:
        assert s.load_state("other") is None and s.load_state("pal")["n_seeds"] == 3
