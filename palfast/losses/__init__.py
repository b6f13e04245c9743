"""The losses of palfast, one job per module (:mod:`palfast.functional` is their
public front, docs/api.md, "Losses"):

* :mod:`.info_nce`: graph-weighted InfoNCE and its unknown-pairs correction;
* :mod:`.covariance`: VICReg, Barlow Twins and the spectral contrastive loss, in
  graph form and in their official two-view forms;
* :mod:`.vic2`: PAL's VIC² and its unbiased orthogonality estimators;
* :mod:`._common`: the argument checks and the ``gather`` and two-view plumbing
  that the losses and :mod:`palfast.nn` share.
"""

from __future__ import annotations

from .covariance import (
    barlow_twins,
    barlow_twins_two_view,
    spectral_contrastive,
    spectral_contrastive_two_view,
    vicreg,
    vicreg_two_view,
)
from .info_nce import INFO_NCE_MAX_LOGIT, info_nce
from .vic2 import vic2

__all__ = [
    "INFO_NCE_MAX_LOGIT",
    "info_nce",
    "vicreg",
    "barlow_twins",
    "spectral_contrastive",
    "vic2",
    "vicreg_two_view",
    "barlow_twins_two_view",
    "spectral_contrastive_two_view",
]
