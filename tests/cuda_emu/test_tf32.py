"""float32 info_nce on tensor cores (Tf32Tile in csrc/cuda/info_nce/info_nce.cuh: the
logits S = U_I U_Kᵀ by mma.sync m16n8k8 tf32) under the CPU emulator, forward and
gradient, against palfast.reference in float64:

* torch.backends.cuda.matmul.fp32_precision = "tf32" (what allow_tf32 = True sets):
  plain TF32 (one mma per product), held to the rounding rule of palfast/testing.py
  with eps = TF32_EPS;
* otherwise (PyTorch's default): 3×TF32 split precision (three mmas per
  product), held to the same rule at float32's eps and to the float32 tolerances of
  the other emulator tests.

The emulator counts tf32 mmas apart from the 16-bit ones, so each test also checks
that the tensor-core path ran, on every 64-row tile pair once in each direction,
with three mmas per product without the flag.
"""

from __future__ import annotations

import math

import pytest
import torch

from palfast.testing import (
    INFO_NCE_ROWS_FLOOR,
    TF32_EPS,
    allow_tf32,
    assert_rounding_close,
    info_nce_cond,
    info_nce_grad_floor,
)

from cuda_emu.common import TOL32, TOL32_GRAD, info_nce_case, info_nce_ref, random_graph

# float tolerances: CI runs these again under a second CPU capability (.ci/run)
pytestmark = [pytest.mark.numeric, pytest.mark.slow]

NS = [1, 3, 41, 127, 129, 257]
DS = [1, 3, 100, 128]
SIZES = [(n, d) for n in NS for d in DS]
# Tf32Tile: 64×64 S tiles of 4 warps, each 2 m16 × 4 n8 tiles, D in k-steps of 8
# staged 16 columns at a time (zero-padded past D).
TILE, WARPS, M_TILES, N8_TILES, K8, STAGE = 64, 4, 2, 4, 8, 16


def _mmas_per_tile(d: int, tf32: bool) -> int:
    return WARPS * M_TILES * N8_TILES * math.ceil(d / STAGE) * (STAGE // K8) * (1 if tf32 else 3)


@pytest.fixture(params=[True, False], ids=["allow_tf32", "3xtf32"])
def tf32(request):
    with allow_tf32(request.param):
        yield request.param


def _check(emu, tf32, n, d, *, kind="labels", normalize=True, temperature=0.3, seed=0):
    """Runs forward and backward; checks them against the reference; returns the tf32
    mma counts of each."""
    z64, g, grad_rows = info_nce_case(emu, n, d, kind, normalize, seed)
    z = z64.float()
    c0 = emu.emu_ptx_tf32_mma_count()
    rows, lse = emu.info_nce(z, *g.kernel_args(), temperature, normalize, 0, n)
    c1 = emu.emu_ptx_tf32_mma_count()
    grad = emu.info_nce_backward(grad_rows.float(), z, *g.kernel_args(), lse, temperature, normalize, 0, n)
    c2 = emu.emu_ptx_tf32_mma_count()
    assert grad.dtype == torch.float32 and grad.shape == (n, d)
    # the yardstick: float64 on the float32 inputs (the tf32 rounding is the kernel's)
    z32 = z.double()
    want_rows, want_grad = info_nce_ref(z32, g, normalize, 0, n, grad_rows.float().double(), temperature)
    # plain TF32: the rounding rule at tf32's eps; 3×TF32: at float32's (the rule's
    # eps(float32)), and the fixed tolerances of the other float32 emulator tests
    kw = {"cond": info_nce_cond(z32, temperature, normalize), "eps": TF32_EPS if tf32 else None}
    floor = info_nce_grad_floor(z32, grad_rows, normalize)
    assert_rounding_close(rows, want_rows, torch.float32, floor=INFO_NCE_ROWS_FLOOR, what="rows", **kw)
    assert_rounding_close(grad, want_grad, torch.float32, floor=floor, what="gradient", **kw)
    if not tf32:
        torch.testing.assert_close(rows.double(), want_rows, **TOL32)
        torch.testing.assert_close(grad.double(), want_grad, **TOL32_GRAD)
    return c1 - c0, c2 - c1


@pytest.mark.parametrize("n,d", SIZES, ids=[f"n{n}-d{d}" for n, d in SIZES])
def test_fixed_shift(emu, tf32, n, d):
    """The fixed-shift forward (sym_lse_kernel) and the default backward (sym_grad_kernel)
    each compute S once per 64-row tile pair I ≤ K."""
    fwd, bwd = _check(emu, tf32, n, d)
    tiles = math.ceil(n / TILE)
    want = tiles * (tiles + 1) // 2 * _mmas_per_tile(d, tf32)
    assert (fwd, bwd) == (want, want)


@pytest.mark.parametrize("kind", ["edges", "semi", "views"])
def test_graph_kinds(emu, tf32, kind):
    _check(emu, tf32, 130, 72, kind=kind, seed=1)


@pytest.mark.parametrize("normalize,temperature", [(False, 0.3), (True, 0.02)], ids=["unnormalized", "small-tau"])
def test_online_paths(emu, normalize, temperature):
    """The online forward (lse_kernel) and the row-block backward use the same tiles:
    tf32 mmas there too, three times as many without the flag."""
    counts = {}
    for allow in (True, False):
        with allow_tf32(allow):
            counts[allow] = _check(emu, allow, 129, 100, normalize=normalize, temperature=temperature)
    fwd, bwd = counts[True]
    assert fwd > 0 and bwd > 0
    assert fwd % _mmas_per_tile(100, True) == 0 and bwd % _mmas_per_tile(100, True) == 0
    assert counts[False] == (3 * fwd, 3 * bwd)


def test_tf32_error_is_seen(emu):
    """The tf32 bound is not vacuous: plain TF32 errs by more than the 3×TF32 path, and
    by more than float32's own rule would allow on some input (so a path that silently
    ran plain TF32 without the flag fails the float32 checks)."""
    n, d = 257, 128
    torch.manual_seed(3)
    z = torch.randn(n, d)
    g = random_graph("labels", n, 3)
    want, _ = info_nce_ref(z.double(), g, True, 0, n, torch.zeros(n, dtype=torch.float64), 0.1)
    errs = {}
    for allow in (True, False):
        with allow_tf32(allow):
            rows, _ = emu.info_nce(z, *g.kernel_args(), 0.1, True, 0, n)
        errs[allow] = (rows.double() - want).abs().max().item()
    assert errs[True] > 10 * errs[False]


@pytest.mark.parametrize(
    "set_flag,tf32",
    [
        (lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True), True),
        (lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", False), False),
        (lambda: torch.set_float32_matmul_precision("high"), True),
        (lambda: torch.set_float32_matmul_precision("highest"), False),
        (lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"), True),
        # the legacy flag, then the new one: reading allow_tf32 raises now, the kernels do not
        (
            lambda: (
                setattr(torch.backends.cuda.matmul, "allow_tf32", True),
                setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee"),
            ),
            False,
        ),
    ],
    ids=["allow_tf32", "no_allow_tf32", "matmul_precision_high", "matmul_precision_highest", "fp32_precision", "mixed"],
)
def test_every_way_of_setting_the_flag(emu, set_flag, tf32):
    """Each of PyTorch's ways to allow or forbid TF32 matmuls picks the path: plain TF32
    (one mma per product) or 3×TF32 (three)."""
    n, d = 41, 16
    z = torch.randn(n, d)
    g = random_graph("labels", n, 0)
    with allow_tf32(False):  # restores the flag after the test
        set_flag()
        before = emu.emu_ptx_tf32_mma_count()
        emu.info_nce(z, *g.kernel_args(), 0.3, True, 0, n)
        assert emu.emu_ptx_tf32_mma_count() - before == _mmas_per_tile(d, tf32)
    torch.set_float32_matmul_precision("highest")


def test_before_sm80_float32_stays_simt(emu):
    """On an emulated compute capability 7.x GPU float32 takes the SIMT tiles (no tf32
    mma) whatever the flag, at float32's accuracy; 16-bit z is refused there."""
    emu.emu_set_compute_major(7)
    try:
        for allow in (True, False):
            with allow_tf32(allow):
                before = emu.emu_ptx_tf32_mma_count()
                _check(emu, False, 129, 100)
                assert emu.emu_ptx_tf32_mma_count() == before
        g = random_graph("labels", 8, 0)
        with pytest.raises(RuntimeError, match="compute capability 8.0 or newer"):
            emu.info_nce(torch.randn(8, 16).bfloat16(), *g.kernel_args(), 0.3, True, 0, 8)
    finally:
        emu.emu_set_compute_major(0)
