"""palfast's CUDA kernels, executed on the CPU by the emulator in tests/cuda_emu.

The real csrc/cuda/**/*.cu files are compiled with the host compiler against a
shim of the CUDA built-ins (threads of a block as fibers with a seeded random
scheduler, real barriers, warp shuffles in step, RNE 16-bit types, WMMA with
the PTX fragment layouts) and registered as torch.ops.palfast_emu.* for CPU
tensors. Every CUDA op is checked here against palfast.reference in float64,
float32, bfloat16 and float16 (16-bit: the rounding rule of palfast/testing.py,
assert_rounding_close, against float64 on the same rounded inputs).
The first run compiles the emulator (cached under build/cuda_emu by content
hash); skipped only when there is no C++ compiler.
"""

from __future__ import annotations

import math

import pytest
import torch

import palfast
from palfast import reference
from palfast.testing import (
    INFO_NCE_ROWS_FLOOR,
    assert_rounding_close,
    info_nce_cond,
    info_nce_grad_floor,
)

from cuda_emu.common import (
    DTYPES,
    KINDS,
    TEMPERATURE,
    TOL64,
    check_info_nce,
    info_nce_emu,
    random_graph,
    rounded,
)

# float tolerances: CI runs these again under a second CPU capability (.ci/run)
pytestmark = [pytest.mark.numeric, pytest.mark.slow]

NS = [1, 2, 63, 65, 130]
DS = [3, 64, 136]


def _case(i: int):
    """Graph kind and normalize for the i-th size, so every dtype sees every combination."""
    return KINDS[i % len(KINDS)], (i // len(KINDS)) % 2 == 0


SIZES = [(n, d) for n in NS for d in DS]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("i", range(len(SIZES)), ids=[f"n{n}-d{d}" for n, d in SIZES])
def test_info_nce_matches_reference(emu, dtype, i):
    n, d = SIZES[i]
    kind, normalize = _case(i)
    check_info_nce(emu, dtype, n, d, kind, normalize, 0, n, seed=100 + i)


# Anchor ranges whose start is not a multiple of the 64-row tiles, in every
# dtype: the backward recomputes the forward's S, which must agree bit for bit.
ANCHORS = [(1, 130), (5, 70), (65, 66), (70, 129)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("a0,a1", ANCHORS)
@pytest.mark.parametrize("kind", ["semi", "labels"])
def test_info_nce_anchor_range(emu, dtype, a0, a1, kind):
    check_info_nce(emu, dtype, 130, 64, kind, kind == "semi", a0, a1, seed=a0 * 7 + a1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("a0,a1", [(0, 257), (70, 200)])
@pytest.mark.parametrize("sms", [1, 7])
def test_info_nce_grids_sized_for_few_sms(emu, dtype, a0, a1, sms):
    """The grids of csrc/cuda/info_nce_*.cu are sized for the GPU's SMs (the default
    132 gives one tile per region and per key split at these N). With one emulated
    SM, 257 rows give the symmetric forward 3 regions of 2 tiles of 64 rows (4 of
    32 in fp64): region pairs of several tile pairs, some diagonal, the last region
    cut short. The backward's grids at few SMs: tests/cuda_emu/test_backward.py."""
    emu.emu_set_sm_count(sms)
    try:
        check_info_nce(emu, dtype, 257, 24, "semi", True, a0, a1, seed=a0 + a1)
    finally:
        emu.emu_set_sm_count(0)


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_info_nce_several_schedules(emu, seed):
    check_info_nce(emu, torch.bfloat16, 130, 136, "semi", True, 3, 130, seed=seed)
    check_info_nce(emu, torch.float32, 130, 136, "labels", True, 3, 130, seed=seed)


# The fixed-shift softmax (csrc/cuda/info_nce/info_nce.cuh, use_fixed_shift) runs for
# normalize=True while 2·log2(e)/τ ≤ 112 (fp32 accumulation) or 1000 (fp64); the
# online (max, sum) path runs below that τ.
FIXED_SHIFT_MIN_TAU = {torch.float32: 2 * math.log2(math.e) / 112, torch.float64: 2 * math.log2(math.e) / 1000}


def _near_antipodal(n: int, d: int, dtype) -> torch.Tensor:
    """Row 0 near v, rows 1.. near −v: row 0's terms are all about e^(−2/τ), the
    smallest a fixed-shift row sum can be (the bound's worst case)."""
    v = torch.randn(d, dtype=torch.float64)
    z = -v.expand(n, d).clone()
    z[0] = v
    return (z + 1e-2 * torch.randn(n, d, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("side", [1.02, 0.98, 0.85, 0.5])
def test_info_nce_fixed_shift_bound(emu, dtype, side):
    """Both sides of the fixed-shift bound, on rows whose sums are as small as they
    get: at τ above it every term is a normal float, below it the online path takes
    over. A bound that let the fixed shift run at smaller τ fails here: at 0.85·bound its
    terms are subnormal and a_i = g_i/Σ_i overflows fp32 (an inf gradient), at
    0.5·bound they underflow to a zero sum (lse −inf)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tau = side * FIXED_SHIFT_MIN_TAU[acc]
    torch.manual_seed(int(side * 100))
    emu.emu_set_seed(int(side * 100))
    n, d = 6, 20
    z64 = _near_antipodal(n, d, torch.float64)
    g = random_graph("edges", n, seed=3)
    # A loss-scaled gradient (2^20, as from a GradScaler) for fp32/fp64: a_i = g_i/Σ_i
    # must not overflow; 16-bit gradients of that size would overflow the dtype itself.
    scale = 1.0 if dtype in (torch.float16, torch.bfloat16) else 2.0**20
    grad_rows = scale * torch.rand(n, dtype=torch.float64)

    def ref(z):
        z = z.detach().clone().requires_grad_(True)
        rows = reference.info_nce(z, g, temperature=tau, normalize=True, reduction="none")
        (rows * grad_rows.to(rows.dtype)).sum().backward()
        return rows.detach(), z.grad

    z = z64.to(dtype)
    rows, lse = emu.info_nce(z, *g.kernel_args(), tau, True, 0, n)
    grad = emu.info_nce_backward(grad_rows.to(rows.dtype), z, *g.kernel_args(), lse, tau, True, 0, n)
    assert torch.isfinite(lse).all() and torch.isfinite(grad.double()).all()
    # s = c/τ is large here (up to 1/τ ≈ 160 in fp32), so the kernel loses about
    # |s|·eps: judged against the largest value (fp64) or by the rounding rule, whose
    # condition 1 + 1/τ says so, against float64 on z's rounded values.
    want_rows, want_grad = ref(z.double())
    floors = {"rows": INFO_NCE_ROWS_FLOOR, "gradient": info_nce_grad_floor(z64, grad_rows)}
    for got, want, what in ((rows, want_rows, "rows"), (grad, want_grad, "gradient")):
        if dtype == torch.float64:
            top = want.abs().max()
            torch.testing.assert_close(got / top, want / top, rtol=0, atol=1e-10)
        else:
            assert_rounding_close(got, want, dtype, cond=info_nce_cond(z64, tau), floor=floors[what], what=what)


def test_info_nce_single_row_lse_is_minus_inf(emu):
    """N = 1: every lane merges (−inf, 0) pairs; lse must be −inf, not NaN."""
    for dtype in DTYPES:
        z = torch.randn(1, 8).to(dtype)
        g = palfast.PairGraph.from_views(1, 1)
        rows, lse, grad = info_nce_emu(emu, z, g, True, 0, 1, torch.ones(1))
        assert lse.item() == float("-inf") and rows.item() == 0
        assert torch.isfinite(grad.double()).all()


def test_info_nce_rejects_class_ids_out_of_range(emu):
    g = palfast.PairGraph.from_labels(torch.tensor([0, 1, 2, 2, -1]))
    args = list(g.kernel_args())
    args[8] = [2]  # label_classes says 2 classes, but id 2 is present
    z = torch.randn(5, 4)
    with pytest.raises(
        ValueError,
        match=r"palfast.info_nce: graph.labels\[0\] must hold class ids "
        r"in \[-1, label_classes = 2\)",
    ):
        emu.info_nce(z, *args, TEMPERATURE, True, 0, 5)
    args[6] = torch.tensor([[0, 1, -2, 0, 1]])
    args[8] = [3]
    with pytest.raises(ValueError, match=r"got values in \[-2, 1\]"):
        emu.info_nce(z, *args, TEMPERATURE, True, 0, 5)


def test_edge_indices_out_of_range(emu):
    g = random_graph("edges", 6, seed=0)
    args = list(g.kernel_args())
    args[1] = args[1].clone()
    args[1][0] = 6
    with pytest.raises(ValueError, match=r"graph.indices must be in \[0, N = 6\)"):
        emu.graph_spmm(torch.randn(6, 3), *args, False)


def test_float_atomics_alert_in_deterministic_mode(emu):
    z = torch.randn(20, 8)
    labels = random_graph("labels", 20, seed=0)
    edges = random_graph("edges", 20, seed=0)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        emu.info_nce(z, *edges.kernel_args(), TEMPERATURE, True, 0, 20)  # CSR only: deterministic
        for call in (
            lambda: emu.info_nce(z, *labels.kernel_args(), TEMPERATURE, True, 0, 20),
            lambda: emu.graph_spmm(z, *labels.kernel_args(), False),
            lambda: emu.graph_dirichlet(z, *labels.kernel_args()),
        ):
            with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
                call()
    finally:
        torch.use_deterministic_algorithms(before)


# ------------------------------------------------------ graph_spmm, graph_dirichlet


def _check_close(got, want64, dtype, exact=None, floor=0.0):
    """fp64 and fp32 against float64 on the unrounded inputs; 16-bit by the rounding
    rule against `exact`, float64 on the rounded inputs, whose terms are `floor` large."""
    if dtype == torch.float64:
        torch.testing.assert_close(got, want64, **TOL64)
    elif dtype == torch.float32:
        torch.testing.assert_close(got.double(), want64, rtol=2e-5, atol=1e-4)
    else:
        assert_rounding_close(got, exact, dtype, floor=floor)


GRAPH_SIZES = [(n, d) for n in NS for d in (3, 136)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("i", range(len(GRAPH_SIZES)), ids=[f"n{n}-d{d}" for n, d in GRAPH_SIZES])
def test_graph_spmm_matches_reference(emu, dtype, i):
    n, d = GRAPH_SIZES[i]
    kind = KINDS[i % 3]  # edges, labels, semi
    emu.emu_set_seed(i)
    torch.manual_seed(i)
    x64 = torch.randn(n, d, dtype=torch.float64)
    g = random_graph(kind, n, seed=i)
    W = g.to_dense(torch.float64)
    for transpose in (False, True):
        got = emu.graph_spmm(x64.to(dtype), *g.kernel_args(), transpose)
        assert got.dtype == dtype
        Wt = W.T if transpose else W
        # Σ_j w_ij x_j cancels: the terms' size Σ_j |w_ij x_j| is the scale.
        x = rounded(x64, dtype)
        _check_close(got, Wt @ x64, dtype, Wt @ x, floor=(Wt.abs() @ x.abs()).max().item())


def _dirichlet_ref(z, g):
    W = g.to_dense(torch.float64).to(z.dtype)
    return (W * reference._pairwise_sq_dist(z)).sum()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("i", range(len(GRAPH_SIZES)), ids=[f"n{n}-d{d}" for n, d in GRAPH_SIZES])
def test_graph_dirichlet_matches_reference(emu, dtype, i):
    n, d = GRAPH_SIZES[i]
    kind = KINDS[i % 3]
    emu.emu_set_seed(i)
    torch.manual_seed(i)
    z64 = torch.randn(n, d, dtype=torch.float64)
    g = random_graph(kind, n, seed=i)
    grad = torch.tensor(0.7, dtype=torch.float64)
    got = emu.graph_dirichlet(z64.to(dtype), *g.kernel_args())
    got_grad = emu.graph_dirichlet_backward(grad.to(got.dtype), z64.to(dtype), *g.kernel_args())
    assert got_grad.dtype == dtype

    def ref(z):
        z = z.detach().clone().requires_grad_(True)
        out = _dirichlet_ref(z, g)
        (out * grad.to(out.dtype)).backward()
        return out.detach(), z.grad

    want, want_grad = ref(z64)
    exact, exact_grad = ref(rounded(z64, dtype))
    scale = max(1.0, want.abs().item())
    # The gradient 2·0.7·Σ_j (w_ij + w_ji)(z_i − z_j) cancels: its terms' size is the scale.
    sym = g.to_dense(torch.float64)
    sym = sym + sym.T
    z = rounded(z64, dtype).abs()
    terms = 2 * grad.item() * (sym @ z + sym.sum(1, keepdim=True) * z).max().item()
    if dtype == torch.float32:
        torch.testing.assert_close(got.double() / scale, want / scale, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(got_grad.double(), want_grad, rtol=2e-5, atol=1e-4)
    else:
        _check_close(got, want, dtype, exact)
        _check_close(got_grad, want_grad, dtype, exact_grad, floor=terms)


def test_emulator_ran_threads(emu):
    before = emu.emu_switches()
    emu.info_nce(torch.randn(70, 20), *random_graph("semi", 70, 0).kernel_args(), TEMPERATURE, True, 0, 70)
    assert emu.emu_switches() > before  # fibers met at barriers: not a serial loop


# ------------------------------------------------------ the emulator itself
def test_emulator_missing_barrier_reads_stale_shared_memory(emu):
    wrong = []
    for seed in range(3):
        emu.emu_set_seed(seed)
        assert emu.emu_selftest_neighbour_reads_wrong(True) == 0
        wrong.append(emu.emu_selftest_neighbour_reads_wrong(False))
    assert min(wrong) > 0, wrong


def test_emulator_rejects_shuffle_with_exited_lanes(emu):
    with pytest.raises(RuntimeError, match="exited"):
        emu.emu_selftest_half_warp_shuffle()


def test_emulator_wmma_fragment_layouts(emu):
    assert emu.emu_selftest_mma_max_error() == 0


@pytest.mark.parametrize(
    "x", [1 + 2**-11, 1 + 3 * 2**-11, 65504.0, 65520.0, 2**-24, 3 * 2**-25, -0.0, 1e-9, float("inf"), 1 / 3]
)
def test_emulator_16_bit_rounding_matches_torch(emu, x):
    as_bits = lambda t: int(t.view(torch.int16).item()) & 0xFFFF
    assert emu.emu_selftest_half_bits(x) == as_bits(torch.tensor(x, dtype=torch.float32).half())
    assert emu.emu_selftest_bfloat16_bits(x) == as_bits(torch.tensor(x).bfloat16())
