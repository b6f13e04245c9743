"""palfast.barlow_twins and BarlowTwinsLoss against the float64 reference, the
official two-view Barlow Twins, and their contract (docs/api.md)."""

from __future__ import annotations

import functools

import pytest
import torch

import palfast
from palfast import reference
from palfast.testing import (
    KINDS,
    assert_compile_matches_eager,
    assert_constant_with_zero_gradient,
    assert_gradcheck_every_kind,
    assert_matches_float64,
    assert_two_views_match,
)

# float tolerances: CI runs these again under a second CPU capability (.ci/run)
pytestmark = pytest.mark.numeric

SIZES = [(2, 3), (41, 127), (257, 3), (257, 127)]  # N < D: Gram side; N > D: C side


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,d", SIZES)
def test_matches_reference_float64(seeded_inputs, kind, n, d):
    z, g = seeded_inputs(kind, n, d)
    assert_matches_float64(palfast.barlow_twins, reference.barlow_twins, z, g, lambd=0.3, eps=1e-3)


@pytest.mark.parametrize("n,d", [(30, 50), (50, 30)])
def test_asymmetric_weighted_edges(device, n, d):
    """Gᵀ ≠ G: the backward needs Gᵀ K G as well as G K Gᵀ (Gram side) and Gᵀ (C side)."""
    torch.manual_seed(1)
    src, dst = torch.randint(0, n, (4 * n,)), torch.randint(0, n, (4 * n,))
    g = palfast.PairGraph.from_edges(src, dst, torch.rand(4 * n) * 2, num_nodes=n, symmetric=False).to(device)
    assert not g.symmetric
    z = torch.randn(n, d, dtype=torch.float64, device=device)
    assert_matches_float64(palfast.barlow_twins, reference.barlow_twins, z, g)


@pytest.mark.parametrize("n,d", [(9, 5), (5, 9)])
@pytest.mark.slow
def test_gradcheck(device, graph_factory, n, d):
    torch.manual_seed(5)
    z = torch.randn(n, d, dtype=torch.float64, device=device, requires_grad=True)
    assert_gradcheck_every_kind(lambda x, g: palfast.barlow_twins(x, g, lambd=0.2), z, graph_factory)


def test_gram_blocks_beyond_one_tile(device, graph_factory):
    """N > 512: the Gram matrices are built from upper block rows and mirrored
    (sq_xcorr's side: tests/ops/test_sq_xcorr.py)."""
    torch.manual_seed(14)
    n, d = 530, 600
    z = torch.randn(n, d, dtype=torch.float64, device=device)
    g = graph_factory("semi", n, seed=9).to(device)
    assert_matches_float64(palfast.barlow_twins, reference.barlow_twins, z, g)


# ------------------------------------------------------------------ two views
@pytest.mark.parametrize("n,d", [(2, 3), (16, 64), (100, 10)])
def test_two_view_is_official_barlow_twins(device, n, d):
    torch.manual_seed(8)
    z_a = torch.randn(n, d, dtype=torch.float64, device=device)
    z_b = z_a + 0.5 * torch.randn(n, d, dtype=torch.float64, device=device)
    # lambd 0.0051: facebookresearch/barlowtwins' default
    official = functools.partial(reference.barlow_twins_two_view_official, lambd=0.0051)
    assert_two_views_match(palfast.nn.BarlowTwinsLoss(lambd=0.0051), official, z_a, z_b, rtol=1e-10, atol=0)


def test_two_view_float32_matches_official(device):
    torch.manual_seed(9)
    z_a, z_b = torch.randn(64, 256, device=device), torch.randn(64, 256, device=device)
    official = reference.barlow_twins_two_view_official(z_a, z_b, lambd=0.02)
    torch.testing.assert_close(palfast.nn.BarlowTwinsLoss(lambd=0.02)(z_a, z_b), official, rtol=1e-5, atol=1e-5)


def test_graph_form_differs_from_two_view_form():
    """Documented: pooled standardisation and a symmetrised C, not the official loss."""
    torch.manual_seed(10)
    z_a, z_b = torch.randn(12, 8, dtype=torch.float64), torch.randn(12, 8, dtype=torch.float64)
    graph = palfast.barlow_twins(torch.cat([z_a, z_b]), palfast.PairGraph.from_views(12, 2))
    assert not torch.allclose(graph, palfast.nn.BarlowTwinsLoss()(z_a, z_b))


# ----------------------------------------------------------------- edge cases
def test_empty_graph_gives_d_with_zero_gradient(device):
    z = torch.randn(10, 4, device=device, requires_grad=True)
    graphs = (palfast.PairGraph.from_edges([], [], num_nodes=10), palfast.PairGraph.from_labels(torch.arange(10)))
    assert_constant_with_zero_gradient(palfast.barlow_twins, z, graphs, 4.0)


def test_single_row(device):
    z = torch.randn(1, 6, dtype=torch.float64, device=device, requires_grad=True)
    g = palfast.PairGraph.from_dense(torch.ones(1, 1)).to(device)  # no edge: self-loops drop
    loss = palfast.barlow_twins(z, g)
    assert loss.item() == 6.0  # ẑ = 0 and |G| = 0
    torch.testing.assert_close(loss, reference.barlow_twins(z, g))


@pytest.mark.parametrize("n,d", [(32, 48), (32, 8)])
@pytest.mark.slow
def test_compile_fullgraph(device, n, d):
    torch.manual_seed(13)
    g = palfast.PairGraph.from_views(n // 2, 2).to(device)
    z = torch.randn(n, d, device=device, requires_grad=True)
    h = n // 2

    def step(x):
        return palfast.barlow_twins(x * 2.0, g) + palfast.nn.BarlowTwinsLoss()(x[:h], x[h:])

    assert_compile_matches_eager(step, z)


# Bad z, graph and hyper-parameters of every loss: tests/losses/test_bad_input.py.
