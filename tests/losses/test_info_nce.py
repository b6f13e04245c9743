"""palfast.info_nce against the float64 reference, its gradients, and its contract."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import palfast
from palfast import reference
from palfast._ops import ops
from palfast.testing import (
    ATOMIC_NONDET_TOL,
    KINDS,
    assert_compile_matches_eager,
    assert_constant_with_zero_gradient,
    assert_gradcheck_every_kind,
    assert_rounding_close,
    assert_rows_match_float64,
    assert_within_rounding_error,
    info_nce_cond,
)

# float tolerances: CI runs these again under a second CPU capability (.ci/run)
pytestmark = pytest.mark.numeric


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,d", [(1, 3), (2, 3), (41, 127), (257, 3), pytest.param(1000, 127, marks=pytest.mark.slow)])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_reference_float64(seeded_inputs, kind, n, d, normalize):
    z, g = seeded_inputs(kind, n, d)
    if not normalize:
        z = z / d**0.5  # keep raw dot products / τ in a sane range
    assert_rows_match_float64(
        palfast.info_nce, reference.info_nce, z, g, temperature=0.3, normalize=normalize, reduction="none"
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["views", "labels", "edges"])
def test_reductions_float32(device, graph_factory, reduction, kind):
    torch.manual_seed(7)
    n, d = 300, 64
    z = torch.randn(n, d, device=device)
    g = graph_factory(kind, n, seed=3).to(device)
    z1, z2 = z.clone().requires_grad_(), z.double().requires_grad_()
    got = palfast.info_nce(z1, g, temperature=0.1, reduction=reduction)
    want = reference.info_nce(z2, g, temperature=0.1, reduction=reduction)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(z1.grad.double(), z2.grad, rtol=1e-4, atol=1e-5)


def test_gradcheck(device, graph_factory):
    torch.manual_seed(3)
    z = torch.randn(13, 5, dtype=torch.float64, device=device, requires_grad=True)
    assert_gradcheck_every_kind(
        lambda x, g: palfast.info_nce(x, g, temperature=0.5, reduction="none"),
        z,
        graph_factory,
        nondet_tol=ATOMIC_NONDET_TOL,
    )


@pytest.mark.slow
def test_opcheck(device, graph_factory):
    torch.manual_seed(4)
    z = torch.randn(37, 9, device=device, requires_grad=True)
    g = graph_factory("semi", 37).to(device)
    args = (z, *g.kernel_args(), 0.2, True, 0, 37)
    torch.library.opcheck(ops.info_nce.default, args)
    _, lse = ops.info_nce(z.detach(), *args[1:])
    grad_rows = torch.randn(37, device=device)
    torch.library.opcheck(
        ops.info_nce_backward.default, (grad_rows, z.detach(), *g.kernel_args(), lse, 0.2, True, 0, 37)
    )


def test_two_view_form_is_nt_xent(device):
    """InfoNCELoss()(z_a, z_b) equals NT-Xent (pytorch-metric-learning NTXentLoss)."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    torch.manual_seed(5)
    n, d, tau = 33, 16, 0.2
    z_a, z_b = torch.randn(n, d, device=device), torch.randn(n, d, device=device)
    ours = palfast.nn.InfoNCELoss(temperature=tau)(z_a, z_b)
    labels = torch.arange(n, device=device).repeat(2)
    theirs = pml.NTXentLoss(temperature=tau)(torch.cat([z_a, z_b]), labels)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_labels_form_is_supcon(device):
    """from_labels equals SupCon (pytorch-metric-learning SupConLoss)."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    torch.manual_seed(6)
    n, d, tau = 64, 16, 0.1
    z = torch.randn(n, d, device=device)
    y = torch.randint(0, 6, (n,), device=device)
    ours = palfast.info_nce(z, palfast.PairGraph.from_labels(y), temperature=tau)
    theirs = pml.SupConLoss(temperature=tau)(z, y)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_no_positives_gives_zero_with_zero_gradient(device):
    z = torch.randn(10, 4, device=device, requires_grad=True)
    graphs = (
        palfast.PairGraph.from_labels(torch.full((10,), -1)),
        palfast.PairGraph.from_edges([], [], num_nodes=10),
        palfast.PairGraph.from_labels(torch.arange(10)),
    )
    assert_constant_with_zero_gradient(palfast.info_nce, z, graphs, 0.0)


def test_duplicate_edges_sum_their_weights(device):
    torch.manual_seed(8)
    z = torch.randn(6, 3, dtype=torch.float64, device=device)
    dup = palfast.PairGraph.from_edges([0, 0, 2], [1, 1, 3], num_nodes=6)
    once = palfast.PairGraph.from_edges([0, 2], [1, 3], [2.0, 1.0], num_nodes=6)
    torch.testing.assert_close(dup.to_dense(), once.to_dense())
    torch.testing.assert_close(
        palfast.info_nce(z, dup.to(device), reduction="none"), palfast.info_nce(z, once.to(device), reduction="none")
    )


@pytest.mark.slow
def test_compile_fullgraph(device):
    torch.manual_seed(10)
    g = palfast.PairGraph.from_views(16, 2).to(device)
    z = torch.randn(32, 8, device=device, requires_grad=True)
    assert_compile_matches_eager(lambda x: palfast.info_nce(x * 2.0, g, temperature=0.3), z)


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "bad,match,exc",
    [
        (dict(temperature=0.0), "temperature must be a finite number > 0", ValueError),
        (dict(temperature=-1.0), "temperature", ValueError),
        (dict(temperature=float("nan")), "temperature", ValueError),
        (dict(temperature="0.1"), "temperature must be a number", TypeError),
        (dict(reduction="avg"), "reduction must be one of", ValueError),
    ],
)
def test_bad_arguments(bad, match, exc):
    z = torch.randn(4, 3)
    with pytest.raises(exc, match=match):
        palfast.info_nce(z, palfast.PairGraph.from_views(2, 2), **bad)


# Bad z and graph of every loss: tests/losses/test_bad_input.py.
def test_kernel_checks_its_arguments_too():
    """Calling the op directly with a mismatched graph is an error, not a crash."""
    g = palfast.PairGraph.from_views(3, 2)
    with pytest.raises(ValueError, match="graph.indptr must have 6 entries"):
        ops.info_nce(torch.randn(5, 2), *g.kernel_args(), 0.1, True, 0, 5)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        ops.info_nce(torch.randn(6, 2), *g.kernel_args(), 0.0, True, 0, 6)
    with pytest.raises(ValueError, match="graph.labels must have shape"):
        args = list(g.kernel_args())
        args[6] = args[6][:, :5]
        ops.info_nce(torch.randn(6, 2), *args, 0.1, True, 0, 6)
    with pytest.raises(ValueError, match="anchor rows must satisfy"):
        ops.info_nce(torch.randn(6, 2), *g.kernel_args(), 0.1, True, 2, 7)


def test_two_view_module_errors():
    loss = palfast.nn.InfoNCELoss()
    with pytest.raises(ValueError, match="z_a and z_b must both be"):
        loss(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(TypeError, match="z_b must be a torch.Tensor"):
        loss(torch.randn(4, 3), "graph")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_on_wrong_device():
    g = palfast.PairGraph.from_views(2, 2)
    with pytest.raises(ValueError, match="graph must be on z's device"):
        palfast.info_nce(torch.randn(4, 3, device="cuda"), g)


@pytest.mark.parametrize("begin,end", [(0, 0), (0, 300), (100, 613), (257, 258), (600, 613)])
def test_anchor_range_matches_full_rows(device, begin, end):
    """Rows [begin, end) as anchors (what a rank computes under torch.distributed)."""
    torch.manual_seed(12)
    n = 613
    z = torch.randn(n, 17, dtype=torch.float64, device=device)
    g = palfast.PairGraph.from_labels(torch.randint(-1, 20, (n,))).to(device)
    args = (*g.kernel_args(), 0.25, True)
    full, full_lse = ops.info_nce(z, *args, 0, n)
    part, lse = ops.info_nce(z, *args, begin, end)
    torch.testing.assert_close(part[begin:end], full[begin:end])
    assert torch.all(part[:begin] == 0) and torch.all(part[end:] == 0)
    assert torch.all(torch.isinf(lse[:begin])) and torch.all(torch.isinf(lse[end:]))
    grad_rows = torch.randn(n, dtype=torch.float64, device=device)
    masked = torch.zeros_like(grad_rows)
    masked[begin:end] = grad_rows[begin:end]
    want = ops.info_nce_backward(masked, z, *g.kernel_args(), full_lse, 0.25, True, 0, n)
    got = ops.info_nce_backward(grad_rows, z, *g.kernel_args(), lse, 0.25, True, begin, end)
    torch.testing.assert_close(got, want)


# ------------------------------------------------------- extreme but valid input
# (docs/api.md, "Numerics"). On the CPU; the CUDA kernels do the same (row_norm in
# csrc/cuda/info_nce/info_nce.cuh, narrow_grad in csrc/cuda/info_nce/info_nce_backward.cu).
def test_float16_zero_row_gives_a_finite_gradient():
    torch.manual_seed(3)
    z = torch.randn(8, 16).half()
    z[0] = 0
    z.requires_grad_()
    loss = palfast.info_nce(z, palfast.PairGraph.from_views(4, 2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    # Other rows get the float32 gradient rounded to float16.
    z32 = z.detach().float().requires_grad_()
    palfast.info_nce(z32, palfast.PairGraph.from_views(4, 2)).backward()
    torch.testing.assert_close(z.grad[1:].float(), z32.grad[1:], rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("scale", [1e20, 1e30])
def test_rows_of_extreme_norm_normalise_without_overflow(scale):
    torch.manual_seed(4)
    g = palfast.PairGraph.from_views(4, 2)
    z = torch.randn(8, 16)
    big = (z * scale).requires_grad_()
    unit = z.clone().requires_grad_()
    loss_big, loss_unit = palfast.info_nce(big, g), palfast.info_nce(unit, g)
    torch.testing.assert_close(loss_big, loss_unit)
    loss_big.backward()
    loss_unit.backward()
    torch.testing.assert_close(big.grad * scale, unit.grad, rtol=1e-4, atol=1e-6)


def test_unnormalised_logits_beyond_float32_precision_are_refused():
    g = palfast.PairGraph.from_views(4, 2)
    z = torch.randn(8, 16)
    z = z / z.norm(dim=1).max() * 6e9**0.5  # logits up to ~6e9
    with pytest.raises(
        ValueError,
        match=r"normalize=False, max_i ‖z_i‖² / temperature must be "
        r"<= INFO_NCE_MAX_LOGIT = 1.67772e\+07",
    ):
        palfast.info_nce(z, g, normalize=False, temperature=1.0)
    palfast.info_nce(z.double(), g, normalize=False, temperature=1.0)  # fine in float64


def test_unnormalised_logits_within_the_bound_match_float64():
    torch.manual_seed(5)
    g = palfast.PairGraph.from_labels(torch.randint(0, 5, (130,)))
    z = torch.randn(1, 33, dtype=torch.float64) + 1e-3 * torch.randn(130, 33, dtype=torch.float64)
    z = z / z.norm(dim=1).max() * 1e6**0.5  # nearly tied logits up to 1e6
    z32 = z.float().requires_grad_()
    exact = z.float().double().requires_grad_()  # float64 on the same rounded inputs
    palfast.info_nce(z32, g, normalize=False, temperature=1.0).backward()
    reference.info_nce(exact, g, normalize=False, temperature=1.0).backward()
    # cond = 1 + max|s| ≈ 1e6: an fp32 logit of 1e6 carries an error of about 0.06,
    # which every fp32 computation of these probabilities inherits.
    assert_rounding_close(
        z32.grad, exact.grad, torch.float32, what="gradient", cond=info_nce_cond(z, 1.0, normalize=False)
    )


# csrc/cpu/info_nce.cpp uses one exponential per element (a fixed shift b = max ‖u‖² / τ)
# when 2b <= 80 in float32 (700 in float64), and the online (max, sum) tiles beyond.
# τ = 0.03 and 0.02 with normalize=True (2b = 67 and 100) land on either side in
# float32; 0.002 (2b = 1000) is past float64's span too.
@pytest.mark.parametrize("temperature", [0.03, 0.02, 0.002])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_both_tile_paths_match_float64(device, graph_factory, temperature, dtype):
    torch.manual_seed(21)
    n, d = 300, 17  # two row blocks of 256, the second partial
    z64 = torch.randn(n, d, dtype=torch.float64, device=device)
    g = graph_factory("semi", n, seed=7).to(device)
    kw = dict(temperature=temperature, reduction="none")
    if dtype == torch.float64:
        assert_rows_match_float64(palfast.info_nce, reference.info_nce, z64, g, **kw)
    else:
        assert_within_rounding_error(
            palfast.info_nce, reference.info_nce, z64, g, dtype, cond=info_nce_cond(z64, temperature), **kw
        )


# ----------------------------------------------------- CPU scheduling and memory
# csrc/cpu/info_nce.cpp hands tile pairs to whichever thread is free and merges
# their partials in tile-pair order: the bits must not depend on who ran what.
def _cpu_fwd_bwd(z, g, n_threads):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(n_threads)
        rows, lse = ops.info_nce(z, *g.kernel_args(), 0.1, True, 0, z.shape[0])
        grad_rows = torch.linspace(-1, 1, z.shape[0], dtype=rows.dtype)
        grad = ops.info_nce_backward(grad_rows, z, *g.kernel_args(), lse, 0.1, True, 0, z.shape[0])
    finally:
        torch.set_num_threads(threads)
    return rows, lse, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_cpu_same_bits_run_to_run(dtype, n_threads):
    """Dynamic scheduling gives every run another schedule; the bits stay."""
    torch.manual_seed(13)
    n = 1100  # 5 row blocks of 256, the last one partial: 15 tile pairs
    z = torch.randn(n, 40, dtype=dtype)
    g = palfast.PairGraph.from_labels(torch.randint(-1, 30, (n,)))
    first = _cpu_fwd_bwd(z, g, n_threads)
    for _ in range(3):
        for got, want in zip(_cpu_fwd_bwd(z, g, n_threads), first):
            assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_same_bits_for_any_thread_count(dtype):
    """Partials merge in tile-pair order and each tile's GEMMs run on one thread."""
    torch.manual_seed(15)
    n = 1100
    z = torch.randn(n, 40, dtype=dtype)
    g = palfast.PairGraph.from_labels(torch.randint(-1, 30, (n,)))
    one = _cpu_fwd_bwd(z, g, 1)
    for n_threads in (2, 3, 4):
        for got, want in zip(_cpu_fwd_bwd(z, g, n_threads), one):
            assert torch.equal(got, want), n_threads


def test_cpu_same_bits_beside_a_busy_process():
    """A busy process pauses the threads at random points: the schedule changes, the bits not."""
    from palfast.benchmarks.harness import busy_processes

    torch.manual_seed(14)
    z = torch.randn(1300, 24)
    g = palfast.PairGraph.from_views(650, 2)
    quiet = _cpu_fwd_bwd(z, g, 2)
    with busy_processes(1):
        for _ in range(2):
            for got, want in zip(_cpu_fwd_bwd(z, g, 2), quiet):
                assert torch.equal(got, want)


_PEAK_SCRIPT = r"""
import sys, torch, palfast
from palfast._ops import ops
n, d, threads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
z = torch.randn(n, d)
g = palfast.PairGraph.from_views(n // 2, 2)
# Anchors: the first row block only, so the run is short but du is still [N, D].
rows, lse = ops.info_nce(z, *g.kernel_args(), 0.1, True, 0, 256)
grad_rows = torch.ones_like(rows)
ops.info_nce_backward(grad_rows, z, *g.kernel_args(), lse, 0.1, True, 0, 256)  # warm-up
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
before = rss()
ops.info_nce_backward(grad_rows, z, *g.kernel_args(), lse, 0.1, True, 0, 256)
with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
print(hwm - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
@pytest.mark.slow
def test_cpu_backward_memory_does_not_grow_with_threads_times_n_d(tmp_path):
    """Backward memory is O(N·D + threads·tile·D): 4 threads may add a few tiles'
    worth over 1 thread, never another [N, D] buffer per thread."""
    n, d = 32768, 64
    nd_bytes = n * d * 4
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")

    def peak(threads):
        out = subprocess.run(
            [sys.executable, "-c", _PEAK_SCRIPT, str(n), str(d), str(threads)],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split()[-1])

    one, four = peak(1), peak(4)
    assert four - one < nd_bytes / 2, (one, four, nd_bytes)
