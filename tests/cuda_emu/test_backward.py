"""The CUDA info_nce backward's dneg kernels, run by the CPU emulator (tests/cuda_emu).

csrc/cuda/info_nce/info_nce_backward.cu computes dneg = M u on the fixed-shift path
(normalize=True, τ above the bound of use_fixed_shift) by the FA2-style row kernel
for 16-bit z with D ≤ 128 (fa2_row_grad_kernel, no atomics; its own tests are in
test_fa2_row_backward.py) and by the symmetric kernel (tile pairs I ≤ K, float
atomicAdd) otherwise, unless torch's deterministic mode is on; then, and on the
online path, by a row kernel (every element written once, in a fixed order): the
FA2 one where it applies, else the row-block kernel (grad_tile_kernel).
PALFAST_INFO_NCE_BACKWARD picks the symmetric or the row-block kernel for 16-bit z
too, so each is checked here against the float64 reference at awkward sizes,
anchor ranges and grids sized for few SMs, on extreme but valid input, and for
the same bits across schedules where the path is deterministic. The fixtures and
checks are those of tests/cuda_emu/test_ops.py.
"""

from __future__ import annotations

import pytest
import torch

import palfast
from palfast import reference
from palfast.testing import deterministic_algorithms

from cuda_emu.common import (
    DTYPES,
    KINDS,
    TEMPERATURE,
    check_info_nce,
    info_nce_emu,
    random_graph,
)

# float tolerances: CI runs these again under a second CPU capability (.ci/run)
pytestmark = [pytest.mark.numeric, pytest.mark.slow]


# "symmetric": out of deterministic mode with PALFAST_INFO_NCE_BACKWARD=sym (the
# symmetric kernels, 16-bit z included); "tile": =tile (grad_tile_kernel everywhere);
# "deterministic": torch.use_deterministic_algorithms, variable unset (warn_only, so
# that label-set graphs, whose class sums use atomics, only warn).
PATHS = ["symmetric", "tile", "deterministic"]
BACKWARD_KERNEL = {"symmetric": "sym", "tile": "tile", "deterministic": None}


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    env = BACKWARD_KERNEL[request.param]
    if env is None:
        monkeypatch.delenv("PALFAST_INFO_NCE_BACKWARD", raising=False)
    else:
        monkeypatch.setenv("PALFAST_INFO_NCE_BACKWARD", env)
    if request.param != "deterministic":
        yield request.param
        return
    with deterministic_algorithms(warn_only=True):
        yield request.param


# Sizes not multiples of any tile (64 rows in fp32 and 16-bit, 32 in fp64) or of
# the gradient's column blocks and chunks (DV = 128 columns a block, staged 64 at a
# time in fp32, 32 in fp64): D = 65 leaves one column in the second fp32 chunk, D = 1
# skips it, D = 130 makes two column blocks.
SIZES = [(1, 3), (2, 1), (3, 65), (41, 130), (127, 64), (257, 128), (65, 33), (130, 97)]


@pytest.mark.filterwarnings("ignore:.*does not have a deterministic implementation")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("i", range(len(SIZES)), ids=[f"n{n}-d{d}" for n, d in SIZES])
def test_backward_matches_reference(emu, path, dtype, i):
    n, d = SIZES[i]
    check_info_nce(emu, dtype, n, d, KINDS[i % len(KINDS)], True, 0, n, seed=300 + i)


@pytest.mark.filterwarnings("ignore:.*does not have a deterministic implementation")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("a0,a1", [(0, 1), (1, 130), (63, 66), (70, 129), (200, 257)])
def test_backward_anchor_range(emu, path, dtype, a0, a1):
    """Tile pairs with no anchor on either side are skipped (M = 0 there); those
    with anchors on one side only still give both sides their gradient."""
    check_info_nce(emu, dtype, 257, 40, "semi", True, a0, a1, seed=a0 + 3 * a1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sms", [1, 3, 7, 40])
def test_backward_grids_sized_for_few_sms(emu, path, dtype, sms):
    """Both kernels size their grids for kBlocksPerSm·SMs blocks. 257 rows are 5 tiles
    (9 in fp64) and 15 (45) symmetric pairs: one SM gives every key tile one run of
    all its pairs, 3 and 7 SMs runs of 3 and 2 pairs (fp32), 40 SMs runs of one pair;
    the row-block kernel runs unsplit at one SM and splits its key tiles beyond."""
    emu.emu_set_sm_count(sms)
    try:
        check_info_nce(emu, dtype, 257, 40, "views", True, 0, 257, seed=sms)
        check_info_nce(emu, dtype, 257, 40, "edges", True, 70, 200, seed=sms + 1)
    finally:
        emu.emu_set_sm_count(0)


def _run(emu, dtype, n, d, seed, sms=0):
    """Forward and backward on a CSR graph (no atomics in the positive term)."""
    torch.manual_seed(0)
    z = torch.randn(n, d).to(dtype)
    g = random_graph("edges", n, seed=1)
    emu.emu_set_sm_count(sms)
    emu.emu_set_seed(seed)
    try:
        return info_nce_emu(emu, z, g, True, 3, n, torch.randn(n))
    finally:
        emu.emu_set_sm_count(0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sms", [0, 7])
def test_deterministic_mode_gives_the_same_bits_for_every_schedule(emu, dtype, sms):
    """Under torch.use_deterministic_algorithms(True) (not warn_only: an alert
    would raise) the backward takes the row-block kernel: any block and thread
    order gives the same bits, with the key splits of 7 SMs too."""
    with deterministic_algorithms():
        results = [_run(emu, dtype, 130, 72, seed, sms) for seed in (1, 2, 3)]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_symmetric_path_is_taken_by_default(emu):
    """Out of deterministic mode the symmetric kernel runs: its atomic adds come in
    the block order of the schedule, so the bits vary (the emulator's seeded
    scheduler makes this repeatable), within rounding of the deterministic result."""
    got = [_run(emu, torch.float32, 130, 72, seed)[2] for seed in (1, 2, 3)]
    with deterministic_algorithms():
        want = _run(emu, torch.float32, 130, 72, 1)[2]
    assert any(not torch.equal(got[0], other) for other in got[1:])
    for grad in got:
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------- extreme but valid input
# As tests/losses/test_info_nce.py checks on the CPU (docs/api.md, "Numerics"): row_norm in
# csrc/cuda/info_nce/info_nce.cuh scales each row by a power of two before squaring, and
# narrow_grad in csrc/cuda/info_nce/info_nce_backward.cu saturates float16 gradients.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale", [1e20, 1e30])
def test_rows_of_extreme_norm(emu, path, dtype, scale):
    """Every third row multiplied by 1e20 or 1e30 (its squared norm beyond float32):
    the loss is that of the unscaled rows and their gradient 1/scale of theirs."""
    torch.manual_seed(4)
    emu.emu_set_seed(4)
    n, d = 70, 24
    z = torch.randn(n, d, dtype=torch.float64)
    row_scale = torch.ones(n, 1, dtype=torch.float64)
    row_scale[::3] = scale
    g = random_graph("views", n, seed=0)
    grad_rows = torch.randn(n, dtype=torch.float64)
    rows_big, _, grad_big = info_nce_emu(emu, (z * row_scale).to(dtype), g, True, 0, n, grad_rows)
    rows, _, grad = info_nce_emu(emu, z.to(dtype), g, True, 0, n, grad_rows)
    assert torch.isfinite(rows_big).all() and torch.isfinite(grad_big.double()).all()
    # z·scale rounds differently from z in dtype: the same loss up to that rounding.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(rows_big.double(), rows.double(), rtol=8 * eps, atol=8 * eps)
    torch.testing.assert_close(
        grad_big.double() * row_scale, grad.double(), rtol=64 * eps, atol=64 * eps * grad.double().abs().max().item()
    )


def test_float16_zero_row(emu, path):
    """A float16 zero row: finite loss and gradient (its own gradient saturates at
    the float16 maximum instead of inf); the other rows get the float32 gradient
    rounded to float16."""
    torch.manual_seed(3)
    emu.emu_set_seed(3)
    n, d = 8, 16
    z = torch.randn(n, d).half()
    z[0] = 0
    g = palfast.PairGraph.from_views(n // 2, 2)
    grad_rows = torch.full((n,), 1.0 / n)
    rows, lse, grad = info_nce_emu(emu, z, g, True, 0, n, grad_rows)
    assert torch.isfinite(rows).all() and torch.isfinite(lse).all()
    assert torch.isfinite(grad.float()).all()
    rows32, _, grad32 = info_nce_emu(emu, z.float(), g, True, 0, n, grad_rows)
    torch.testing.assert_close(rows, rows32, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(grad[1:].float(), grad32[1:], rtol=1e-2, atol=1e-3)
    # And the float64 reference, to float16 precision (the reference itself has no
    # finite float16 gradient here: its zero row turns every row's gradient NaN).
    z64 = z.double().requires_grad_()
    want = reference.info_nce(z64, g, temperature=TEMPERATURE, normalize=True, reduction="none")
    (want * grad_rows.double()).sum().backward()
    top = z64.grad[1:].abs().max().item()
    torch.testing.assert_close(grad[1:].double(), z64.grad[1:], rtol=1e-2, atol=1e-3 * top)
