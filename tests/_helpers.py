"""Helpers shared by the loss tests (tests/test_<op>.py).

Test modules cannot import each other under ``--import-mode=importlib``;
tests/conftest.py puts this folder on sys.path so they can ``from _helpers import ...``.
"""

from __future__ import annotations

import pytest
import torch

import palfast
from palfast.benchmarks.harness import deterministic_algorithms  # noqa: F401 (for the tests)

# gradcheck's nondet_tol for ops whose CUDA backward adds with float atomics in a
# varying order (docs/cuda.md, "Determinism"): two float64 passes on the same input
# then differ by rounding, orders of magnitude below gradcheck's own tolerances.
ATOMIC_NONDET_TOL = 1e-12

# Every graph kind tests/conftest.py's graph_factory builds.
KINDS = ["views", "labels", "edges", "dense", "semi"]


def views_graph(n: int):
    """n rows as n/v samples of v views, v the smallest factor ≥ 2 of n (2 for even n,
    3 for 63, n for a prime): every row has positives whenever n ≥ 2. (One view per
    sample gives none, hence a zero loss and gradient that no kernel bug could change.)"""
    views = next((v for v in range(2, n + 1) if n % v == 0), 1)
    return palfast.PairGraph.from_views(n // views, views)


def values_and_grads(fn_a, fn_b, z, *args, **kw):
    """Values and gradients of two implementations on the same input."""
    out = []
    for fn in (fn_a, fn_b):
        x = z.detach().clone().requires_grad_(True)
        loss = fn(x, *args, **kw)
        loss.backward()
        out.append((loss.detach(), x.grad))
    return out


def assert_matches_float64(fn_a, fn_b, z, *args, **kw):
    """fn_a and fn_b agree on a float64 z in value and gradient, to rounding."""
    (got, g_got), (want, g_want) = values_and_grads(fn_a, fn_b, z, *args, **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)


def assert_rows_match_float64(fn_a, fn_b, z, *args, **kw):
    """Per-row losses fn_a and fn_b ([N], e.g. ``reduction="none"``) agree on a float64 z
    to rounding, and so do the gradients of a random weighting of the rows."""
    z1, z2 = z.detach().clone().requires_grad_(), z.detach().clone().requires_grad_()
    got, want = fn_a(z1, *args, **kw), fn_b(z2, *args, **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    w = torch.randn(z.shape[0], dtype=torch.float64, device=z.device)
    (got * w).sum().backward()
    (want * w).sum().backward()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-9, atol=1e-10)


def assert_two_views_match(fn_a, fn_b, z_a, z_b, *, rtol, atol):
    """Two-view losses fn_a(z_a, z_b), fn_b(z_a, z_b) agree in value (rtol, atol)
    and in both gradients (rtol 1e-9, atol 1e-13)."""
    ours = [t.clone().requires_grad_() for t in (z_a, z_b)]
    theirs = [t.clone().requires_grad_() for t in (z_a, z_b)]
    got = fn_a(*ours)
    want = fn_b(*theirs)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-13)


def assert_within_2x_reference_error(kernel, ref, z64, graph, dtype, *,
                                     ref_forward_may_overflow=False, **kw):
    """The low-precision rule every loss is held to (tests/test_loss_contract.py): run
    kernel and ref in `dtype`; the kernel's largest forward and gradient errors, both
    against ref in float64, are at most twice the reference's own (+1e-6). Outputs may
    be scalars or per-row (summed for backward).
    ``ref_forward_may_overflow``: the naive reference's forward may reach inf in
    `dtype` (which leaves the kernel's forward unjudged), though never NaN."""
    x = z64.detach().clone().requires_grad_()
    exact = ref(x, graph, **kw)
    exact.sum().backward()

    def errors(fn):
        z = z64.detach().to(dtype).requires_grad_()
        out = fn(z, graph, **kw)
        out.float().sum().backward()
        return ((out.double() - exact).abs().max().item(),
                (z.grad.double() - x.grad).abs().max().item())

    kernel_fwd, kernel_bwd = errors(kernel)
    ref_fwd, ref_bwd = errors(ref)
    # the reference ran in `dtype` and gave a usable yardstick
    assert ref_bwd < float("inf")
    assert ref_fwd == ref_fwd if ref_forward_may_overflow else ref_fwd < float("inf")
    assert kernel_fwd <= 2 * ref_fwd + 1e-6, (kernel_fwd, ref_fwd)
    assert kernel_bwd <= 2 * ref_bwd + 1e-6, (kernel_bwd, ref_bwd)


def assert_gradcheck_every_kind(fn, z, graph_factory, nondet_tol=0.0):
    """torch.autograd.gradcheck of fn(z, g) for a graph of every kind over z's rows
    (nondet_tol: how far two backward passes on the same input may differ, for
    kernels that add with atomics)."""
    for kind in KINDS:
        g = graph_factory(kind, z.shape[0], seed=1).to(z.device)
        assert torch.autograd.gradcheck(lambda x, g=g: fn(x, g), (z,), nondet_tol=nondet_tol)


def assert_constant_with_zero_gradient(fn, z, graphs, value):
    """fn(z, g) == value, with an all-zero gradient, for each graph (moved to z's device)."""
    for g in graphs:
        loss = fn(z, g.to(z.device))
        loss.backward()
        assert loss.item() == value
        assert torch.count_nonzero(z.grad) == 0
        z.grad = None


def assert_compile_matches_eager(step, z):
    """torch.compile(fullgraph=True) of step gives eager's loss and gradient on z (a leaf)."""
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(z)
    loss.backward()
    z2 = z.detach().clone().requires_grad_()
    want = step(z2)
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(z.grad, z2.grad)


def assert_float32_close_to_float64(kernel, ref, z, graph):
    """kernel on a float32 z stays float32 and is close to ref on z in float64."""
    (_, _), (want, g_want) = values_and_grads(kernel, ref, z.double(), graph)
    z32 = z.clone().requires_grad_()
    loss32 = kernel(z32, graph)
    loss32.backward()
    assert loss32.dtype == torch.float32
    torch.testing.assert_close(loss32.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z32.grad.double(), g_want, rtol=1e-4, atol=1e-6)


def assert_nan_propagates_unless_checked(fn, z, graph):
    """A non-finite z gives a NaN loss, or ValueError with check_finite=True."""
    assert torch.isnan(fn(z, graph))
    with pytest.raises(ValueError, match="z must be finite"):
        fn(z, graph, check_finite=True)


