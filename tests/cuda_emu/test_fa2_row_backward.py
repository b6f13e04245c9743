"""The FA2-style row backward of CUDA info_nce (fa2_row_grad_kernel in
csrc/cuda/info_nce/info_nce_backward.cu: 16-bit z, normalize=True, τ on the fixed-shift
path, D ≤ 128; the default there, in deterministic mode too) under the CPU
emulator, against palfast.reference in float64 by the rounding rule of
palfast/testing.py (whose emulator, fixtures and checks this file imports).

The emulator counts warp-level mma.sync calls, red_add_v2 calls and atomicAdd
calls, so each test also checks that the row kernel ran exactly on the (query
tile, key half) pairs it should and, on a graph without class sums (whose
positive term adds by atomics), that the whole backward issued no atomic add.
PALFAST_INFO_NCE_BACKWARD (docs/cuda.md, "info_nce kernels") selects the kernel.
"""

from __future__ import annotations

import pytest
import torch

from palfast.testing import deterministic_algorithms, info_nce_backward_kernel

from cuda_emu.common import (
    TEMPERATURE,
    check_info_nce,
    emulated_sms,
    expected_forward_mmas,
    expected_row_backward_mmas,
    info_nce_emu,
    random_graph,
)

# float tolerances: CI runs these again under a second CPU capability (.ci/run)
pytestmark = [pytest.mark.numeric, pytest.mark.slow]

DTYPES16 = [torch.bfloat16, torch.float16]
# N around the 128-row query tile and the 64-row key half; D odd, below and at 128.
NS = [1, 3, 41, 127, 129, 257]
DS = [1, 3, 100, 128]
SIZES = [(n, d) for n in NS for d in DS]
SIZE_KINDS = ["edges", "labels", "semi", "views"]


def _check(emu, dtype, n, d, kind, a0, a1, seed, env=None):
    """Forward and backward against the reference, the row kernel's mma count, and
    no red_add_v2 (the symmetric kernel's adds)."""
    mmas, reds = emu.emu_ptx_mma_count(), emu.emu_ptx_red_v2_count()
    with info_nce_backward_kernel(env):
        check_info_nce(emu, dtype, n, d, kind, True, a0, a1, seed)
    want = expected_forward_mmas(n, d, a0, a1) + expected_row_backward_mmas(n, d, a0, a1)
    assert emu.emu_ptx_mma_count() - mmas == want
    assert emu.emu_ptx_red_v2_count() == reds


@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
@pytest.mark.parametrize("i", range(len(SIZES)), ids=[f"n{n}-d{d}" for n, d in SIZES])
def test_fa2_row_backward_matches_reference(emu, dtype, i):
    n, d = SIZES[i]
    _check(emu, dtype, n, d, SIZE_KINDS[i % len(SIZE_KINDS)], 0, n, seed=900 + i)


# One SM: one split, so a query tile walks all 11 key halves of 700 rows through the
# double buffer; 132 SMs (the default): a split per key half, their slices summed.
@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
@pytest.mark.parametrize("sms", [1, 0])
@pytest.mark.parametrize("d,kind", [(64, "views"), (128, "labels"), (40, "semi")])
def test_fa2_row_backward_walks_and_splits_key_halves(emu, dtype, sms, d, kind):
    with emulated_sms(emu, sms):
        _check(emu, dtype, 700, d, kind, 0, 700, seed=sms * 10 + d, env="row")


# Anchor ranges inside a query tile, across key-half (64) and query-tile (128)
# borders: query tiles without anchor rows walk only the key halves holding anchors
# (the mma count checks it), and still get their gradient there.
ANCHORS = [(0, 1), (1, 130), (63, 66), (64, 96), (100, 129), (130, 257), (200, 257)]


@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
@pytest.mark.parametrize("a0,a1", ANCHORS)
@pytest.mark.parametrize("sms", [1, 0])
def test_fa2_row_backward_anchor_range(emu, dtype, a0, a1, sms):
    with emulated_sms(emu, sms):
        _check(emu, dtype, 257, 40, "semi", a0, a1, seed=a0 + 3 * a1)


def _backward(emu, dtype, n, d, seed, env):
    """The backward alone on an edge graph (CSR only: no atomics in the positive
    term), its gradient and the atomicAdd and red_add_v2 calls it issued."""
    torch.manual_seed(seed)
    z = torch.randn(n, d, dtype=torch.float64).to(dtype)
    g = random_graph("edges", n, seed)
    rows, lse = emu.info_nce(z, *g.kernel_args(), TEMPERATURE, True, 0, n)
    atomics, reds = emu.emu_atomic_count(), emu.emu_ptx_red_v2_count()
    with info_nce_backward_kernel(env):
        grad = emu.info_nce_backward(torch.randn(n).to(rows.dtype), z, *g.kernel_args(), lse, TEMPERATURE, True, 0, n)
    return grad, emu.emu_atomic_count() - atomics, emu.emu_ptx_red_v2_count() - reds


@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
@pytest.mark.parametrize("n,d", [(129, 3), (257, 128), (300, 100)])
def test_fa2_row_backward_issues_no_atomics(emu, dtype, n, d):
    """Selected (unset or 'row'), the row kernel adds by no atomicAdd or red_add_v2;
    'sym' does (the check that the count sees them)."""
    for env in (None, "row"):
        _, atomics, reds = _backward(emu, dtype, n, d, 3, env)
        assert (atomics, reds) == (0, 0)
    _, atomics, reds = _backward(emu, dtype, n, d, 3, "sym")
    assert atomics + reds > 0


@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
@pytest.mark.parametrize("sms", [0, 7])
def test_fa2_row_backward_same_bits_for_every_schedule(emu, dtype, sms):
    """Every output written once in a fixed order: any block and thread order gives
    the same bits, with the key splits of 132 and of 7 SMs too."""
    with emulated_sms(emu, sms):
        grads = []
        for seed in (1, 2, 3):
            emu.emu_set_seed(seed)
            grads.append(_backward(emu, dtype, 300, 72, 5, "row")[0])
    for other in grads[1:]:
        assert torch.equal(grads[0], other)


@pytest.mark.filterwarnings("ignore:.*does not have a deterministic implementation")
@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
@pytest.mark.parametrize("env", [None, "sym"])
def test_deterministic_mode_takes_the_row_kernel(emu, dtype, env):
    """Under torch.use_deterministic_algorithms the row kernel runs for 16-bit z with
    D ≤ 128, even where 'sym' is asked (the symmetric kernel's atomics add in a
    varying order)."""
    with deterministic_algorithms(warn_only=True):
        _check(emu, dtype, 130, 72, "edges", 0, 130, seed=7, env=env)


@pytest.mark.parametrize("env,d", [("tile", 72), ("row", 130)])
def test_other_kernels_where_asked_or_out_of_reach(emu, env, d):
    """'tile' takes grad_tile_kernel (no FA2 backward mmas); 'row' with D > 128 takes
    the default there (the symmetric kernel, which has no FA2 path for that D)."""
    mmas = emu.emu_ptx_mma_count()
    with info_nce_backward_kernel(env):
        check_info_nce(emu, torch.bfloat16, 130, d, "views", True, 0, 130, seed=11)
    assert emu.emu_ptx_mma_count() - mmas == expected_forward_mmas(130, d, 0, 130)


def test_bad_value_is_an_error(emu):
    with info_nce_backward_kernel("rows"), pytest.raises(RuntimeError, match="PALFAST_INFO_NCE_BACKWARD must be"):
        info_nce_emu(emu, torch.randn(5, 4), random_graph("views", 5, 0), True, 0, 5, torch.ones(5))
