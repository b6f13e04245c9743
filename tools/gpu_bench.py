"""The workloads of tools/gpu_session.sh: a small run of every CUDA op (for
compute-sanitizer) and the info_nce forward+backward benchmark.

Self-contained on purpose (palfast's public API and torch only): it has to run
on a lent GPU machine with no internet and whatever the benchmark suite looks like.

  python tools/gpu_bench.py workload [--device cpu]
  python tools/gpu_bench.py bench --out DIR [--device cpu] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import palfast

TEMPERATURE = 0.2
SMALL_TEMPERATURE = 0.01  # below the CUDA fixed-shift bound (about 0.026)
BENCH_NS = [4096, 16384, 65536]
BENCH_D = 128
QUICK_NS = [256]  # --quick (CPU dry run): the code path, not the numbers
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
WARMUP = 2
REPEATS = 5
GIB = 2**30


def _graph_args(g):
    return g.kernel_args()


def workload(device: torch.device) -> None:
    """Forward and backward of every op that has a CUDA kernel, on a small graph
    with CSR edges and labels, in every dtype, anchors not aligned to tiles."""
    ops = torch.ops.palfast
    n, d = 70, 40
    gen = torch.Generator().manual_seed(0)
    src, dst = torch.randint(0, n, (3 * n,), generator=gen), torch.randint(0, n, (3 * n,), generator=gen)
    edges = palfast.PairGraph.from_edges(src, dst, torch.rand(3 * n, generator=gen), num_nodes=n,
                                         symmetric=False)
    g = (0.5 * edges + palfast.PairGraph.from_labels(torch.randint(-1, 4, (n,), generator=gen))).to(device)
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        z = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)
        # The fixed-shift softmax (normalize=True, τ above its bound), and the online
        # path (τ below the bound, normalize=False): csrc/cuda/info_nce.cuh, use_fixed_shift.
        for normalize, tau in ((True, TEMPERATURE), (True, SMALL_TEMPERATURE), (False, TEMPERATURE)):
            rows, lse = ops.info_nce(z, *_graph_args(g), tau, normalize, 3, n)
            ops.info_nce_backward(torch.ones_like(rows), z, *_graph_args(g), lse, tau, normalize, 3, n)
        for transpose in (False, True):
            ops.graph_spmm(z, *_graph_args(g), transpose)
        e = ops.graph_dirichlet(z, *_graph_args(g))
        ops.graph_dirichlet_backward(torch.ones_like(e), z, *_graph_args(g))
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"workload done on {device}")


def eager_info_nce(z: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Dense InfoNCE with one positive per row (two views), the usual eager code."""
    u = F.normalize(z, dim=1)
    s = (u @ u.T) / TEMPERATURE
    s = s.masked_fill(torch.eye(z.shape[0], dtype=torch.bool, device=z.device), float("-inf"))
    lse = torch.logsumexp(s.float(), dim=1)
    pos = s.gather(1, positive[:, None]).squeeze(1).float()
    return (lse - pos).mean()


def _time(fn, device) -> tuple[float, float]:
    """Median ms of fn() and peak GiB allocated during it."""
    for _ in range(WARMUP):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for _ in range(REPEATS):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - base) / GIB if device.type == "cuda" else None
    return statistics.median(times), peak


def _versions(device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "palfast": getattr(palfast, "__version__", "?"), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "?"
    try:
        info["git_sha"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                         text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["git_sha"] = "?"
    return info


def bench(device: torch.device, out: Path, quick: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench_info_nce.json"
    result = {"versions": _versions(device), "temperature": TEMPERATURE, "d": BENCH_D,
              "flops_model": "6·N²·D for forward+backward", "rows": []}
    compiled = torch.compile(eager_info_nce, dynamic=True)
    impls = {"palfast": None, "eager": eager_info_nce, "torch.compile": compiled}
    for n in QUICK_NS if quick else BENCH_NS:
        # Two views: row i's positive is i ± N/2 (CSR edges, so palfast is deterministic).
        positive = (torch.arange(n) + n // 2) % n
        graph = palfast.PairGraph.from_edges(torch.arange(n), positive, num_nodes=n,
                                             symmetric=False).to(device)
        positive = positive.to(device)
        for dname, dtype in DTYPES.items():
            z0 = torch.randn(n, BENCH_D, device=device, dtype=dtype)
            for name, fn in impls.items():
                z = z0.clone().requires_grad_(True)

                def step(fn=fn, z=z, graph=graph, positive=positive):
                    z.grad = None
                    loss = (palfast.info_nce(z, graph, temperature=TEMPERATURE) if fn is None
                            else fn(z, positive))
                    loss.backward()

                row = {"impl": name, "n": n, "dtype": dname}
                try:
                    ms, peak = _time(step, device)
                    row.update(ms=ms, tflops=6 * n * n * BENCH_D / (ms * 1e-3) / 1e12, peak_gib=peak)
                except torch.OutOfMemoryError:
                    row.update(error="out of memory")
                except Exception as e:  # a baseline that fails must not hide the others
                    row.update(error=f"{type(e).__name__}: {str(e)[:200]}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                result["rows"].append(row)
                path.write_text(json.dumps(result, indent=1))  # partial results survive a timeout
                print(json.dumps(row), flush=True)
    print(f"wrote {path}")


def table(path: Path) -> None:
    """The short table printed last by gpu_session.sh."""
    result = json.loads(path.read_text())
    print(f"info_nce forward+backward, D={result['d']}, {result['versions'].get('gpu', result['versions']['device'])}")
    print(f"{'N':>6} {'dtype':>5} {'impl':>14} {'ms':>9} {'TFLOP/s':>8} {'peak GiB':>9}")
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['n']:>6} {r['dtype']:>5} {r['impl']:>14} {r['error'][:40]}")
        else:
            peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.3f}"
            print(f"{r['n']:>6} {r['dtype']:>5} {r['impl']:>14} {r['ms']:>9.3f} {r['tflops']:>8.2f} {peak:>9}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["workload", "bench", "table"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=Path("build/gpu_session"))
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if a.what == "workload":
        workload(device)
    elif a.what == "bench":
        bench(device, a.out, a.quick)
    else:
        table(a.out / "bench_info_nce.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
