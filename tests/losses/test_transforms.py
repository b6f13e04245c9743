"""The losses under PyTorch's function transforms: torch.compile with dynamic shapes
and torch.func.grad (docs/api.md, "Compilation and function transforms")."""

from __future__ import annotations

import pytest
import torch

import palfast
from palfast import PairGraph, reference

LOSSES = {
    "info_nce": (palfast.info_nce, reference.info_nce, dict(temperature=0.5)),
    "vicreg": (palfast.vicreg, reference.vicreg, {}),
    "barlow_twins": (palfast.barlow_twins, reference.barlow_twins, {}),
    "spectral_contrastive": (palfast.spectral_contrastive, reference.spectral_contrastive, {}),
    "vic2": (palfast.vic2, reference.vic2, dict(n_views=2)),
}


def _graph(n):
    """n/2 samples of two views plus one extra directed edge (both CSR sides exist)."""
    return PairGraph.from_views(n // 2, 2) + PairGraph.from_edges([0], [3], num_nodes=n, symmetric=False)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.slow
def test_compile_with_dynamic_shapes_matches_eager(loss):
    fn, _, kw = LOSSES[loss]
    torch._dynamo.reset()
    step = torch.compile(lambda z, g: fn(z, g, **kw), fullgraph=True, dynamic=True, backend="aot_eager")
    for n, d in ((8, 5), (12, 7)):  # the second size reuses the dynamic graph
        z = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
        g = _graph(n)
        got = step(z, g)
        got.backward()
        z2 = z.detach().clone().requires_grad_()
        want = fn(z2, g, **kw)
        want.backward()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(z.grad, z2.grad)


@pytest.mark.parametrize("bad", [float("inf"), -0.5, float("nan")])
@pytest.mark.slow
def test_compile_with_dynamic_shapes_still_checks_numbers(bad):
    """Under dynamic=True numbers are traced as symbols; the range check becomes a guard,
    so a bad value is traced afresh and raises (dynamo wraps the ValueError of a
    fullgraph trace in its own exception, whose message carries ours). NaN cannot be
    compared symbolically: dynamo raises while tracing check_number (docs/api.md)."""
    torch._dynamo.reset()
    step = torch.compile(
        lambda z, g, t: palfast.info_nce(z, g, temperature=t), fullgraph=True, dynamic=True, backend="aot_eager"
    )
    z, g = torch.randn(8, 5), _graph(8)
    torch.testing.assert_close(step(z, g, 0.5), palfast.info_nce(z, g, temperature=0.5))
    match = "Invalid NaN comparison" if bad != bad else "palfast.info_nce: temperature must be a finite number > 0"
    with pytest.raises(Exception, match=match):
        step(z, g, bad)


@pytest.mark.parametrize("loss", LOSSES)
def test_func_grad_matches_the_float64_reference(loss):
    fn, ref, kw = LOSSES[loss]
    torch.manual_seed(0)
    g = _graph(10).with_negatives(PairGraph.from_edges([1], [2], num_nodes=10))
    z = torch.randn(10, 6, dtype=torch.float64)
    grad, value = torch.func.grad_and_value(lambda x: fn(x, g, **kw))(z)
    x = z.clone().requires_grad_()
    want = ref(x, g, **kw)
    (want_grad,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(value, want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-12)
    # vjp, the other reverse-mode transform, gives the same
    _, vjp = torch.func.vjp(lambda x: fn(x, g, **kw), z)
    torch.testing.assert_close(vjp(torch.ones((), dtype=torch.float64))[0], grad)


@pytest.mark.parametrize("loss", LOSSES)
def test_nested_func_grad_is_refused_not_wrong(loss):
    """A gradient of a gradient would drop the backward ops' own derivative."""
    fn, _, kw = LOSSES[loss]
    g = _graph(10).with_negatives(PairGraph.from_edges([1], [2], num_nodes=10))
    z = torch.randn(10, 6, dtype=torch.float64)
    inner = torch.func.grad(lambda x: fn(x, g, **kw))
    with pytest.raises(RuntimeError, match=r"does not support double backward"):
        torch.func.grad(lambda x: inner(x).square().sum())(z)
    # an input that also requires grad outside the transform: its gradient could be
    # differentiated again by plain autograd
    with pytest.raises(RuntimeError, match=r"does not support double backward"):
        inner(z.clone().requires_grad_())


def test_info_nce_with_unknown_weight_refuses_torch_func_clearly():
    g = _graph(10).with_negatives(PairGraph.from_edges([1], [2], num_nodes=10))
    z = torch.randn(10, 6, dtype=torch.float64)
    with pytest.raises(
        ValueError,
        match=r"palfast.info_nce: unknown_weight < 1 cannot run under "
        r"torch.func transforms",
    ):
        torch.func.grad(lambda x: palfast.info_nce(x, g, unknown_weight=0.3))(z)
    # the same loss and its gradient through torch.autograd
    x = z.clone().requires_grad_()
    (grad,) = torch.autograd.grad(palfast.info_nce(x, g, unknown_weight=0.3), x)
    assert torch.isfinite(grad).all()
