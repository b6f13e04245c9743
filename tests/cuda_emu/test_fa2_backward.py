"""The FA2-style backward of CUDA info_nce (fa2_sym_grad_kernel in
csrc/cuda/info_nce/info_nce_backward.cu: 16-bit z, normalize=True, τ on the fixed-shift
path, D ≤ 128, torch's deterministic mode off, selected by
PALFAST_INFO_NCE_BACKWARD=sym: the row kernel of test_fa2_row_backward.py is the
default there) under the CPU emulator, against
palfast.reference in float64 by the rounding rule of palfast/testing.py
(whose emulator, fixtures and checks this file imports).

The emulator counts warp-level mma.sync calls and red_add_v2 calls
(csrc/cuda/mma.cuh), so each test also checks that the FA2 kernel ran exactly on
the tile pairs it should: not at all for D > 128 (sym_grad_kernel's WMMA path)
or in deterministic mode (the FA2 row kernel then, counted there).
"""

from __future__ import annotations

import math

import pytest
import torch

from palfast.testing import deterministic_algorithms

from cuda_emu.common import check_info_nce, emulated_sms, expected_forward_mmas, expected_row_backward_mmas

# float tolerances: CI runs these again under a second CPU capability (.ci/run)
pytestmark = [pytest.mark.numeric, pytest.mark.slow]

DTYPES16 = [torch.bfloat16, torch.float16]
NS = [1, 2, 3, 41, 127, 257]
DS = [1, 3, 16, 100, 128, 130]
SIZES = [(n, d) for n in NS for d in DS]
# Fa2Backward in csrc/cuda/info_nce/info_nce_backward.cu: 64-row key tiles (4 warps of 16
# rows), 32-row row tiles, D in steps of 16 (mma.m16n8k16), up to 128.
KEY_TILE, ROW_TILE, K_STEP, MAX_D = 64, 32, 16, 128
# Warp-level mmas of one (key tile, row tile) pair per 16 columns of D: Sᵀ (4 warps ×
# 4 n8 tiles), the column side (4 warps × 2 k-steps × 2 n8 tiles) and, off the
# diagonal, the row side (4 warps × 4 k-steps × 2 n8 tiles over half of D each).
MMAS_DIAGONAL, MMAS_OFF_DIAGONAL = 32, 48
# Graph kinds cycled over SIZES (each gives every row positives).
SIZE_KINDS = ["edges", "labels", "semi", "views"]


@pytest.fixture(autouse=True)
def _symmetric_backward(monkeypatch):
    """Every test here asks for the symmetric kernels."""
    monkeypatch.setenv("PALFAST_INFO_NCE_BACKWARD", "sym")


def _expected_backward_mmas(n: int, d: int, a0: int, a1: int) -> int:
    """Warp-level mmas of one FA2 backward: every row tile (32 rows, inside N) of
    every key tile K at or below K, unless neither has an anchor row."""
    if d > MAX_D:
        return 0

    def anchors(r0, rows):
        return r0 < a1 and r0 + rows > a0

    total = 0
    for tk in range(math.ceil(n / KEY_TILE)):
        for h in range((tk + 1) * KEY_TILE // ROW_TILE):
            if h * ROW_TILE >= n or not (anchors(tk * KEY_TILE, KEY_TILE) or anchors(h * ROW_TILE, ROW_TILE)):
                continue
            diagonal = h * ROW_TILE // KEY_TILE == tk
            total += (MMAS_DIAGONAL if diagonal else MMAS_OFF_DIAGONAL) * math.ceil(d / K_STEP)
    return total


def _check(emu, dtype, n, d, kind, a0, a1, seed, row=False):
    """Forward and backward against the reference (tests/cuda_emu/test_ops.py), and
    the mma count of the FA2 forward plus the FA2 symmetric backward (row: the FA2
    row kernel instead). Returns the number of red_add_v2 calls."""
    mmas, reds = emu.emu_ptx_mma_count(), emu.emu_ptx_red_v2_count()
    check_info_nce(emu, dtype, n, d, kind, True, a0, a1, seed)
    backward = expected_row_backward_mmas if row else _expected_backward_mmas
    assert emu.emu_ptx_mma_count() - mmas == expected_forward_mmas(n, d, a0, a1) + backward(n, d, a0, a1)
    return emu.emu_ptx_red_v2_count() - reds


@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
@pytest.mark.parametrize("i", range(len(SIZES)), ids=[f"n{n}-d{d}" for n, d in SIZES])
def test_fa2_backward_matches_reference(emu, dtype, i):
    n, d = SIZES[i]
    reds = _check(emu, dtype, n, d, SIZE_KINDS[i % len(SIZE_KINDS)], 0, n, seed=500 + i)
    # Two columns a request where D is even (8-byte aligned pairs), none for odd D
    # or on sym_grad_kernel's path (D > 128).
    assert (reds > 0) == (d % 2 == 0 and d <= MAX_D)


# One SM: the grid has kBlocksPerSm = 2 blocks' worth of pairs per key tile run, so
# at 700 rows (11 key tiles, 22 row tiles) a block walks up to 22 row tiles
# through the double buffer; 3 SMs give runs of up to 6 key tiles (12 row tiles).
@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
@pytest.mark.parametrize("sms", [1, 3])
@pytest.mark.parametrize("d,kind", [(64, "views"), (128, "labels"), (40, "semi")])
def test_fa2_backward_streams_row_tiles_on_few_sms(emu, dtype, sms, d, kind):
    with emulated_sms(emu, sms):
        _check(emu, dtype, 700, d, kind, 0, 700, seed=sms * 10 + d)


# Anchor ranges inside one row tile, across row-tile (32) and key-tile (64)
# borders, covering whole tiles: pairs without anchor rows on either side are
# skipped (the mma count checks it), those with anchors on one side only still
# give both sides their gradient.
ANCHORS = [(0, 1), (1, 130), (31, 33), (63, 66), (64, 96), (70, 129), (200, 257)]


@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
@pytest.mark.parametrize("a0,a1", ANCHORS)
@pytest.mark.parametrize("sms", [1, 0])
def test_fa2_backward_anchor_range(emu, dtype, a0, a1, sms):
    with emulated_sms(emu, sms):
        _check(emu, dtype, 257, 40, "semi", a0, a1, seed=a0 + 3 * a1)


@pytest.mark.filterwarnings("ignore:.*does not have a deterministic implementation")
@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
def test_deterministic_mode_takes_no_symmetric_kernel(emu, dtype):
    """Under torch.use_deterministic_algorithms the FA2 symmetric backward does not
    run although asked (its float atomics add in a varying order): the FA2 row
    kernel's mmas are counted instead, and no red_add_v2."""
    with deterministic_algorithms(warn_only=True):
        reds = _check(emu, dtype, 130, 72, "edges", 0, 130, seed=7, row=True)
    assert reds == 0


# ------------------------------------------------------------ red_add_v2
@pytest.mark.parametrize("threads,slots", [(32, 4), (128, 1), (100, 7)])
def test_red_add_v2_adds_both_values(emu, threads, slots):
    """red_add_v2 (csrc/cuda/mma.cuh): every thread's pair lands on its two floats,
    whatever the number of threads meeting on one pair."""
    torch.manual_seed(threads)
    v = torch.randn(threads, 2)
    before = emu.emu_ptx_red_v2_count()
    out = emu.emu_ptx_red_v2(v, slots, 2)
    assert emu.emu_ptx_red_v2_count() - before == threads
    want = torch.zeros(2 + 2 * slots, dtype=torch.float64)
    for i in range(threads):
        want[2 + 2 * (i % slots) : 4 + 2 * (i % slots)] += v[i].double()
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)


def test_red_add_v2_needs_8_byte_alignment(emu):
    """A vector red at an odd float offset faults on the GPU; the emulator says so."""
    with pytest.raises(RuntimeError, match="8-byte aligned"):
        emu.emu_ptx_red_v2(torch.ones(4, 2), 2, 1)
