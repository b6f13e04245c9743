"""Checks of a loss against its float64 reference, as palfast's own tests use them.

The rule every float result is held to (docs/api.md, "Numerics"): a result computed
from inputs rounded to ``dtype`` is within ``ROUNDING_MULTIPLE · eps(dtype) · cond`` of
the float64 result on the same rounded inputs, relative to the larger of that
result's size and a ``floor`` where it cancels (:func:`assert_rounding_close`,
:func:`assert_within_rounding_error`). Also: gradchecks over every graph kind,
``torch.compile`` against eager, NaN propagation. A loss of your own written on
:class:`palfast.PairGraph` can be checked with the same functions.

Example::

    >>> import torch, palfast
    >>> from palfast import reference
    >>> from palfast.testing import assert_within_rounding_error, info_nce_cond
    >>> z = torch.randn(12, 8, dtype=torch.float64)
    >>> g = palfast.PairGraph.from_views(6, 2)
    >>> assert_within_rounding_error(palfast.info_nce, reference.info_nce, z, g, torch.float32,
    ...                              cond=info_nce_cond(z, 0.5), temperature=0.5)
"""

from __future__ import annotations

import torch

import palfast
from palfast.benchmarks.harness import allow_tf32, deterministic_algorithms, info_nce_backward_kernel

__all__ = [
    "ATOMIC_NONDET_TOL",
    "INFO_NCE_KERNEL_PATHS",
    "INFO_NCE_ROWS_FLOOR",
    "KINDS",
    "LOSSES",
    "ROUNDING_MULTIPLE",
    "TF32_EPS",
    "allow_tf32",
    "assert_compile_matches_eager",
    "assert_constant_with_zero_gradient",
    "assert_float32_close_to_float64",
    "assert_gradcheck_every_kind",
    "assert_matches_float64",
    "assert_nan_propagates_unless_checked",
    "assert_rounding_close",
    "assert_rows_match_float64",
    "assert_two_views_match",
    "assert_within_rounding_error",
    "deterministic_algorithms",
    "info_nce_backward_kernel",
    "info_nce_cond",
    "info_nce_grad_floor",
    "values_and_grads",
    "views_graph",
]

# gradcheck's nondet_tol for ops whose CUDA backward adds with float atomics in a
# varying order (docs/cuda.md, "Determinism"): two float64 passes on the same input
# then differ by rounding, orders of magnitude below gradcheck's own tolerances.
ATOMIC_NONDET_TOL = 1e-12

# Every kernel path of info_nce on CUDA (csrc/cuda/info_nce/info_nce.cuh, docs/cuda.md
# "info_nce kernels"), by name: (normalize, τ, torch's deterministic mode,
# PALFAST_INFO_NCE_BACKWARD or None for unset; set with info_nce_backward_kernel).
#   row: the fixed-shift forward and the default backward: fa2_row_grad_kernel for
#     16-bit z with D ≤ 128, the symmetric sym_grad_kernel otherwise;
#   symmetric: the same forward, the symmetric backward asked for (fa2_sym_* for
#     16-bit z with D ≤ 128, sym_* otherwise);
#   tile: the same forward, the row-block backward (grad_tile_kernel) asked for;
#   deterministic: the same forward, the deterministic default backward
#     (fa2_row_grad_kernel for 16-bit z with D ≤ 128, grad_tile_kernel otherwise);
#   small-tau: τ = 0.02, below use_fixed_shift's bound of about 0.026: the online
#     lse_kernel and the row-block backward;
#   unnormalized: normalize=False, the online path too.
# float32 z takes the same kernels with S on tf32 tensor cores from sm_80: 3×TF32, or
# plain TF32 where TF32 matmuls are allowed (allow_tf32 below; docs/cuda.md; TF32_EPS).
# The CUDA tests (tests/losses/test_info_nce_cuda.py) and the sanitizers' workload of
# tools/gpu_session.sh (tools/gpu_bench.py) run each.
INFO_NCE_KERNEL_PATHS = {
    "row": (True, 0.1, False, None),
    "symmetric": (True, 0.1, False, "sym"),
    "tile": (True, 0.1, False, "tile"),
    "deterministic": (True, 0.1, True, None),
    "small-tau": (True, 0.02, False, None),
    "unnormalized": (False, 0.1, False, None),
}

# Every graph kind tests/conftest.py's graph_factory builds.
KINDS = ["views", "labels", "edges", "dense", "semi"]

# Every graph loss of palfast.functional, by name.
LOSSES = {
    "info_nce": palfast.info_nce,
    "vicreg": palfast.vicreg,
    "barlow_twins": palfast.barlow_twins,
    "spectral_contrastive": palfast.spectral_contrastive,
    "vic2": palfast.vic2,
}


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


# The rounding rule every low-precision check uses (tests/losses/test_loss_contract.py, the
# emulated CUDA ops, the CUDA tests): the yardstick is the float64 reference on the
# inputs rounded to the tested dtype, which only float64 arithmetic touches, so it is
# the same on every CPU (a float32/16 reference run is not: its BLAS and vector paths
# round differently on AVX-512 and AVX2 machines). A kernel fed those inputs then
# differs from it by its own rounding alone:
#     |got - exact| <= ROUNDING_MULTIPLE * eps(dtype) * cond * max(|exact|.max(), floor)
# with dtype z's (16-bit kernels accumulate in float32 but may round intermediates,
# such as the normalised rows fed to tensor cores, to z's dtype) and cond the op's
# condition: how many eps of the result's largest value one relative rounding of an
# intermediate can move it. For info_nce that is 1 + max|s_ij| (s = logits: every exp(s) inherits |s|·eps); for sums of
# exact products (covariance losses, graph_spmm, the Dirichlet energy) 1, with the
# terms' size as `floor` where the sum cancels. ROUNDING_MULTIPLE = 8 covers the
# few roundings each output goes through (the logit, its exponential, the row sum,
# the normalisation's backward, the output's own rounding, each at most eps/2 times
# the condition) and float32's D-long dot products. The largest error seen is
# 1.03 · eps · cond · scale (the float32 gradient of test_info_nce_fixed_shift_bound
# in tests/cuda_emu/test_ops.py at τ = half the fixed-shift bound); the others stay
# below 0.6.
ROUNDING_MULTIPLE = 8.0

# float32 info_nce on CUDA with TF32 matmuls allowed (allow_tf32(True)) computes
# the logits S = U Uᵀ on tensor cores from operands rounded to tf32 (10 explicit
# mantissa bits, so eps = 2^-10 and unit roundoff 2^-11), the rest in float32. Rounding
# u_i and u_k to tf32 moves s_ik = <u_i, u_k>/τ by at most (2 · 2^-11 + 2^-22) ·
# ‖u_i‖‖u_k‖/τ ≤ TF32_EPS · max(‖u_i‖², ‖u_k‖²)/τ (plus 2^-22), i.e. one relative
# rounding at tf32's eps of an intermediate no larger than cond (info_nce_cond's max|s|
# includes the diagonal ‖u_i‖²/τ): the kind of error the rule above counts in
# eps(dtype) · cond. So the same rule, multiple and cond hold with eps = TF32_EPS in
# place of float32's (assert_rounding_close's eps=), the float32 roundings being 2^13
# times smaller. The backward rounds M and u to tf32 as well for dneg = M u: one
# relative rounding of each term M_ik u_k, which moves dneg_i by at most
# TF32_EPS · Σ_k |M_ik| |u_k|, the size of the gradient's own terms (the rule's scale
# and floor), so the same eps covers it. Without the flag the kernels split each
# operand into two tf32 parts (3×TF32), whose dropped terms are ~2^-22 relative:
# float32's rule applies.
TF32_EPS = 2.0**-10


def assert_rounding_close(got, exact, dtype, *, cond=1.0, floor=0.0, what="result", eps=None):
    """got, computed from inputs in `dtype`, is within ROUNDING_MULTIPLE * eps(dtype) *
    cond of exact (float64 on the same rounded inputs), relative to the larger of
    exact's largest magnitude and `floor` (the size of the terms where exact cancels
    to about 0). `eps` replaces eps(dtype) where the kernel rounds its intermediates
    coarser than dtype (TF32_EPS)."""
    exact = exact.detach().double()
    err = (got.detach().double() - exact).abs().max().item() if exact.numel() else 0.0
    scale = max(exact.abs().max().item() if exact.numel() else 0.0, floor)
    eps_name = f"eps({dtype})" if eps is None else f"eps {eps:.3g}"
    eps = torch.finfo(dtype).eps if eps is None else eps
    bound = ROUNDING_MULTIPLE * eps * cond * scale
    assert err <= bound, (
        f"{what}: error {err:.3g} > bound {bound:.3g} = {ROUNDING_MULTIPLE:g} * "
        f"{eps_name} * cond {cond:.3g} * scale {scale:.3g}"
    )


def assert_within_rounding_error(
    kernel, ref, z64, graph, dtype, *, cond=1.0, floor=0.0, grad_floor=0.0, eps=None, **kw
):
    """The low-precision rule every loss is held to (tests/losses/test_loss_contract.py): the
    kernel runs on z64 rounded to `dtype`; its forward and gradient (outputs may be
    scalars or per-row, summed for backward) are judged by assert_rounding_close
    against ref in float64 on the same rounded z (floors: the forward's, the gradient's;
    eps: assert_rounding_close's)."""
    x = z64.detach().to(dtype).double().requires_grad_()
    exact = ref(x, graph, **kw)
    exact.sum().backward()
    z = z64.detach().to(dtype).requires_grad_()
    out = kernel(z, graph, **kw)
    out.float().sum().backward()
    assert_rounding_close(out, exact, dtype, cond=cond, floor=floor, what="forward", eps=eps)
    assert_rounding_close(z.grad, x.grad, dtype, cond=cond, floor=grad_floor, what="gradient", eps=eps)


def info_nce_cond(z: torch.Tensor, temperature: float, normalize: bool = True) -> float:
    """info_nce's condition for assert_rounding_close: 1 + max |s_ij|, s = cos/τ
    (normalize) or z_i·z_j/τ (small N: it forms the N×N products)."""
    if normalize:
        return 1.0 + 1.0 / temperature
    z = z.detach().double()
    return 1.0 + (z @ z.T).abs().max().item() / temperature


#: info_nce's rows are log-sum-exps minus logits: where they cancel to 0 (a row whose
#: only key is its positive), the terms are cond large, so cond * 1 is their scale.
INFO_NCE_ROWS_FLOOR = 1.0


def info_nce_grad_floor(z: torch.Tensor, grad_rows, normalize: bool = True) -> float:
    """The size of info_nce's gradient terms, relative to cond, where they cancel (every
    cosine ±1 at D = 1, or p = q): row weights g times ∂s/∂z per unit of s, i.e.
    max|g| / min‖z_i‖ (normalize: ∂û/∂z = (I − ûûᵀ)/‖z‖) or max|g| / max‖z_i‖
    (cond's max|s| ≈ max‖z‖²/τ, and ∂s/∂z_i = z_j/τ)."""
    norms = z.detach().double().norm(dim=1)
    g = torch.as_tensor(grad_rows).double().abs().max().item()
    return g / (norms.min().item() if normalize else norms.max().item())


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
    import pytest

    with pytest.raises(ValueError, match="z must be finite"):
        fn(z, graph, check_finite=True)
