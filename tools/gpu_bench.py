"""The Python parts of tools/gpu_session.sh: a small run of every CUDA op (for
compute-sanitizer), and the summary of the benchmark that the session runs with
`palfast bench --only info_nce` (palfast/benchmarks/: effective TFLOP/s, ratios,
kernel grids and the CUDA speed targets).

  python tools/gpu_bench.py workload [--device cpu]
  python tools/gpu_bench.py table --out DIR    # the newest bench_*.json in DIR
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

import palfast
from palfast.benchmarks.bench_info_nce import HEAVY_KERNEL_SHARE
from palfast.benchmarks.harness import deterministic_algorithms, format_table

TEMPERATURE = 0.2
SMALL_TEMPERATURE = 0.01  # below the CUDA fixed-shift bound (about 0.026)


def _graph_args(g):
    return g.kernel_args()


# Rows of the workload: more than two of fa2_sym_lse_kernel's 128-row tiles and four
# of the backward's 64-row key tiles, the last ones partial, so that off-diagonal tile
# pairs (column sums, the row side's shared M buffer) run under the sanitizers too.
WORKLOAD_ROWS = 300
WORKLOAD_DIM = 40  # not a multiple of 16: the FA2 kernels' zero-padded last k-step


def workload(device: torch.device) -> None:
    """Forward and backward of every op that has a CUDA kernel, on a small graph
    with CSR edges and labels, in every dtype, anchors not aligned to tiles; the
    info_nce backward also in torch's deterministic mode (the row-block kernel)."""
    ops = torch.ops.palfast
    n, d = WORKLOAD_ROWS, WORKLOAD_DIM
    gen = torch.Generator().manual_seed(0)
    src, dst = torch.randint(0, n, (3 * n,), generator=gen), torch.randint(0, n, (3 * n,), generator=gen)
    edges = palfast.PairGraph.from_edges(src, dst, torch.rand(3 * n, generator=gen), num_nodes=n, symmetric=False)
    g = (0.5 * edges + palfast.PairGraph.from_labels(torch.randint(-1, 4, (n,), generator=gen))).to(device)
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        z = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)
        # The fixed-shift softmax (normalize=True, τ above its bound), and the online
        # path (τ below the bound, normalize=False): csrc/cuda/info_nce/info_nce.cuh, use_fixed_shift.
        for normalize, tau in ((True, TEMPERATURE), (True, SMALL_TEMPERATURE), (False, TEMPERATURE)):
            rows, lse = ops.info_nce(z, *_graph_args(g), tau, normalize, 3, n)
            ops.info_nce_backward(torch.ones_like(rows), z, *_graph_args(g), lse, tau, normalize, 3, n)
        # warn_only: the label part's class sums use atomics and would raise.
        with deterministic_algorithms(warn_only=True):
            rows, lse = ops.info_nce(z, *_graph_args(g), TEMPERATURE, True, 3, n)
            ops.info_nce_backward(torch.ones_like(rows), z, *_graph_args(g), lse, TEMPERATURE, True, 3, n)
        for transpose in (False, True):
            ops.graph_spmm(z, *_graph_args(g), transpose)
        e = ops.graph_dirichlet(z, *_graph_args(g))
        ops.graph_dirichlet_backward(torch.ones_like(e), z, *_graph_args(g))
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"workload done on {device}")


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
    p.add_argument("what", choices=["workload", "table"])
    p.add_argument("--device", default="cuda")
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
    return table(a.out)


if __name__ == "__main__":
    sys.exit(main())
