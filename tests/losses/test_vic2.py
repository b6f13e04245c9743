"""palfast.vic2 (PAL's VIC²): the float64 reference, unbiasedness of the
orthogonality estimator (a statistical test that can fail), and the contract."""

from __future__ import annotations

import math

import pytest
import torch

import palfast
from palfast import reference
from palfast.testing import (
    KINDS,
    assert_compile_matches_eager,
    assert_gradcheck_every_kind,
    assert_matches_float64,
    assert_within_rounding_error,
)

# float tolerances: CI runs these again under a second CPU capability (.ci/run)
pytestmark = pytest.mark.numeric


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,d", [(4, 3), (42, 127), (256, 3)])
def test_matches_reference_float64(seeded_inputs, kind, n, d):
    z, g = seeded_inputs(kind, n, d)
    z = z / d**0.5
    n_views = 2 if kind in ("views", "semi") else 1
    kw = dict(beta=0.7, n_views=n_views)
    assert_matches_float64(palfast.vic2, reference.vic2, z, g, **kw)


@pytest.mark.parametrize("n_rows,n_views", [(41, 1), (45, 3), (6, 2)])
def test_odd_and_multi_view_splits(device, n_rows, n_views):
    torch.manual_seed(1)
    z = torch.randn(n_rows, 7, dtype=torch.float64, device=device)
    g = palfast.PairGraph.from_views(n_rows // n_views, n_views).to(device)
    assert_matches_float64(palfast.vic2, reference.vic2, z, g, n_views=n_views)


@pytest.mark.slow
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
    want = palfast.vic2(torch.cat([z_a, z_b]), palfast.PairGraph.from_views(10, 2).to(device), beta=2.0, n_views=2)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_rounding_error(device, graph_factory, dtype):
    torch.manual_seed(3)
    n, d = 96, 32
    z64 = torch.randn(n, d, dtype=torch.float64, device=device) * 0.3
    g = graph_factory("semi", n, seed=4).to(device)
    assert_within_rounding_error(palfast.vic2, reference.vic2, z64, g, dtype, n_views=2)


def test_empty_graph_has_no_invariance_term(device):
    z = torch.randn(10, 4, dtype=torch.float64, device=device)
    g = palfast.PairGraph.from_edges([], [], num_nodes=10).to(device)
    torch.testing.assert_close(palfast.vic2(z, g, beta=5.0), palfast.vic2(z, g, beta=0.0))
    torch.testing.assert_close(palfast.vic2(z, g), reference.vic2(z, g))


@pytest.mark.slow
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


# ---------------------------------------------------------------- fixed pool (pool_size)
def pool_objective(z, n_views):
    """‖(1/P) Σ_i X_i − I‖², X_i = mean over image i's views of z zᵀ: the pool's VIC²
    orthogonality term, from the definition (z holds every image of the pool)."""
    v, d = n_views, z.shape[1]
    blocks = z.reshape(v, -1, d)
    x = torch.einsum("vnd,vne->nde", blocks, blocks) / v  # X_i
    return (x.mean(0) - torch.eye(d, dtype=z.dtype)).square().sum()


def pool_estimate_by_pairs(z, n_views, pool):
    """The pool estimator written pair by pair (docstring of palfast.vic2)."""
    v, d = n_views, z.shape[1]
    blocks = z.reshape(v, -1, d)
    n = blocks.shape[1]
    x = torch.einsum("vnd,vne->nde", blocks, blocks) / v
    cross = sum((x[i] * x[j]).sum() for i in range(n) for j in range(n) if i != j)
    own = sum(x[i].square().sum() for i in range(n))
    trace = sum(torch.trace(x[i]) for i in range(n))
    return (pool - 1) / (pool * n * (n - 1)) * cross + own / (pool * n) - 2 * trace / n + d


def exploding_pool(t, n=8, d=4, n_views=2, seed=0):
    """A pool whose image 0 is t·e_0 in every view and whose other images never use
    coordinate 0: the shape of the failure seen in an active-learning run."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_views, n, d, generator=g, dtype=torch.float64) * 0.5
    z[:, :, 0] = 0.0
    z[:, 0] = 0.0
    z[:, 0, 0] = t
    return z.reshape(n_views * n, d)


def test_fixed_pool_old_estimator_is_unbounded_below_pool_estimator_is_not():
    g = palfast.PairGraph.from_views(8, 2)
    old = [palfast.vic2(exploding_pool(t), g, beta=0.0, n_views=2).item() for t in (1, 10, 100)]
    new = [palfast.vic2(exploding_pool(t), g, beta=0.0, n_views=2, pool_size=8).item() for t in (1, 10, 100)]
    assert old[0] > old[1] > old[2] and old[2] < -1e3  # the halves: −∞ as the sample grows
    assert min(new) >= 0.0 and new[2] > new[1]  # whole pool: the plug-in, ≥ 0
    for t, value in zip((1, 10, 100), new):
        torch.testing.assert_close(torch.tensor(value, dtype=torch.float64), pool_objective(exploding_pool(t), 2))


@pytest.mark.slow
def test_training_on_a_fixed_pool_runs_away_without_pool_size():
    """Adam on the pool's embeddings, batch = whole pool: the halves estimator is driven
    far below 0 (the failure), the pool estimator stays ≥ 0 and reaches ≈ 0."""

    def train(**kw):
        torch.manual_seed(0)
        z = torch.nn.Parameter(torch.randn(2 * 16, 4, dtype=torch.float64) * 0.3)
        g = palfast.PairGraph.from_views(16, 2)
        opt = torch.optim.Adam([z], lr=0.05)
        for _ in range(300):
            loss = palfast.vic2(z, g, n_views=2, **kw)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return palfast.vic2(z.detach(), g, n_views=2, **kw).item()

    assert train() < -10.0
    assert 0.0 <= train(pool_size=16) < 0.5


def test_pool_estimator_is_unbiased_over_batches_without_replacement():
    """Exact: the mean over every batch of 4 images from a pool of 7 is the pool's term."""
    import itertools

    torch.manual_seed(2)
    pool, n, v, d = 7, 4, 2, 3
    z = torch.randn(v, pool, d, dtype=torch.float64)
    target = pool_objective(z.reshape(-1, d), v)
    g = palfast.PairGraph.from_views(n, v)
    values = [
        palfast.vic2(z[:, list(batch)].reshape(-1, d), g, beta=0.0, n_views=v, pool_size=pool)
        for batch in itertools.combinations(range(pool), n)
    ]
    torch.testing.assert_close(torch.stack(values).mean(), target)
    assert min(v.item() for v in values) >= -d * (pool - 1)  # the documented floor


@pytest.mark.parametrize("n,v,d,pool", [(2, 1, 3, 2), (5, 2, 4, 9), (41, 3, 7, 100)])
def test_pool_estimator_matches_pairwise_formula_and_gradcheck(n, v, d, pool):
    torch.manual_seed(n + d)
    z = torch.randn(v * n, d, dtype=torch.float64, requires_grad=True)
    g = palfast.PairGraph.from_views(n, v) if v > 1 else palfast.PairGraph.from_labels(torch.arange(n) % 2)
    got = palfast.vic2(z, g, beta=0.0, n_views=v, pool_size=pool)
    want = pool_estimate_by_pairs(z, v, pool)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, z)[0], torch.autograd.grad(want, z)[0])
    if n <= 5:
        assert torch.autograd.gradcheck(lambda x: palfast.vic2(x, g, beta=0.5, n_views=v, pool_size=pool), (z,))


def test_pool_size_bad_input():
    g = palfast.PairGraph.from_views(3, 2)
    with pytest.raises(ValueError, match=r"palfast.vic2: pool_size must satisfy 3 <= pool_size"):
        palfast.vic2(torch.randn(6, 2), g, n_views=2, pool_size=2)
    with pytest.raises(TypeError, match="palfast.vic2: pool_size must be an int"):
        palfast.vic2(torch.randn(6, 2), g, n_views=2, pool_size=3.0)
