"""palfast.info_nce's CUDA kernels: against the float64 reference and the CPU kernel.

tests/losses/test_info_nce.py already runs every device-parametrised test on CUDA; this
file adds what only matters there: tile boundaries of the CUDA tiles (64 rows,
D chunks of 16/32 and gradient column blocks of 32/64/128), the tensor-core
float16/bfloat16 path, every kernel path (the symmetric fixed-shift kernels, the
row-block backward of deterministic mode and the online path), the same bits
under deterministic mode, the scaling that keeps float16 gradients of a mean
reduction from flushing to zero, streams, devices, and O(N·D) memory at N = 65536.
Skipped without a GPU.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import palfast
from palfast import reference
from palfast._ops import ops
from palfast.testing import (
    ATOMIC_NONDET_TOL,
    INFO_NCE_KERNEL_PATHS,
    INFO_NCE_ROWS_FLOOR,
    TF32_EPS,
    allow_tf32,
    assert_within_rounding_error,
    deterministic_algorithms,
    info_nce_backward_kernel,
    info_nce_cond,
    info_nce_grad_floor,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CUDA = torch.device("cuda")
KINDS = ["views", "labels", "edges", "semi"]


def _rows_and_grad(z, graph, weights, *, temperature, normalize=True, op=True):
    """Per-row losses (kernel op, or the reference) and d(Σ weights·rows)/dz."""
    z = z.detach().clone().requires_grad_(True)
    if op:
        rows, _ = ops.info_nce(z, *graph.kernel_args(), temperature, normalize, 0, z.shape[0])
    else:
        rows = reference.info_nce(z, graph, temperature=temperature, normalize=normalize, reduction="none")
    (rows.to(weights.dtype) * weights).sum().backward()
    return rows.detach(), z.grad


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 2, 41, 257, 1000])
@pytest.mark.parametrize("d", [3, 127, 128])
@pytest.mark.parametrize("normalize", [True, False])
def test_float64_matches_reference(graph_factory, kind, n, d, normalize):
    torch.manual_seed(n * 7 + d)
    z = torch.randn(n, d, dtype=torch.float64, device=CUDA)
    if not normalize:
        z = z / d**0.5
    g = graph_factory(kind, n, seed=n + d).to(CUDA)
    w = torch.randn(n, dtype=torch.float64, device=CUDA)
    got, got_grad = _rows_and_grad(z, g, w, temperature=0.3, normalize=normalize)
    want, want_grad = _rows_and_grad(z, g, w, temperature=0.3, normalize=normalize, op=False)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-10)


# Sizes straddling the CUDA tiles: 64-row blocks, D chunks of 16 (SIMT) and 32
# (tensor cores), gradient column blocks of 32 (fp64), 64 (fp32) and 128 (16-bit).
@pytest.mark.parametrize("n", [63, 64, 65, 129])
@pytest.mark.parametrize("d", [15, 16, 17, 31, 33, 64, 129, 300])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tile_boundaries_match_cpu_kernel(graph_factory, n, d, dtype):
    torch.manual_seed(n + 1000 * d)
    z = torch.randn(n, d, dtype=dtype)
    g = graph_factory("semi", n, seed=d)
    w = torch.randn(n, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    got, got_grad = _rows_and_grad(z.to(CUDA), g.to(CUDA), w.to(CUDA), temperature=0.2)
    want, want_grad = _rows_and_grad(z, g, w, temperature=0.2)
    exact = dtype == torch.float64
    tol = (1e-10, 1e-10) if exact else (2e-5, 2e-5)
    torch.testing.assert_close(got.cpu(), want, rtol=tol[0], atol=tol[1])
    gtol = (1e-9, 1e-10) if exact else (1e-4, 1e-5)
    torch.testing.assert_close(got_grad.cpu(), want_grad, rtol=gtol[0], atol=gtol[1])


@pytest.mark.parametrize("n", [1, 2, 41, 257, 1000, 4097])
@pytest.mark.parametrize("d", [3, 64, 127, 128, 256])
def test_float32_matches_cpu_kernel_and_reference(graph_factory, n, d):
    torch.manual_seed(n + d)
    z = torch.randn(n, d)
    g = graph_factory("labels", n, seed=n)
    w = torch.randn(n)
    got, got_grad = _rows_and_grad(z.to(CUDA), g.to(CUDA), w.to(CUDA), temperature=0.1)
    cpu, cpu_grad = _rows_and_grad(z, g, w, temperature=0.1)
    torch.testing.assert_close(got.cpu(), cpu, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got_grad.cpu(), cpu_grad, rtol=1e-4, atol=1e-5)
    if n <= 1000:  # the dense float64 reference is N×N
        want, want_grad = _rows_and_grad(
            z.double().to(CUDA), g.to(CUDA), w.double().to(CUDA), temperature=0.1, op=False
        )
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [2, 41, 257, 1000, 4097])
@pytest.mark.parametrize("d", [3, 64, 127, 128, 256])
def test_low_precision_within_rounding_error(graph_factory, dtype, n, d):
    torch.manual_seed(3 * n + d)
    z64 = torch.randn(n, d, dtype=torch.float64, device=CUDA)
    g = graph_factory("semi", n, seed=n).to(CUDA)
    # The floors matter at N = 2, where every row's only key is its positive and the
    # exact loss and gradient are 0; the kernel's are 0 up to the rounding of terms.
    assert_within_rounding_error(
        palfast.info_nce,
        reference.info_nce,
        z64,
        g,
        dtype,
        cond=info_nce_cond(z64, 0.2),
        floor=INFO_NCE_ROWS_FLOOR,
        grad_floor=info_nce_grad_floor(z64, 1.0),
        temperature=0.2,
        reduction="none",
    )


@pytest.mark.filterwarnings("ignore:.*does not have a deterministic implementation")
# Every kernel path on the GPU, as tests/cuda_emu/ runs them on the CPU.
@pytest.mark.parametrize("path", list(INFO_NCE_KERNEL_PATHS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("n", [257, 4097])
@pytest.mark.parametrize("d", [64, 128, 200])
def test_every_kernel_path_within_rounding_error(graph_factory, path, dtype, n, d):
    normalize, temperature, deterministic, backward_kernel = INFO_NCE_KERNEL_PATHS[path]
    torch.manual_seed(5 * n + d)
    z64 = torch.randn(n, d, dtype=torch.float64, device=CUDA)
    if not normalize:
        z64 = z64 / d**0.5  # logits of a few units, as normalised rows give
    g = graph_factory("semi", n, seed=d).to(CUDA)
    # warn_only: the label part of "semi" sums classes with atomics (docs/cuda.md).
    mode = deterministic_algorithms(warn_only=True) if deterministic else contextlib.nullcontext()
    with mode, info_nce_backward_kernel(backward_kernel):
        assert_within_rounding_error(
            palfast.info_nce,
            reference.info_nce,
            z64,
            g,
            dtype,
            cond=info_nce_cond(z64, temperature, normalize),
            floor=INFO_NCE_ROWS_FLOOR,
            grad_floor=info_nce_grad_floor(z64, 1.0, normalize),
            temperature=temperature,
            reduction="none",
            normalize=normalize,
        )


@pytest.mark.filterwarnings("ignore:.*does not have a deterministic implementation")
@pytest.mark.parametrize("path", list(INFO_NCE_KERNEL_PATHS))
@pytest.mark.parametrize("n", [257, 4097])
@pytest.mark.parametrize("d", [64, 128, 200])
def test_float32_allow_tf32_within_tf32_rounding(graph_factory, path, n, d):
    """float32 with TF32 matmuls allowed (allow_tf32): the logits on plain TF32
    tensor cores, held to the rounding rule at TF32_EPS (palfast/testing.py). Without
    the flag (test_every_kernel_path_within_rounding_error) the kernels run 3×TF32."""
    normalize, temperature, deterministic, backward_kernel = INFO_NCE_KERNEL_PATHS[path]
    torch.manual_seed(7 * n + d)
    z64 = torch.randn(n, d, dtype=torch.float64, device=CUDA)
    if not normalize:
        z64 = z64 / d**0.5
    g = graph_factory("semi", n, seed=d).to(CUDA)
    mode = deterministic_algorithms(warn_only=True) if deterministic else contextlib.nullcontext()
    with mode, info_nce_backward_kernel(backward_kernel), allow_tf32(True):
        assert_within_rounding_error(
            palfast.info_nce,
            reference.info_nce,
            z64,
            g,
            torch.float32,
            cond=info_nce_cond(z64, temperature, normalize),
            floor=INFO_NCE_ROWS_FLOOR,
            grad_floor=info_nce_grad_floor(z64, 1.0, normalize),
            eps=TF32_EPS,
            temperature=temperature,
            reduction="none",
            normalize=normalize,
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_deterministic_mode_repeats_bit_for_bit(graph_factory, dtype):
    """Under torch's deterministic mode the backward is the row-block kernel, whose
    gradient is the same bits run after run (docs/cuda.md, "Determinism"). An edge
    graph, as label sets add class sums with atomics."""
    torch.manual_seed(11)
    n = 4097
    z = torch.randn(n, 128, device=CUDA).to(dtype)
    g = graph_factory("edges", n, seed=11).to(CUDA)
    w = torch.randn(n, device=CUDA)
    with deterministic_algorithms():
        first, first_grad = _rows_and_grad(z, g, w, temperature=0.1)
        for _ in range(2):
            rows, grad = _rows_and_grad(z, g, w, temperature=0.1)
            assert torch.equal(rows, first) and torch.equal(grad, first_grad)


@pytest.mark.parametrize("dtype,bound", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_low_precision_mean_gradient_is_not_flushed(graph_factory, dtype, bound):
    """g = 1/N makes many M_ik ~ 1/N² (6e-8 at N = 4097), subnormal in float16.

    The kernel scales M by 2^12/max|g| before rounding it. An emulation of the
    kernel's rounding points gives a relative gradient error of 5e-4 (float16)
    and 2.4e-3 (bfloat16) here, and 4.6e-3 for float16 without the scaling.
    """
    torch.manual_seed(12)
    n, d = 4097, 64
    z64 = torch.randn(n, d, dtype=torch.float64, device=CUDA)
    g = graph_factory("labels", n, seed=2).to(CUDA)
    z = z64.to(dtype).requires_grad_()
    palfast.info_nce(z, g, temperature=0.1).backward()
    z_exact = z.detach().double().requires_grad_()  # same rounded input: only the kernel errs
    reference.info_nce(z_exact, g, temperature=0.1).backward()
    rel = (z.grad.double() - z_exact.grad).norm() / z_exact.grad.norm()
    assert rel < bound, rel.item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_single_row_gives_zero_loss_and_finite_zero_gradient(dtype):
    z = torch.randn(1, 5, device=CUDA, dtype=dtype, requires_grad=True)
    g = palfast.PairGraph.from_views(1, 1).to(CUDA)
    rows, lse = ops.info_nce(z, *g.kernel_args(), 0.1, True, 0, z.shape[0])
    assert rows.item() == 0.0
    assert lse.item() == float("-inf")  # no k ≠ i: an empty log-sum-exp, like the CPU kernel
    rows.sum().backward()
    assert torch.count_nonzero(z.grad) == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_nan_propagates(dtype):
    z = torch.randn(70, 20, device=CUDA, dtype=dtype)
    z[65, 3] = float("nan")  # in the second 64-row block
    rows, lse = ops.info_nce(z, *palfast.PairGraph.from_views(35, 2).to(CUDA).kernel_args(), 0.1, True, 0, 70)
    assert torch.isnan(rows).all()
    assert not torch.isfinite(lse).any()  # NaN (the CPU kernel gives -inf for the NaN row itself)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_no_positives_zero_gradient(dtype):
    z = torch.randn(100, 8, device=CUDA, dtype=dtype, requires_grad=True)
    g = palfast.PairGraph.from_labels(torch.arange(100)).to(CUDA)
    loss = palfast.info_nce(z, g)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(z.grad) == 0


@pytest.mark.parametrize("kind", KINDS + ["dense"])
def test_gradcheck(graph_factory, kind):
    torch.manual_seed(4)
    z = torch.randn(70, 5, dtype=torch.float64, device=CUDA, requires_grad=True)
    g = graph_factory(kind, 70, seed=1).to(CUDA)
    for normalize in (True, False):

        def fn(x, normalize=normalize):
            return palfast.info_nce(x, g, temperature=0.5, normalize=normalize, reduction="none")

        assert torch.autograd.gradcheck(fn, (z,), nondet_tol=ATOMIC_NONDET_TOL)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_opcheck(graph_factory, dtype):
    torch.manual_seed(5)
    z = torch.randn(37, 9, device=CUDA, dtype=dtype, requires_grad=True)
    g = graph_factory("semi", 37).to(CUDA)
    torch.library.opcheck(ops.info_nce.default, (z, *g.kernel_args(), 0.2, True, 0, 37))
    _, lse = ops.info_nce(z.detach(), *g.kernel_args(), 0.2, True, 0, 37)
    grad_rows = torch.randn(37, device=CUDA, dtype=lse.dtype)
    torch.library.opcheck(
        ops.info_nce_backward.default, (grad_rows, z.detach(), *g.kernel_args(), lse, 0.2, True, 0, 37)
    )


def test_non_contiguous_and_side_stream(graph_factory):
    torch.manual_seed(6)
    base = torch.randn(300, 80, device=CUDA)
    z = base[:, ::2]
    g = graph_factory("edges", 300).to(CUDA)
    want = palfast.info_nce(z.contiguous(), g, reduction="none")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = palfast.info_nce(z, g, reduction="none")
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(got, want)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device(graph_factory):
    torch.manual_seed(7)
    z = torch.randn(100, 16)
    g = graph_factory("labels", 100)
    dev = torch.device("cuda", 1)
    got, got_grad = _rows_and_grad(z.to(dev), g.to(dev), torch.ones(100, device=dev), temperature=0.1)
    want, want_grad = _rows_and_grad(z, g, torch.ones(100), temperature=0.1)
    torch.testing.assert_close(got.cpu(), want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got_grad.cpu(), want_grad, rtol=1e-4, atol=1e-5)


def test_large_n_memory_is_linear():
    """N = 65536, D = 128 bfloat16: an N×N matrix would take 16 GiB; we stay O(N·D)."""
    torch.manual_seed(8)
    n, d = 65536, 128
    z = torch.randn(n, d, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    g = palfast.PairGraph.from_views(n // 2, 2).to(CUDA)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    loss = palfast.info_nce(z, g, temperature=0.1)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    assert peak < 256 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    # Spot-check a few rows against the float64 reference on a row subset: row i's
    # loss only needs all keys, so compute it densely for 64 anchors.
    u = torch.nn.functional.normalize(z.detach().double(), dim=1)
    anchors = torch.arange(0, n, n // 64, device=CUDA)
    s = u[anchors] @ u.T / 0.1
    s[torch.arange(64, device=CUDA), anchors] = float("-inf")
    lse = torch.logsumexp(s, dim=1)
    partner = (anchors + n // 2) % n
    want = lse - s[torch.arange(64, device=CUDA), partner]
    rows, _ = ops.info_nce(z.detach(), *g.kernel_args(), 0.1, True, 0, z.shape[0])
    torch.testing.assert_close(rows[anchors].double(), want, rtol=0, atol=0.05)
