"""palfast.vic2 (PAL's VIC²): the float64 reference, unbiasedness of the
orthogonality estimator (a statistical test that can fail), and the contract."""

from __future__ import annotations

import math

import pytest
import torch

import palfast
from palfast import reference

from _helpers import (
    KINDS,
    assert_compile_matches_eager,
    assert_gradcheck_every_kind,
    assert_matches_float64,
    assert_within_2x_reference_error,
)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,d", [(4, 3), (42, 127), (256, 3)])
def test_matches_reference_float64(device, graph_factory, kind, n, d):
    torch.manual_seed(n * 1000 + d)
    z = torch.randn(n, d, dtype=torch.float64, device=device) / d**0.5
    g = graph_factory(kind, n, seed=n + d).to(device)
    n_views = 2 if kind in ("views", "semi") else 1
    kw = dict(beta=0.7, n_views=n_views)
    assert_matches_float64(palfast.vic2, reference.vic2, z, g, **kw)


@pytest.mark.parametrize("n_rows,n_views", [(41, 1), (45, 3), (6, 2)])
def test_odd_and_multi_view_splits(device, n_rows, n_views):
    torch.manual_seed(1)
    z = torch.randn(n_rows, 7, dtype=torch.float64, device=device)
    g = palfast.PairGraph.from_views(n_rows // n_views, n_views).to(device)
    assert_matches_float64(palfast.vic2, reference.vic2, z, g, n_views=n_views)


def test_unbiased_orthogonality_estimate():
    """Mean over many batches of the estimate ≈ ‖E[zzᵀ] − I‖²; the plug-in ‖zᵀz/N − I‖²
    and a split that separates the views of an image are both detectably biased."""
    gen = torch.Generator().manual_seed(0)
    d, n, trials = 4, 8, 4000
    mu = torch.tensor([0.5, -0.3, 0.0, 0.2], dtype=torch.float64)
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64) * 0.5
    sigma = 0.4  # view noise: z = x + noise, x ~ N(mu, mix mixᵀ)
    second_moment = torch.outer(mu, mu) + mix @ mix.T + sigma**2 * torch.eye(d, dtype=torch.float64)
    population = (second_moment - torch.eye(d, dtype=torch.float64)).square().sum().item()

    x = mu + torch.randn(trials, n, d, generator=gen, dtype=torch.float64) @ mix.T
    views = x.unsqueeze(1) + sigma * torch.randn(trials, 2, n, d, generator=gen, dtype=torch.float64)
    z = views.reshape(trials, 2 * n, d)  # cat(view_0, view_1) per batch
    g = palfast.PairGraph.from_views(n, 2)
    eye = torch.eye(d, dtype=torch.float64)
    ours = torch.stack([palfast.vic2(b, g, beta=0.0, n_views=2) for b in z])
    split_views = torch.stack([palfast.vic2(b, g, beta=0.0, n_views=1) for b in z])
    plug_in = ((z.transpose(1, 2) @ z) / (2 * n) - eye).square().sum((1, 2))

    def z_score(samples):
        return (samples.mean().item() - population) / (samples.std().item() / math.sqrt(trials))

    assert abs(z_score(ours)) < 4.0, (ours.mean().item(), population)
    assert abs(z_score(plug_in)) > 8.0  # the test has the power to see a bias this size
    assert abs(z_score(split_views)) > 8.0


def test_gradcheck(device, graph_factory):
    torch.manual_seed(5)
    for n, d in [(10, 5), (6, 9)]:
        z = torch.randn(n, d, dtype=torch.float64, device=device, requires_grad=True)
        assert_gradcheck_every_kind(lambda x, g: palfast.vic2(x, g, n_views=2), z, graph_factory)


def test_two_view_module(device):
    torch.manual_seed(7)
    z_a, z_b = torch.randn(10, 6, device=device), torch.randn(10, 6, device=device)
    got = palfast.nn.VIC2Loss(beta=2.0)(z_a, z_b)
    want = palfast.vic2(torch.cat([z_a, z_b]), palfast.PairGraph.from_views(10, 2).to(device),
                        beta=2.0, n_views=2)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_2x_reference_error(device, graph_factory, dtype):
    torch.manual_seed(3)
    n, d = 96, 32
    z64 = torch.randn(n, d, dtype=torch.float64, device=device) * 0.3
    g = graph_factory("semi", n, seed=4).to(device)
    assert_within_2x_reference_error(palfast.vic2, reference.vic2, z64, g, dtype, n_views=2)


def test_empty_graph_has_no_invariance_term(device):
    z = torch.randn(10, 4, dtype=torch.float64, device=device)
    g = palfast.PairGraph.from_edges([], [], num_nodes=10).to(device)
    torch.testing.assert_close(palfast.vic2(z, g, beta=5.0), palfast.vic2(z, g, beta=0.0))
    torch.testing.assert_close(palfast.vic2(z, g), reference.vic2(z, g))


def test_compile_fullgraph(device):
    torch.manual_seed(13)
    g = palfast.PairGraph.from_views(16, 2).to(device)
    z = torch.randn(32, 8, device=device, requires_grad=True)
    assert_compile_matches_eager(lambda x: palfast.vic2(x * 2.0, g, n_views=2), z)


def test_bad_input():
    g = palfast.PairGraph.from_views(3, 2)
    with pytest.raises(ValueError, match="palfast.vic2: z must have a multiple of n_views = 4"):
        palfast.vic2(torch.randn(6, 2), g, n_views=4)
    with pytest.raises(ValueError, match="n_views must satisfy 1 <= n_views, got 0"):
        palfast.vic2(torch.randn(6, 2), g, n_views=0)
    with pytest.raises(ValueError, match="z must hold at least 2 images per view block"):
        palfast.vic2(torch.randn(6, 2), g, n_views=6)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        palfast.vic2(torch.randn(6, 2), g, beta=-1.0)
    with pytest.raises(ValueError, match="z must be finite"):
        palfast.vic2(torch.full((6, 2), float("nan")), g, check_finite=True)
    with pytest.raises(ValueError, match=r"graph must have one node per row of z \(4\)"):
        palfast.vic2(torch.randn(4, 2), g)
