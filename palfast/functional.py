"""Graph-weighted self-supervised losses (docs/api.md, "Losses"), stateless: the
public front of :mod:`palfast.losses`, where each loss lives.

Every graph loss takes ``(z, graph, *, ...)`` where ``z [N, D]`` are embeddings
(views of one image are separate rows) and ``graph`` is a :class:`palfast.PairGraph`
over the N rows; the two-view forms take ``(z_a, z_b, *, ...)``, two ``[n, D]``
views. Arguments are checked once, before any kernel runs. First derivatives only:
``create_graph=True`` through a loss raises (docs/api.md, "Gradients"), and so does a
graph whose tensors require grad. Every loss also takes

* ``check_finite``: raise ``ValueError`` on NaN/Inf in z (else they propagate to a
  NaN loss, like PyTorch's losses; the check costs a host sync);
* ``gather``: under torch.distributed (default: on when world size > 1) z holds this
  rank's rows and ``graph`` is over the global batch; the global loss is returned on
  every rank (docs/distributed.md);

and returns a scalar in z's dtype, computed in float32 (float64 for float64 z).

Example::

    >>> import torch, palfast
    >>> import palfast.functional as F
    >>> z = torch.randn(8, 16)
    >>> loss = F.vicreg(z, palfast.PairGraph.from_views(4, 2))
"""

from __future__ import annotations

from . import losses as _losses
from .losses import *  # noqa: F403  (the front re-exports palfast.losses' public names, listed once there)

__all__ = _losses.__all__
