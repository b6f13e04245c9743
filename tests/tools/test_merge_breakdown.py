"""tools/merge_breakdown.py: the wrong joins of a store (applied "alike" answers across two
true classes), with the sizes they joined, their round, votes and re-ask candidacy."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from palfast.active import RelationStore

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("merge_breakdown", ROOT / "tools" / "merge_breakdown.py")
merge_breakdown = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = merge_breakdown
_spec.loader.exec_module(merge_breakdown)

pytestmark = pytest.mark.filterwarnings("ignore::palfast.active.store.ContradictionWarning")


def test_wrong_joins_single_multi_round_votes():
    y = torch.tensor([0, 0, 1, 1, 2, 2, 0])
    store = RelationStore(policy="majority")
    store.record([[0, 1], [2, 3]], [True, True])  # round 0 (rounds of 2): right
    store.record([[1, 2], [4, 5]], [True, True])  # round 1: A+B (2·2), wrong; right
    store.record([[5, 6], [6, 5]], [True, False])  # round 2: 6 (class 0) to C, then a tie: undone
    store.record([[0, 4]], [False])  # round 3: a right "different" (A+B vs C)
    joins = merge_breakdown.wrong_joins(store, y, 2)
    assert [(w["pair"], w["sizes"], w["kind"], w["round"], w["votes"], w["candidate"]) for w in joins] == [
        ((1, 2), (2, 2), "multi", 1, (1, 0), True),
    ]
    store.record([[6, 5]], [True])  # the tie settled "alike", 2 to 1: a one-vote join again
    joins = merge_breakdown.wrong_joins(store, y, 2)
    assert [(w["pair"], w["sizes"], w["kind"], w["round"], w["votes"], w["candidate"]) for w in joins] == [
        ((1, 2), (2, 2), "multi", 1, (1, 0), True),
        ((5, 6), (2, 1), "single", 2, (2, 1), True),
    ]
    store.record([[5, 6]], [False])  # a tie again: undone, no longer a wrong join
    assert [w["pair"] for w in merge_breakdown.wrong_joins(store, y, 2)] == [(1, 2)]
