"""palfast: fast Positive Active Learning for PyTorch.

Graph-weighted self-supervised losses as fused C++/CUDA custom ops that never
build an N×N matrix, plus the active-learning loop of PAL (Cabannes et al.,
ICCV 2023). See README.md and SPEC.md.
"""

from . import _ops  # noqa: F401  (loads the extension and registers the ops)
from . import functional, nn
from .functional import info_nce
from .graph import PairGraph

__version__ = "0.1.0"

__all__ = ["PairGraph", "functional", "info_nce", "nn", "__version__"]

# Active PAL and evaluation (faiss, scikit-learn and matplotlib are imported lazily).
from . import active, metrics  # noqa: F401
