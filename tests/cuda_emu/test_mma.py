"""The warp-level primitives of csrc/cuda/mma.cuh (ldmatrix, mma.sync m16n8k16 and
m16n8k8 tf32, cvt.rna.tf32.f32, cp.async) under the CPU emulator, against the PTX ISA's per-lane layouts written
out here from the ISA's figures ("Matrix Fragments for mma.m16n8k16", ldmatrix),
against plain matmuls in float64 and plain copies.

The test kernels are in tests/cuda_emu/mma_ops.cpp; the emulator and its build
are those of tests/cuda_emu/conftest.py (one build for every emulator test).
"""

from __future__ import annotations

import pytest
import torch

# the emulator tests are the suite's slowest (make test-fast leaves them out)
pytestmark = pytest.mark.slow

WARP = 32
LANES = torch.arange(WARP)
G, T = LANES // 4, LANES % 4  # groupID and threadID_in_group of the PTX ISA
BF16_FP16 = [torch.bfloat16, torch.float16]


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The 16-bit patterns of a 16-bit tensor, as int64 in [0, 2^16)."""
    return x.contiguous().view(torch.int16).long() & 0xFFFF


def _pack(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Two 16-bit patterns per register, lo in the low half (as int32, like the op's output)."""
    word = lo | (hi << 16)
    return (word - ((hi >= 0x8000).long() << 32)).int()  # the same 32 bits, signed


# ------------------------------------------------------------------ ldmatrix
@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("cols", [8, 16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ldmatrix_x4_lane_layout(emu, trans, cols, seed):
    """Lane l gives the address of row l % 8 of matrix l / 8 (any row of the buffer:
    random here) and receives elements (g, 2t..2t+1) of each matrix, or (2t..2t+1, g)
    transposed: checked on distinct random bit patterns, so a swapped lane, matrix
    or half is seen."""
    gen = torch.Generator().manual_seed(seed)
    rows = 64
    x = torch.randint(-(2**15), 2**15, (rows, cols), generator=gen, dtype=torch.int64).to(torch.int16)
    lane_rows = torch.randperm(rows, generator=gen)[:WARP]
    got = emu.emu_ptx_ldmatrix(x, lane_rows, trans, WARP)
    xb = x.long() & 0xFFFF
    want = torch.empty(WARP, 4, dtype=torch.int32)
    for m in range(4):
        if trans:
            lo = xb[lane_rows[8 * m + 2 * T], G]
            hi = xb[lane_rows[8 * m + 2 * T + 1], G]
        else:
            lo = xb[lane_rows[8 * m + G], 2 * T]
            hi = xb[lane_rows[8 * m + G], 2 * T + 1]
        want[:, m] = _pack(lo, hi)
    assert torch.equal(got, want)


def test_ldmatrix_needs_every_lane(emu):
    """A warp-collective: lanes 16..31 have returned, so the others wait on them: an error."""
    x = torch.zeros(64, 8, dtype=torch.int16)
    with pytest.raises(RuntimeError, match="exited"):
        emu.emu_ptx_ldmatrix(x, torch.arange(WARP), False, 16)


# ------------------------------------------------------------------ mma.sync
def _fragments(a: torch.Tensor, b: torch.Tensor):
    """Per-lane registers of A (16×16) and B (16×8, k × n) by the PTX ISA figures."""
    ab, bb = _bits(a), _bits(b)
    ra = torch.empty(WARP, 4, dtype=torch.int32)
    for i in range(4):
        row, col = G + 8 * (i % 2), 2 * T + 8 * (i // 2)
        ra[:, i] = _pack(ab[row, col], ab[row, col + 1])
    rb = torch.empty(WARP, 2, dtype=torch.int32)
    for i in range(2):
        k = 2 * T + 8 * i
        rb[:, i] = _pack(bb[k, G], bb[k + 1, G])
    return ra, rb


def _c_lanes(c: torch.Tensor) -> torch.Tensor:
    """C/D (16×8) per lane: c[0..1] = (g, 2t..2t+1), c[2..3] = (g + 8, 2t..2t+1)."""
    return torch.stack([c[G + 8 * (e // 2), 2 * T + e % 2] for e in range(4)], dim=1)


@pytest.mark.parametrize("dtype", BF16_FP16, ids=str)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mma_m16n8k16_matches_matmul(emu, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(16, 16, generator=gen).to(dtype)
    b = torch.randn(16, 8, generator=gen).to(dtype)
    c = torch.randn(16, 8, generator=gen)
    ra, rb = _fragments(a, b)
    got = emu.emu_ptx_mma(ra, rb, _c_lanes(c), dtype == torch.bfloat16, WARP)
    want = a.double() @ b.double() + c.double()
    # fp32 accumulation of 16 exact products: a few fp32 units of the terms' size.
    bound = 2.0**-20 * (a.double().abs() @ b.double().abs() + c.double().abs())
    err = (got.double() - _c_lanes(want)).abs()
    assert (err <= _c_lanes(bound)).all(), err.max()


@pytest.mark.parametrize("dtype", BF16_FP16, ids=str)
def test_mma_m16n8k16_exact_on_integers(emu, dtype):
    """Small integers: every product and sum is exact, so D must equal A·B + C bit for bit."""
    gen = torch.Generator().manual_seed(7)
    a = torch.randint(-8, 9, (16, 16), generator=gen).to(dtype)
    b = torch.randint(-8, 9, (16, 8), generator=gen).to(dtype)
    c = torch.randint(-100, 101, (16, 8), generator=gen).float()
    ra, rb = _fragments(a, b)
    got = emu.emu_ptx_mma(ra, rb, _c_lanes(c), dtype == torch.bfloat16, WARP)
    assert torch.equal(got, _c_lanes(a.float() @ b.float() + c))


def test_mma_needs_every_lane(emu):
    ra = torch.zeros(WARP, 4, dtype=torch.int32)
    rb = torch.zeros(WARP, 2, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="exited"):
        emu.emu_ptx_mma(ra, rb, torch.zeros(WARP, 4), True, WARP - 1)


@pytest.mark.parametrize("dtype", BF16_FP16, ids=str)
@pytest.mark.parametrize("b_kn", [False, True], ids=["b_nk", "b_kn"])
@pytest.mark.parametrize("k,n", [(16, 16), (32, 48), (64, 64)])
def test_ldmatrix_mma_gemm(emu, dtype, b_kn, k, n):
    """The pattern of the kernels: fragments by ldmatrix (.trans for a [K, N] B), then
    mma, against a float64 matmul."""
    gen = torch.Generator().manual_seed(k + n)
    a = torch.randn(16, k, generator=gen).to(dtype)
    b = torch.randn(n, k, generator=gen).to(dtype)
    got = emu.emu_ptx_gemm(a, b.T.contiguous() if b_kn else b, b_kn)
    want = a.double() @ b.double().T
    bound = k * 2.0**-23 * (a.double().abs() @ b.double().abs().T)
    assert ((got.double() - want).abs() <= bound).all()


# ------------------------------------------------------------------ tf32
TF32_DROPPED = 13  # fp32 mantissa bits that tf32 drops (23 - 10)


def _tf32_rna(x: torch.Tensor) -> torch.Tensor:
    """cvt.rna.tf32.f32 written from its definition, in float64: the nearest value with
    10 mantissa bits, ties away from zero (finite inputs; the exponent from frexp)."""
    xd = x.double()
    _, e = torch.frexp(xd)  # |x| = m·2^e, m in [0.5, 1): the last kept bit is 2^(e - 11)
    ulp = torch.ldexp(torch.ones_like(xd), e - 11)
    r = torch.floor(xd.abs() / ulp + 0.5) * ulp  # ties away: + 0.5 then floor on |x|
    return torch.where(xd == 0, xd, torch.copysign(r, xd)).float()


def _f32_bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


def test_cvt_rna_tf32(emu):
    """Round to nearest, ties away from zero, on random values, exact ties (half a tf32
    unit above a tf32 value, both signs), values rounding up into the next binade, and
    inf/NaN unchanged."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=gen) * torch.exp2(torch.randint(-60, 60, (4096,), generator=gen).float())
    base = _tf32_rna(torch.randn(64, generator=gen))
    half_ulp = torch.ldexp(torch.ones(64), torch.frexp(base)[1] - 12)
    ties = torch.cat([base + half_ulp * torch.sign(base), -(base + half_ulp * torch.sign(base))])
    near_two = torch.tensor([1.99999, -1.99999, 0.0, -0.0, 1.0, 2.0**-126, 3.4e38])
    finite = torch.cat([x, ties, near_two])
    got = emu.emu_ptx_cvt_tf32(finite).view(torch.float32)
    assert torch.equal(_f32_bits(got), _f32_bits(_tf32_rna(finite)))
    assert (_f32_bits(got) & ((1 << TF32_DROPPED) - 1) == 0).all()
    # ties go away from zero: |rounded| > |x|
    gt = emu.emu_ptx_cvt_tf32(ties).view(torch.float32)
    assert (gt.abs() > ties.abs()).all()
    special = torch.tensor([float("inf"), float("-inf"), float("nan")])
    got = emu.emu_ptx_cvt_tf32(special).view(torch.float32)
    assert torch.isinf(got[:2]).all() and got[0] > 0 > got[1] and torch.isnan(got[2])


def _tf32_fragments(a: torch.Tensor, b: torch.Tensor):
    """Per-lane registers of A (16×8) and B (8×8, k × n) by the PTX ISA's m16n8k8 .tf32
    figures: a[i] = (g + 8·(i % 2), t + 4·(i / 2)), b[i] = (k t + 4·i, n g)."""
    ra = torch.stack([a[G + 8 * (i % 2), T + 4 * (i // 2)] for i in range(4)], dim=1)
    rb = torch.stack([b[T + 4 * i, G] for i in range(2)], dim=1)
    return _f32_bits(ra), _f32_bits(rb)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mma_m16n8k8_tf32_matches_matmul(emu, seed):
    """D = A·B + C against a float64 matmul of the tf32-rounded operands: every lane's
    four elements in the ISA's places (distinct random values, so a swapped register or
    lane is seen); the low 13 bits of the operands are ignored (here set to garbage)."""
    gen = torch.Generator().manual_seed(seed)
    a = _tf32_rna(torch.randn(16, 8, generator=gen))
    b = _tf32_rna(torch.randn(8, 8, generator=gen))
    c = torch.randn(16, 8, generator=gen)
    ra, rb = _tf32_fragments(a, b)
    junk = torch.randint(0, 1 << TF32_DROPPED, ra.shape, generator=gen, dtype=torch.int32)
    got = emu.emu_ptx_mma_tf32(ra | junk, rb | junk[:, :2], _c_lanes(c))
    want = a.double() @ b.double() + c.double()
    # fp32 accumulation of 8 exact products: a few fp32 units of the terms' size.
    bound = 2.0**-20 * (a.double().abs() @ b.double().abs() + c.double().abs())
    err = (got.double() - _c_lanes(want)).abs()
    assert (err <= _c_lanes(bound)).all(), err.max()


def test_mma_m16n8k8_tf32_exact_on_integers(emu):
    """Small integers: D must equal A·B + C bit for bit; counted as one tf32 mma."""
    gen = torch.Generator().manual_seed(7)
    a = torch.randint(-8, 9, (16, 8), generator=gen).float()
    b = torch.randint(-8, 9, (8, 8), generator=gen).float()
    c = torch.randint(-100, 101, (16, 8), generator=gen).float()
    ra, rb = _tf32_fragments(a, b)
    before = emu.emu_ptx_tf32_mma_count()
    got = emu.emu_ptx_mma_tf32(ra, rb, _c_lanes(c))
    assert emu.emu_ptx_tf32_mma_count() - before == 1
    assert torch.equal(got, _c_lanes(a @ b + c))


# ------------------------------------------------------------------ cp.async
CP_THREADS = 64
POISON = 0xFF  # a copy's destination from its start until its wait (tests/cuda_emu/cuda_emu.h)


def _cp_async_case(seed: int):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(0, 256, (2 * CP_THREADS * 16,), generator=gen, dtype=torch.uint8)
    src_bytes = torch.randint(0, 17, (2 * CP_THREADS,), generator=gen)
    src_bytes[:3] = torch.tensor([0, 16, 1])
    copied = src.view(-1, 16).clone()
    copied[torch.arange(16) >= src_bytes[:, None]] = 0  # zero fill past src_bytes
    return src, src_bytes, copied


@pytest.mark.parametrize("pending", [0, 1, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_cp_async_lands_at_wait(emu, pending, seed):
    """Thread i copies chunk i (group 1), then chunk 64 + i (group 2), waits until
    `pending` groups remain and, after a barrier, reads its neighbour's chunks.
    Copied chunks hold the first src_bytes bytes of src, then zeros; a group not yet
    waited for is not there: neither the data nor the old contents (0xAB), but
    poison, so a read before the wait goes wrong."""
    emu.emu_set_seed(seed)
    src, src_bytes, copied = _cp_async_case(seed)
    got = emu.emu_ptx_cp_async(src, src_bytes, pending, True).view(-1, 16)
    poison = torch.full((CP_THREADS, 16), POISON, dtype=torch.uint8)
    group1 = copied[:CP_THREADS] if pending < 2 else poison
    group2 = copied[CP_THREADS:] if pending < 1 else poison
    assert torch.equal(got, torch.cat([group1, group2]))


def test_cp_async_never_waited_is_an_error(emu):
    src, src_bytes, _ = _cp_async_case(0)
    with pytest.raises(RuntimeError, match="never waited"):
        emu.emu_ptx_cp_async(src, src_bytes, 1, False)
