"""palfast.vicreg and VICRegLoss against the float64 reference, the official
two-view VICReg, and their contract (docs/api.md)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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

# (N, D): N < D takes the Gram side, N > D the covariance side.
SIZES = [(2, 3), (41, 127), (257, 3), (257, 40)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,d", SIZES)
def test_matches_reference_float64(seeded_inputs, kind, n, d):
    z, g = seeded_inputs(kind, n, d)
    kw = dict(sim_coeff=3.0, std_coeff=2.0, cov_coeff=0.7, eps=1e-3)
    assert_matches_float64(palfast.vicreg, reference.vicreg, z, g, **kw)


def test_asymmetric_edges_with_duplicates(device):
    torch.manual_seed(1)
    n = 30
    src, dst = torch.randint(0, n, (90,)), torch.randint(0, n, (90,))
    src[:5], dst[:5] = 3, 7  # duplicates, summed
    g = palfast.PairGraph.from_edges(src, dst, torch.rand(90) * 3, num_nodes=n, symmetric=False)
    assert not g.symmetric
    z = torch.randn(n, 50, dtype=torch.float64, device=device)
    assert_matches_float64(palfast.vicreg, reference.vicreg, z, g.to(device))


@pytest.mark.parametrize("n,d", [(9, 5), (5, 9)])
@pytest.mark.slow
def test_gradcheck(device, graph_factory, n, d):
    torch.manual_seed(5)
    z = torch.randn(n, d, dtype=torch.float64, device=device, requires_grad=True)
    # eps large enough that no std sits at the hinge's kink
    assert_gradcheck_every_kind(lambda x, g: palfast.vicreg(x, g, eps=0.5), z, graph_factory)


# ------------------------------------------------------------------ two views
@pytest.mark.parametrize("n,d", [(2, 3), (16, 64), (100, 10)])
def test_two_view_is_official_vicreg(device, n, d):
    torch.manual_seed(8)
    z_a = torch.randn(n, d, dtype=torch.float64, device=device) * 0.7
    z_b = z_a + 0.3 * torch.randn(n, d, dtype=torch.float64, device=device)
    assert_two_views_match(palfast.nn.VICRegLoss(), reference.vicreg_two_view_official, z_a, z_b, rtol=1e-10, atol=0)


def test_two_view_float32_matches_official(device):
    torch.manual_seed(9)
    z_a, z_b = torch.randn(64, 256, device=device), torch.randn(64, 256, device=device)
    official = reference.vicreg_two_view_official(z_a, z_b, sim_coeff=10.0)
    torch.testing.assert_close(palfast.nn.VICRegLoss(sim_coeff=10.0)(z_a, z_b), official, rtol=1e-5, atol=1e-6)


def test_graph_form_shares_the_invariance_term_with_two_views(device):
    """With from_views(n, 2) the invariance term equals mse(z_a, z_b)."""
    torch.manual_seed(10)
    z_a, z_b = torch.randn(12, 8, dtype=torch.float64), torch.randn(12, 8, dtype=torch.float64)
    g = palfast.PairGraph.from_views(12, 2)
    inv = palfast.vicreg(torch.cat([z_a, z_b]), g, std_coeff=0, cov_coeff=0, sim_coeff=1.0)
    torch.testing.assert_close(inv, F.mse_loss(z_a, z_b))


def test_module_graph_call_equals_functional(device, graph_factory):
    z = torch.randn(20, 6, device=device)
    g = graph_factory("labels", 20).to(device)
    m = palfast.nn.VICRegLoss(sim_coeff=2.0, std_coeff=3.0, cov_coeff=4.0)
    assert torch.equal(m(z, g), palfast.vicreg(z, g, sim_coeff=2.0, std_coeff=3.0, cov_coeff=4.0))


# ----------------------------------------------------------------- edge cases
def test_empty_graph_has_no_invariance_term(device):
    torch.manual_seed(11)
    z = torch.randn(10, 4, dtype=torch.float64, device=device, requires_grad=True)
    for g in (palfast.PairGraph.from_edges([], [], num_nodes=10), palfast.PairGraph.from_labels(torch.full((10,), -1))):
        got = palfast.vicreg(z, g.to(device))
        want = palfast.vicreg(z, g.to(device), sim_coeff=0.0)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got, reference.vicreg(z, g.to(device)))


def test_one_row_is_an_error(device):
    with pytest.raises(ValueError, match=r"palfast.vicreg: z must have at least 2 rows"):
        palfast.vicreg(torch.randn(1, 5, device=device), palfast.PairGraph.from_views(1, 1))
    with pytest.raises(ValueError, match="z_a must have at least 2 rows"):
        palfast.nn.VICRegLoss()(torch.randn(1, 5), torch.randn(1, 5))


@pytest.mark.slow
def test_compile_fullgraph(device):
    torch.manual_seed(13)
    g = palfast.PairGraph.from_views(16, 2).to(device)
    z = torch.randn(32, 48, device=device, requires_grad=True)

    def step(x):
        return palfast.vicreg(x * 2.0, g) + palfast.nn.VICRegLoss()(x[:16], x[16:])

    assert_compile_matches_eager(step, z)


# ------------------------------------------------------------------ bad input
# Bad z, graph and hyper-parameters of every loss: tests/losses/test_bad_input.py.
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_on_wrong_device():
    with pytest.raises(ValueError, match="graph must be on z's device"):
        palfast.vicreg(torch.randn(4, 3, device="cuda"), palfast.PairGraph.from_views(2, 2))
