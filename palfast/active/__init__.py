"""Active PAL (SPEC §4): the answer store, oracles, candidate pairs, query strategies
and the active learning loop."""

from .candidates import candidate_pairs, knn
from .learner import ActiveLearner
from .oracle import CallbackOracle, LabelOracle, Oracle
from .store import RelationStore
from .strategies import STRATEGIES, select_queries

__all__ = ["STRATEGIES", "ActiveLearner", "CallbackOracle", "LabelOracle", "Oracle",
           "RelationStore", "candidate_pairs", "knn", "select_queries"]
