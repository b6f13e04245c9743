"""palfast: fast Positive Active Learning for PyTorch.

Graph-weighted self-supervised losses as fused C++/CUDA custom ops that never
build an N×N matrix, plus the active-learning loop of PAL (Cabannes et al.,
ICCV 2023). See README.md and docs/api.md.
"""

from . import (
    _ops,  # noqa: F401  (loads the extension and registers the ops)
    functional,
    nn,
)
from .functional import barlow_twins, info_nce, spectral_contrastive, vic2, vicreg
from .graph import PairGraph

__version__ = "0.2.0"

__all__ = [
    "PairGraph",
    "active",
    "distributed",
    "functional",
    "info_nce",
    "metrics",
    "nn",
    "__version__",
    "vicreg",
    "barlow_twins",
    "spectral_contrastive",
    "vic2",
]

# Active PAL and evaluation (faiss, scikit-learn and matplotlib are imported lazily).
from . import active, distributed, metrics  # noqa: E402
