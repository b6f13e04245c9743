"""float32 info_nce on tensor cores (Tf32Tile in csrc/cuda/info_nce/info_nce.cuh: the
logits S = U_I U_Kᵀ and the backward's M·U_K and Mᵀ·U_I by mma.sync m16n8k8 tf32)
under the CPU emulator, forward and gradient, against palfast.reference in float64:

* torch.backends.cuda.matmul.fp32_precision = "tf32" (what allow_tf32 = True sets):
  plain TF32 (one mma per product), held to the rounding rule of palfast/testing.py
  with eps = TF32_EPS;
* otherwise (PyTorch's default): 3×TF32 split precision (three mmas per
  product), held to the same rule at float32's eps and to the float32 tolerances of
  the other emulator tests.

The emulator counts tf32 mmas apart from the 16-bit ones, so each test also checks
that the tensor-core path ran: S on every 64-row tile pair once in each direction,
and in the backward M·V for every gradient chunk (expected_backward_mmas), with
three mmas per product without the flag.

Plain TF32 also rounds M to tf32 in the backward: one relative rounding (2^-11) of
each positive-weighted term M_ik u_k of dneg_i = Σ_k M_ik u_k, so its error is at
most 2^-10·Σ_k |M_ik|·max|u| (M_ik and V_kj both rounded), below the
TF32_EPS·cond·scale that the rule allows the rounding of S already: Σ_k |M_ik| is
about |g_i| + Σ_k |g_k| p_ki, and the gradient's floor is max|g| / min‖z‖ with cond =
1 + max|s| ≥ 1. No new tolerance is needed, and none is loosened.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from palfast.testing import (
    INFO_NCE_ROWS_FLOOR,
    TF32_EPS,
    allow_tf32,
    assert_rounding_close,
    deterministic_algorithms,
    info_nce_backward_kernel,
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
# staged 16 columns at a time (zero-padded past D). The backward's M·V: column
# blocks of DV = 128 gradient columns, V staged in chunks of DVS = 64 (a chunk past D
# is skipped), each warp 2 m16 × 4 n8 tiles of a chunk, the 64 keys in k-steps of 8.
TILE, WARPS, M_TILES, N8_TILES, K8, STAGE, DV, DVS = 64, 4, 2, 4, 8, 16, 128, 64


def _mmas_per_tile(d: int, tf32: bool) -> int:
    return WARPS * M_TILES * N8_TILES * math.ceil(d / STAGE) * (STAGE // K8) * (1 if tf32 else 3)


def _mv_mmas_per_chunk(tf32: bool) -> int:
    return WARPS * M_TILES * N8_TILES * (TILE // K8) * (1 if tf32 else 3)


def expected_backward_mmas(n: int, d: int, a0: int, a1: int, tf32: bool, symmetric: bool) -> int:
    """tf32 mmas of one backward: per column block, S (dots) and M·V for each chunk
    inside D of every tile pair the kernel visits. symmetric (sym_grad_kernel): pairs
    I ≤ K with an anchor row in I or K, the column side Mᵀ·U_I on each, the row side
    M·U_K on those with I ≠ K; else (grad_tile_kernel): every (I, K) of a row tile I
    with anchors, and the key tiles from a0's down to those holding anchors for the
    others."""
    tiles = math.ceil(n / TILE)

    def anchors(t):
        return t * TILE < a1 and (t + 1) * TILE > a0

    if symmetric:
        sides = sum(1 + (i != k) for k in range(tiles) for i in range(k + 1) if anchors(i) or anchors(k))
        pairs = sum(1 for k in range(tiles) for i in range(k + 1) if anchors(i) or anchors(k))
    else:
        keys_of_others = len(range((a0 // TILE) * TILE, min(n, a1), TILE))
        pairs = sum(tiles if anchors(i) else keys_of_others for i in range(tiles))
        sides = pairs
    chunks = sum(math.ceil(min(DV, d - j0) / DVS) for j0 in range(0, d, DV))
    col_blocks = math.ceil(d / DV)
    return pairs * col_blocks * _mmas_per_tile(d, tf32) + sides * chunks * _mv_mmas_per_chunk(tf32)


@pytest.fixture(params=[True, False], ids=["allow_tf32", "3xtf32"])
def tf32(request):
    with allow_tf32(request.param):
        yield request.param


def _check(emu, tf32, n, d, *, kind="labels", normalize=True, temperature=0.3, seed=0, a0=0, a1=None):
    """Runs forward and backward (anchors [a0, a1), all rows by default); checks them
    against the reference; returns the tf32 mma counts of each."""
    z64, g, grad_rows = info_nce_case(emu, n, d, kind, normalize, seed)
    a1 = n if a1 is None else a1
    z = z64.float()
    c0 = emu.emu_ptx_tf32_mma_count()
    rows, lse = emu.info_nce(z, *g.kernel_args(), temperature, normalize, a0, a1)
    c1 = emu.emu_ptx_tf32_mma_count()
    grad = emu.info_nce_backward(grad_rows.float(), z, *g.kernel_args(), lse, temperature, normalize, a0, a1)
    c2 = emu.emu_ptx_tf32_mma_count()
    assert grad.dtype == torch.float32 and grad.shape == (n, d)
    # the yardstick: float64 on the float32 inputs (the tf32 rounding is the kernel's)
    z32 = z.double()
    want_rows, want_grad = info_nce_ref(z32, g, normalize, a0, a1, grad_rows.float().double(), temperature)
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
    assert fwd == tiles * (tiles + 1) // 2 * _mmas_per_tile(d, tf32)
    assert bwd == expected_backward_mmas(n, d, 0, n, tf32, symmetric=True)


# Sizes and anchors off every tile and chunk boundary: D = 65 leaves one column in
# the second chunk, D = 3 skips it, D = 130 makes two column blocks (the second with
# one chunk of 2 columns), D = 200 a second block of two chunks; the SM counts give
# the row-block kernel key splits (and the symmetric one short runs).
BACKWARD_CASES = [
    (130, 65, 0, 130, 0),
    (257, 130, 70, 200, 3),
    (41, 3, 1, 40, 7),
    (129, 200, 63, 66, 40),
    (200, 128, 0, 1, 1),
]


@pytest.mark.filterwarnings("ignore:.*does not have a deterministic implementation")
@pytest.mark.parametrize("path", ["sym", "tile", "deterministic"])
@pytest.mark.parametrize(
    "n,d,a0,a1,sms", BACKWARD_CASES, ids=[f"n{n}-d{d}-a{a0}_{a1}-sm{s}" for n, d, a0, a1, s in BACKWARD_CASES]
)
def test_backward_kernels(emu, tf32, path, n, d, a0, a1, sms):
    """M·U_K and Mᵀ·U_I on tf32 mmas in both backward kernels: sym_grad_kernel (the
    default out of deterministic mode), grad_tile_kernel by PALFAST_INFO_NCE_BACKWARD=tile
    and under torch's deterministic mode (warn_only: label-set graphs' class sums use
    atomics), with partial tiles, anchor ranges, column blocks and key splits."""
    emu.emu_set_sm_count(sms)
    reds = emu.emu_ptx_red_v2_count()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(info_nce_backward_kernel(None if path == "deterministic" else path))
            if path == "deterministic":
                stack.enter_context(deterministic_algorithms(warn_only=True))
            _, bwd = _check(emu, tf32, n, d, kind="semi", a0=a0, a1=a1, seed=n + d)
    finally:
        emu.emu_set_sm_count(0)
    assert bwd == expected_backward_mmas(n, d, a0, a1, tf32, symmetric=path == "sym")
    # The symmetric kernel's adds go two columns a request where D is even; the row-block
    # kernel writes each output once, no atomics.
    assert (emu.emu_ptx_red_v2_count() > reds) == (path == "sym" and d % 2 == 0)


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
    assert fwd == math.ceil(129 / TILE) ** 2 * _mmas_per_tile(100, True)
    assert bwd == expected_backward_mmas(129, 100, 0, 129, True, symmetric=False)
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


@pytest.fixture
def matmul_precision():
    """The float32 matmul precision as it was before the test, restored after it, and the
    per-backend flags torch.set_float32_matmul_precision also writes (without them, their
    "none" comes back as "ieee")."""
    flags = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    before = torch.get_float32_matmul_precision(), [f.fp32_precision for f in flags]
    yield
    torch.set_float32_matmul_precision(before[0])
    for f, value in zip(flags, before[1]):
        f.fp32_precision = value


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
def test_every_way_of_setting_the_flag(emu, set_flag, tf32, matmul_precision):
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
