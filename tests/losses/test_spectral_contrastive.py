"""palfast.spectral_contrastive and SpectralContrastiveLoss against the float64
reference, HaoChen et al.'s two-view loss, and their contract (docs/api.md)."""

from __future__ import annotations

import pytest
import torch

import palfast
from palfast import reference
from palfast.testing import (
    KINDS,
    assert_compile_matches_eager,
    assert_gradcheck_every_kind,
    assert_matches_float64,
    assert_two_views_match,
)

# float tolerances: CI runs these again under a second CPU capability (.ci/run)
pytestmark = pytest.mark.numeric

SIZES = [(2, 3), (41, 127), (257, 3), (257, 127)]  # D < N: D×D side, else N×N side


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,d", SIZES)
def test_matches_reference_float64(seeded_inputs, kind, n, d):
    z, g = seeded_inputs(kind, n, d)
    assert_matches_float64(palfast.spectral_contrastive, reference.spectral_contrastive, z / d**0.5, g)


def test_asymmetric_weighted_edges(device):
    torch.manual_seed(1)
    n = 30
    g = palfast.PairGraph.from_edges(
        torch.randint(0, n, (90,)), torch.randint(0, n, (90,)), torch.rand(90) * 2, num_nodes=n, symmetric=False
    ).to(device)
    z = torch.randn(n, 20, dtype=torch.float64, device=device)
    assert_matches_float64(palfast.spectral_contrastive, reference.spectral_contrastive, z, g)


@pytest.mark.parametrize("n,d", [(9, 5), (5, 9)])
@pytest.mark.slow
def test_gradcheck(device, graph_factory, n, d):
    torch.manual_seed(5)
    z = torch.randn(n, d, dtype=torch.float64, device=device, requires_grad=True)
    assert_gradcheck_every_kind(palfast.spectral_contrastive, z, graph_factory)
    zb = torch.randn(n, d, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(palfast.nn.SpectralContrastiveLoss(), (z, zb))


# ------------------------------------------------------------------ two views
def haochen_spectral_contrastive(z_a, z_b):
    """HaoChen et al. (2021), eq. (5): −2 E⟨f(x), f(x⁺)⟩ + E⟨f(x), f(x⁻)⟩², with the
    positives the matching rows and the negatives every other row of the other view."""
    n = z_a.shape[0]
    pos = (z_a * z_b).sum(1).mean()
    s = z_a @ z_b.T
    neg = s[~torch.eye(n, dtype=torch.bool, device=s.device)].pow(2).mean()
    return -2 * pos + neg


@pytest.mark.parametrize("n,d", [(2, 3), (16, 64), (100, 10)])
def test_two_view_is_haochen(device, n, d):
    torch.manual_seed(8)
    z_a = torch.randn(n, d, dtype=torch.float64, device=device) / d**0.5
    z_b = z_a + 0.2 * torch.randn(n, d, dtype=torch.float64, device=device) / d**0.5
    assert_two_views_match(
        palfast.nn.SpectralContrastiveLoss(), haochen_spectral_contrastive, z_a, z_b, rtol=1e-10, atol=1e-13
    )


def test_graph_form_shares_the_positive_term_with_two_views():
    torch.manual_seed(9)
    z_a, z_b = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 4, dtype=torch.float64)
    g = palfast.PairGraph.from_views(10, 2)
    z = torch.cat([z_a, z_b])
    n = 20
    neg = ((z @ z.T).square().sum() - (z * z).sum(1).square().sum()) / (n * (n - 1))
    torch.testing.assert_close(palfast.spectral_contrastive(z, g) - neg, -2 * (z_a * z_b).sum(1).mean())


# ----------------------------------------------------------------- edge cases
def test_empty_graph_and_single_row(device):
    z = torch.randn(10, 4, dtype=torch.float64, device=device)
    empty = palfast.PairGraph.from_edges([], [], num_nodes=10).to(device)
    torch.testing.assert_close(palfast.spectral_contrastive(z, empty), reference.spectral_contrastive(z, empty))
    one = torch.randn(1, 4, device=device, requires_grad=True)
    loss = palfast.spectral_contrastive(one, palfast.PairGraph.from_views(1, 1).to(device))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(one.grad) == 0


@pytest.mark.slow
def test_compile_fullgraph(device):
    torch.manual_seed(13)
    g = palfast.PairGraph.from_labels(torch.randint(-1, 4, (32,))).to(device)
    z = torch.randn(32, 8, device=device, requires_grad=True)

    def step(x):
        return palfast.spectral_contrastive(x * 2.0, g) + palfast.nn.SpectralContrastiveLoss()(x[:16], x[16:])

    assert_compile_matches_eager(step, z)


# Bad z, graph and hyper-parameters of every loss: tests/losses/test_bad_input.py.
