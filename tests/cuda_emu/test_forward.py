"""The FA2-style forward of CUDA info_nce (fa2_sym_lse_kernel in
csrc/cuda/info_nce/info_nce_forward.cu: 16-bit z, normalize=True, τ on the fixed-shift
path, D ≤ 128) under the CPU emulator, against palfast.reference in float64 by
the rounding rule of palfast/testing.py (whose emulator, fixtures and
helpers this file imports).

The emulator counts warp-level mma.sync calls (csrc/cuda/mma.cuh), so each test
also checks that the FA2 kernel ran exactly on the 128-row tile pairs and 64-row
key halves it should (and not at all for D > 128, where sym_lse_kernel takes over).
"""

from __future__ import annotations

import pytest
import torch

import palfast
from palfast.testing import INFO_NCE_ROWS_FLOOR, assert_rounding_close, info_nce_cond

from cuda_emu.common import (
    TEMPERATURE,
    check_info_nce,
    expected_forward_mmas,
    info_nce_ref,
    rounded,
)

# float tolerances: CI runs these again under a second CPU capability (.ci/run)
pytestmark = [pytest.mark.numeric, pytest.mark.slow]

DTYPES16 = [torch.bfloat16, torch.float16]
NS = [1, 2, 3, 41, 127, 257]
DS = [1, 3, 16, 100, 128, 130]
SIZES = [(n, d) for n in NS for d in DS]


def _ring(n: int) -> palfast.PairGraph:
    """Row i's one positive is row i + 1 (mod n): every anchor's lse enters its loss row."""
    src = torch.arange(n)
    return palfast.PairGraph.from_edges(src, (src + 1) % n, torch.ones(n), num_nodes=n, symmetric=False)


def _check_forward(emu, dtype, n, d, a0, a1, seed):
    """Runs the emulated forward; checks the mma count, the rows outside the anchors,
    and the anchors' rows by the rounding rule. Returns (rows, lse)."""
    torch.manual_seed(seed)
    emu.emu_set_seed(seed)
    z64 = torch.randn(n, d, dtype=torch.float64)
    g = _ring(n)
    before = emu.emu_ptx_mma_count()
    rows, lse = emu.info_nce(z64.to(dtype), *g.kernel_args(), TEMPERATURE, True, a0, a1)
    assert emu.emu_ptx_mma_count() - before == expected_forward_mmas(n, d, a0, a1)
    outside = torch.ones(n, dtype=torch.bool)
    outside[a0:a1] = False
    assert (rows[outside] == 0).all() and torch.isinf(lse[outside]).all()
    assert torch.isfinite(lse[~outside]).all() if n > 1 else lse[0] == float("-inf")
    no_grad = torch.zeros(n, dtype=torch.float64)
    exact, _ = info_nce_ref(rounded(z64, dtype), g, True, a0, a1, no_grad)
    assert_rounding_close(
        rows, exact, dtype, cond=info_nce_cond(z64, TEMPERATURE), floor=INFO_NCE_ROWS_FLOOR, what="rows"
    )
    return rows, lse


@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
@pytest.mark.parametrize("n,d", SIZES, ids=[f"n{n}-d{d}" for n, d in SIZES])
def test_fa2_forward_matches_reference(emu, dtype, n, d):
    _check_forward(emu, dtype, n, d, 0, n, seed=n * 1000 + d)


# Last tiles that the 128-row tiles can get wrong: N = 100, the second key half
# 36 rows and warp 3's second m16 tile past N; 129, a last tile of one row
# (the first m16 tile of warp 0 only) and its second key half skipped; 145,
# warp 0's second m16 tile with one row; 191, a second key half of 63 rows in
# the first tile and none in the last; 193, a last key half of one row.
EDGE_SIZES = [(n, d) for n in (100, 129, 145, 191, 193) for d in (16, 100, 128)]


@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
@pytest.mark.parametrize("n,d", EDGE_SIZES, ids=[f"n{n}-d{d}" for n, d in EDGE_SIZES])
def test_fa2_forward_partial_last_tile(emu, dtype, n, d):
    _check_forward(emu, dtype, n, d, 0, n, seed=n * 1000 + d)


# The grid of symmetric_lse is sized for the SMs (8 region pairs per SM for the
# FA2 kernel): at the default 132 every region is one tile at these N, so a block
# sees one key tile (two halves). With 1 SM, 2800 rows (22 tiles of 128, the
# last of 112 rows: a second key half of 48) form 5 regions of 5, 5, 5, 5 and 2
# tiles: blocks stream up to 10 key halves through the double buffer, for up to
# 5 query tiles; with 2 SMs, 7 regions of 3 tiles and one of 1.
@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
@pytest.mark.parametrize("sms", [1, 2])
@pytest.mark.parametrize("d", [16, 128])
def test_fa2_forward_streams_key_tiles_on_few_sms(emu, dtype, sms, d):
    emu.emu_set_sm_count(sms)
    try:
        _check_forward(emu, dtype, 2800, d, 0, 2800, seed=sms * 10 + d)
    finally:
        emu.emu_set_sm_count(0)


# Anchor ranges (N = 700: 6 tiles of 128, the last of 60 rows) inside one tile,
# inside one key half, across tile borders, covering a whole tile, in the last
# tile: tile pairs without anchor rows on either side are skipped (the mma count
# checks it).
ANCHORS = [(1, 700), (129, 130), (0, 64), (100, 300), (256, 384), (650, 700)]


@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
@pytest.mark.parametrize("a0,a1", ANCHORS)
@pytest.mark.parametrize("sms", [1, 0])
def test_fa2_forward_anchor_range(emu, dtype, a0, a1, sms):
    emu.emu_set_sm_count(sms)
    try:
        _check_forward(emu, dtype, 700, 40, a0, a1, seed=a0 + a1)
    finally:
        emu.emu_set_sm_count(0)


@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
@pytest.mark.parametrize("sms", [1, 0])
def test_fa2_forward_same_bits_for_every_schedule(emu, dtype, sms):
    """Fixed partial slots and fixed reduction orders: any block or thread order
    gives the same bits."""
    emu.emu_set_sm_count(sms)
    try:
        results = [_check_forward(emu, dtype, 700, 100, 3, 700, seed=1)]
        torch.manual_seed(1)
        z = torch.randn(700, 100, dtype=torch.float64).to(dtype)
        for seed in (2, 3):
            emu.emu_set_seed(seed)
            results.append(emu.info_nce(z, *_ring(700).kernel_args(), TEMPERATURE, True, 3, 700))
    finally:
        emu.emu_set_sm_count(0)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
@pytest.mark.parametrize("n,d", [(127, 128), (257, 100)])
def test_fa2_forward_lse_serves_the_backward(emu, dtype, n, d):
    """The backward (fixed shift) recomputes e_ik with its own GEMM and divides by the
    forward's row sums, exp(lse): the gradient checks that lse against it."""
    check_info_nce(emu, dtype, n, d, "semi", True, 0, n, seed=n + d)
