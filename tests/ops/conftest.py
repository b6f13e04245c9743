"""Fixtures of the op tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def opcheck_inputs(device, graph_factory):
    """``[(graph, x), ...]`` for torch.library.opcheck: a semi-supervised graph over the
    rows of ``x``, which requires grad, with N < D and N > D (each op's two sides)."""
    torch.manual_seed(6)
    sizes = [(15, 20), (20, 15)]
    return [
        (graph_factory("semi", n).to(device), torch.randn(n, d, device=device, requires_grad=True)) for n, d in sizes
    ]
