"""What the emulator tests share (tests/cuda_emu/test_*.py): the info_nce checks against
palfast.reference and the FA2 forward's tile shape. The emulator itself is built by
build.py and handed to the tests by the ``emu`` fixture of conftest.py."""

from __future__ import annotations

import contextlib
import math

import torch

import palfast
from palfast import reference
from palfast.testing import (
    INFO_NCE_ROWS_FLOOR,
    assert_rounding_close,
    info_nce_cond,
    info_nce_grad_floor,
    views_graph,
)

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
KINDS = ["edges", "labels", "semi", "views"]
TEMPERATURE = 0.3
TOL64 = {"rtol": 1e-10, "atol": 1e-10}
TOL32 = {"rtol": 2e-5, "atol": 2e-5}
TOL32_GRAD = {"rtol": 1e-4, "atol": 1e-5}


def random_graph(kind: str, n: int, seed: int) -> palfast.PairGraph:
    """Weighted asymmetric edges with duplicates and self-loops, labels with -1, or a mix."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "edges":
        e = 3 * n
        src = torch.randint(0, n, (e,), generator=gen)
        dst = torch.randint(0, n, (e,), generator=gen)
        src = torch.cat([src, src[: n // 2]])  # duplicates
        dst = torch.cat([dst, dst[: n // 2]])
        w = torch.rand(src.numel(), generator=gen) * 2
        return palfast.PairGraph.from_edges(src, dst, w, num_nodes=n, symmetric=False)
    if kind == "labels":
        return palfast.PairGraph.from_labels(torch.randint(-1, max(2, n // 5), (n,), generator=gen))
    if kind == "views":
        return views_graph(n)
    # semi: weighted edges plus a label set
    edges = random_graph("edges", n, seed)
    y = torch.randint(-1, 3, (n,), generator=gen)
    return 0.7 * edges + 0.3 * palfast.PairGraph.from_labels(y)


# ------------------------------------------------------------------ info_nce
def info_nce_emu(emu, z, g, normalize, a0, a1, grad_rows):
    rows, lse = emu.info_nce(z, *g.kernel_args(), TEMPERATURE, normalize, a0, a1)
    grad = emu.info_nce_backward(grad_rows.to(rows.dtype), z, *g.kernel_args(), lse, TEMPERATURE, normalize, a0, a1)
    return rows, lse, grad


def info_nce_ref(z, g, normalize, a0, a1, grad_rows, temperature=TEMPERATURE):
    """Rows of the anchors [a0, a1) (0 elsewhere) and d(Σ grad_rows·rows)/dz, in z's dtype."""
    z = z.detach().clone().requires_grad_(True)
    rows = reference.info_nce(z, g, temperature=temperature, normalize=normalize, reduction="none")
    anchor = torch.zeros(z.shape[0], dtype=torch.bool)
    anchor[a0:a1] = True
    rows = torch.where(anchor, rows, torch.zeros_like(rows))
    (rows * grad_rows.to(rows.dtype)).sum().backward()
    return rows.detach(), z.grad


def rounded(z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """z rounded to dtype, back in float64: the inputs of the rounding rule's yardstick."""
    return z.to(dtype).double()


def info_nce_case(emu, n, d, kind, normalize, seed):
    """z64 [n, d] (rows of norm about 1 without normalize), a `kind` graph and grad_rows,
    all from `seed`, which also seeds the emulator's schedule."""
    torch.manual_seed(seed)
    emu.emu_set_seed(seed)
    z64 = torch.randn(n, d, dtype=torch.float64)
    if not normalize:
        z64 = z64 / d**0.5
    return z64, random_graph(kind, n, seed), torch.randn(n, dtype=torch.float64)


def check_info_nce(emu, dtype, n, d, kind, normalize, a0, a1, seed):
    z64, g, grad_rows = info_nce_case(emu, n, d, kind, normalize, seed)
    rows, lse, grad = info_nce_emu(emu, z64.to(dtype), g, normalize, a0, a1, grad_rows)
    assert grad.dtype == dtype and grad.shape == (n, d)
    outside = torch.ones(n, dtype=torch.bool)
    outside[a0:a1] = False
    assert (rows[outside] == 0).all() and torch.isinf(lse[outside]).all()
    want_rows, want_grad = info_nce_ref(z64, g, normalize, a0, a1, grad_rows)
    if dtype == torch.float64:
        torch.testing.assert_close(rows, want_rows, **TOL64)
        torch.testing.assert_close(grad, want_grad, **TOL64)
    elif dtype == torch.float32:
        torch.testing.assert_close(rows.double(), want_rows, **TOL32)
        torch.testing.assert_close(grad.double(), want_grad, **TOL32_GRAD)
    else:
        exact_rows, exact_grad = info_nce_ref(rounded(z64, dtype), g, normalize, a0, a1, grad_rows)
        cond = info_nce_cond(z64, TEMPERATURE, normalize)
        assert_rounding_close(rows, exact_rows, dtype, cond=cond, floor=INFO_NCE_ROWS_FLOOR, what="rows")
        assert_rounding_close(
            grad, exact_grad, dtype, cond=cond, what="gradient", floor=info_nce_grad_floor(z64, grad_rows, normalize)
        )


# Fa2Forward in csrc/cuda/info_nce/info_nce_fa2.cuh: 128-row tiles of 4 warps of 32 rows
# (2 m16 tiles each), key tiles streamed in halves of 64 rows (8 n8 tiles each),
# D in steps of 16 (mma.m16n8k16), up to 128.
TILE, KEY_ROWS, WARPS, M_TILES, N8_TILES, K_STEP, MAX_D = 128, 64, 4, 2, 8, 16, 128


def expected_forward_mmas(n: int, d: int, a0: int, a1: int) -> int:
    """Warp-level mmas of one FA2 forward: every tile pair I ≤ K with an anchor row in
    I or K, for each key half of K with a row < n, 4 warps × 2 m16 tiles ×
    ceil(D/16) k-steps × 8 n8 tiles; none when D > 128."""
    if d > MAX_D:
        return 0
    tiles = math.ceil(n / TILE)

    def anchors(t):
        return t * TILE < a1 and (t + 1) * TILE > a0

    def halves_in_n(k):
        halves = range(k * TILE // KEY_ROWS, (k + 1) * TILE // KEY_ROWS)
        return sum(h * KEY_ROWS < n for h in halves)

    halves = sum(halves_in_n(k) for i in range(tiles) for k in range(i, tiles) if anchors(i) or anchors(k))
    return halves * WARPS * M_TILES * math.ceil(d / K_STEP) * N8_TILES


def expected_row_backward_mmas(n: int, d: int, a0: int, a1: int) -> int:
    """Warp-level mmas of one fa2_row_grad_kernel backward: every 128-row query tile
    walks the key halves (64 rows) with a row < n, or, without anchor rows, those
    holding anchors; per half 4 warps × 4 key steps of 16 × (S + M·U_K) × 2 m16
    tiles × 2 n8 tiles × ceil(D/16); none when D > 128."""
    if d > MAX_D:
        return 0
    halves = 0
    for q in range(math.ceil(n / TILE)):
        lo, hi = 0, math.ceil(n / KEY_ROWS)
        if not (q * TILE < a1 and (q + 1) * TILE > a0):
            lo, hi = max(lo, a0 // KEY_ROWS), min(hi, math.ceil(a1 / KEY_ROWS))
        halves += max(0, hi - lo)
    key_steps = KEY_ROWS // K_STEP
    return halves * WARPS * key_steps * 2 * M_TILES * 2 * math.ceil(d / K_STEP)


@contextlib.contextmanager
def emulated_sms(emu, sms: int):
    """The emulated GPU has `sms` SMs inside the block (0: the default, an H200's 132)."""
    emu.emu_set_sm_count(sms)
    try:
        yield
    finally:
        emu.emu_set_sm_count(0)
