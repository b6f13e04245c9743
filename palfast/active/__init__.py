"""Active PAL (docs/active.md): the answer store, oracles, candidate pairs, query
strategies and the active learning loop; ``palfast.active.distributed`` runs the
candidate search over the ranks of a torch.distributed job."""

from ..knn import knn
from . import distributed
from .candidates import candidate_pairs
from .learner import ActiveLearner
from .oracle import CallbackOracle, LabelOracle, Oracle
from .policy import POLICIES
from .store import AnnotatorStats, ContradictionWarning, RelationStore, StoreCorruptError, StoreError
from .strategies import ORDERS, STRATEGIES, CandidateGraph, select_queries, select_reasks

__all__ = [
    "ORDERS",
    "POLICIES",
    "STRATEGIES",
    "ActiveLearner",
    "AnnotatorStats",
    "CallbackOracle",
    "CandidateGraph",
    "LabelOracle",
    "Oracle",
    "RelationStore",
    "candidate_pairs",
    "distributed",
    "knn",
    "select_queries",
    "select_reasks",
]
__all__ += ["ContradictionWarning", "StoreCorruptError", "StoreError"]  # the store's errors
