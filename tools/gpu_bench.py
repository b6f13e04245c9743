"""The Python parts of tools/gpu_session.sh: a small run of every CUDA kernel path
(for compute-sanitizer), the curated CUDA tests of tools/gpu_tests.txt, and the
summary of the benchmark that the session runs with `palfast bench --only info_nce`
(palfast/benchmarks/: effective TFLOP/s, ratios, kernel grids and the CUDA speed
targets).

  python tools/gpu_bench.py workload [--device cpu]
  python tools/gpu_bench.py tests [--collect-only] [--list FILE]
  python tools/gpu_bench.py table --out DIR    # the newest bench_*.json in DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from pathlib import Path

import torch

import palfast
from palfast.benchmarks.bench_info_nce import HEAVY_KERNEL_SHARE
from palfast.benchmarks.harness import deterministic_algorithms, format_table, info_nce_backward_kernel
from palfast.testing import INFO_NCE_KERNEL_PATHS

# Shapes of the workload, (rows, columns, why): every one has partial tiles (rows not
# a multiple of the 64-row tiles, nor of fa2_sym_lse_kernel's 128 rows, more than two
# of the latter, so that off-diagonal tile pairs, column sums and the row side's
# shared M buffer run too), and its D is not a multiple of 16 (the FA2 kernels'
# zero-padded last k-step, pad_to_chunk).
WORKLOAD_SHAPES = (
    (300, 40, "even D: red.global.v2 in fa2_sym_grad_kernel on sm_90"),
    (300, 37, "odd D: the scalar atomics of fa2_sym_grad_kernel"),
    (150, 131, "D > 128: 16-bit z in sym_lse_kernel and sym_grad_kernel; several gradient column blocks"),
)
WORKLOAD_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# Anchors [a0, n - ANCHOR_TAIL): rows before and after the anchor range, so the
# kernels' anchor bounds (tiles without anchors skipped) run as well.
ANCHOR_HEAD, ANCHOR_TAIL = 3, 7


def _graphs(n: int, device: torch.device):
    """A graph of CSR edges plus label sets (the class-sum atomics), and the edges
    alone (no label part), on ``n`` rows."""
    gen = torch.Generator().manual_seed(n)
    src, dst = torch.randint(0, n, (3 * n,), generator=gen), torch.randint(0, n, (3 * n,), generator=gen)
    edges = palfast.PairGraph.from_edges(src, dst, torch.rand(3 * n, generator=gen), num_nodes=n, symmetric=False)
    semi = 0.5 * edges + palfast.PairGraph.from_labels(torch.randint(-1, 4, (n,), generator=gen))
    return {"edges+labels": semi.to(device), "edges": edges.to(device)}


def workload(device: torch.device) -> None:
    """Forward and backward of every op that has a CUDA kernel, small enough for the
    sanitizers, over every kernel path: for each of WORKLOAD_SHAPES and
    WORKLOAD_DTYPES, info_nce on each of palfast.testing.INFO_NCE_KERNEL_PATHS (the
    fixed-shift forward with each backward: the default FA2 row kernel for 16-bit z
    with D ≤ 128, the symmetric one, FA2-style for 16-bit z with D ≤ 128, the
    row-block one, and those of deterministic mode; the online forward and
    row-block backward of a small τ and of normalize=False), then graph_spmm (both
    sides) and graph_dirichlet with its backward, on a graph with label sets and on
    edges alone. Which kernel each case takes is in docs/cuda.md, "info_nce kernels"."""
    ops = torch.ops.palfast
    for n, d, why in WORKLOAD_SHAPES:
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(n + d)
        graphs = _graphs(n, device)
        g = graphs["edges+labels"].kernel_args()
        a0, a1 = ANCHOR_HEAD, n - ANCHOR_TAIL
        for dtype in WORKLOAD_DTYPES:
            z = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)
            for normalize, tau, deterministic, backward_kernel in INFO_NCE_KERNEL_PATHS.values():
                # warn_only: the label part's class sums use atomics and would raise.
                mode = deterministic_algorithms(warn_only=True) if deterministic else contextlib.nullcontext()
                with mode, info_nce_backward_kernel(backward_kernel):
                    rows, lse = ops.info_nce(z, *g, tau, normalize, a0, a1)
                    ops.info_nce_backward(torch.ones_like(rows), z, *g, lse, tau, normalize, a0, a1)
            for graph in graphs.values():
                for transpose in (False, True):
                    ops.graph_spmm(z, *graph.kernel_args(), transpose)
                e = ops.graph_dirichlet(z, *graph.kernel_args())
                ops.graph_dirichlet_backward(torch.ones_like(e), z, *graph.kernel_args())
        if device.type == "cuda":
            torch.cuda.synchronize()
        # Printed as it goes: a sanitizer cut off by its cap shows how far it got.
        print(f"N={n} D={d} ({why}): {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"workload done on {device}")


# The curated CUDA tests, one pytest id a line (the file says how they were chosen).
GPU_TESTS = Path(__file__).with_name("gpu_tests.txt")


def test_ids(path: Path) -> list[str]:
    """The pytest ids listed in ``path``, without comments and blank lines."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def cuda_tests(path: Path, collect_only: bool) -> int:
    """Runs the tests listed in ``path`` (pytest's exit status: 4 when an id names no
    test). ``collect_only``: only collects them, on any machine, so that a list that
    no longer matches the tests fails before a GPU is at hand; the CUDA-parametrised
    ids exist only where torch sees a GPU (tests/conftest.py, DEVICES), so torch is
    told it does, for collection, which runs no test."""
    import pytest

    args = ["-q", "-p", "no:cacheprovider", "-rfE", "--maxfail=10", *test_ids(path)]
    if collect_only:
        torch.cuda.is_available = lambda: True
        args.insert(0, "--collect-only")
    return int(pytest.main(args))


def _short_name(kernel: str) -> str:
    """`sym_lse_kernel` out of `void palfast::cuda::(anonymous namespace)::sym_lse_kernel<...>(...)`."""
    base = re.split(r"[<(]", kernel.replace("(anonymous namespace)", "anonymous"), maxsplit=1)[0]
    words = base.rsplit("::", 1)[-1].split()
    return words[-1] if words else kernel


def table(folder: Path) -> int:
    """The benchmark's table, its targets, and the heavy kernels of each palfast row (at
    least HEAVY_KERNEL_SHARE of its kernel time) with their blocks, from the newest
    bench_*.json in ``folder`` (printed last by gpu_session.sh)."""
    paths = sorted(folder.glob("bench_*.json"), key=lambda p: p.stat().st_mtime)
    if not paths:
        print(f"no bench_*.json in {folder}: the benchmark wrote no results")
        return 1
    report = json.loads(paths[-1].read_text())
    print(f"{paths[-1].name}:")
    print(format_table(report))
    sms = report["environment"].get("sm_count")
    for r in report["results"]:
        if r["impl"] == "palfast" and r.get("kernels"):
            kernels = ", ".join(
                f"{_short_name(k['name'])} {k['min_blocks']} blocks {100 * k['share']:.0f}%"
                for k in r["kernels"]
                if (k["share"] or 0) >= HEAVY_KERNEL_SHARE
            )
            print(f"  heavy kernels of palfast, {r['case']} ({sms} SMs): {kernels}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["workload", "tests", "table"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--collect-only", action="store_true", help="tests: collect them only (no GPU needed)")
    p.add_argument("--list", type=Path, default=GPU_TESTS, help="tests: the file of test ids")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("build/gpu_session"),
        help="table: the folder holding the benchmark's bench_*.json",
    )
    a = p.parse_args(argv)
    if a.what == "workload":
        workload(torch.device(a.device))
        return 0
    if a.what == "tests":
        return cuda_tests(a.list, a.collect_only)
    return table(a.out)


if __name__ == "__main__":
    sys.exit(main())
