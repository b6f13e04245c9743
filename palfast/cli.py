"""The ``palfast`` command: ``palfast demo | bench | info | annotate`` (README.md)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path

from ._checks import int_at_least


def _info(args) -> int:
    import platform

    import torch

    import palfast
    from palfast._ops import BUILD_INFO

    cuda_runtime = torch.version.cuda or "none (CPU build of torch)"
    print(f"palfast        {palfast.__version__}  ({Path(palfast.__file__).parent})")
    print(f"python         {platform.python_version()}")
    print(
        f"torch          {torch.__version__}  (CUDA {cuda_runtime}; extension built against "
        f"torch {BUILD_INFO['torch_version']})"
    )
    print("kernels        CPU: compiled")
    if BUILD_INFO["with_cuda"]:
        archs = ", ".join(f"sm_{a.replace('.', '')}" for a in BUILD_INFO["cuda_archs"]) or "?"
        print(f"               CUDA: compiled for {archs}")
    else:
        print(
            "               CUDA: not compiled (CPU-only build; rebuild with PALFAST_CUDA=ON and a CUDA torch + nvcc)"
        )
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"GPUs           {names}")
    else:
        print("GPUs           none visible")
    ops = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("palfast::"))
    print(f"ops            {', '.join(ops)}")
    print(f"FAISS          {_faiss_status()}")
    print(f"CPU threads    {torch.get_num_threads()}")
    return 0


def _faiss_status() -> str:
    if importlib.util.find_spec("faiss") is None:
        return "not installed (pip install faiss-cpu); candidate_pairs falls back to exact torch"
    try:
        import faiss
    except Exception as e:  # a broken FAISS install should not break `palfast info`
        return f"installed but fails to import: {e}"
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    return f"{faiss.__version__} ({'GPU, ' + str(gpus) + ' device(s)' if gpus else 'CPU'})"


#: What ``palfast bench --device`` takes; "auto" is cuda when a GPU is visible, else cpu.
BENCH_DEVICES = "cpu, cuda, cuda:N or auto"


def bench_device(text: str) -> str:
    """argparse type of ``bench --device``: cpu, cuda, cuda:N (N >= 0) or auto."""
    kind, _, index = text.partition(":")
    if text in ("cpu", "cuda", "auto") or (kind == "cuda" and index.isascii() and index.isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"must be {BENCH_DEVICES}, got {text!r}")


def _bench(args) -> int:
    import torch

    from palfast.benchmarks import harness

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("palfast bench: --device cuda needs a visible GPU and a CUDA build of torch", file=sys.stderr)
        return 2
    index = int(device.partition(":")[2] or 0)
    if device.startswith("cuda") and index >= torch.cuda.device_count():
        print(
            f"palfast bench: --device {device}: only {torch.cuda.device_count()} GPU(s) are "
            f"visible (cuda:0..cuda:{torch.cuda.device_count() - 1})",
            file=sys.stderr,
        )
        return 2
    if args.min_time < 0:
        print(f"palfast bench: --min-time must be >= 0 seconds, got {args.min_time}", file=sys.stderr)
        return 2
    if args.contention and args.busy < 1:
        print(f"palfast bench: --busy must be >= 1 with --contention, got {args.busy}", file=sys.stderr)
        return 2
    if args.store_url is not None:
        from palfast.active.postgres_log import URL_SCHEMES, is_postgres_url
        from palfast.benchmarks.bench_store import STORE_URL_ENV

        if not is_postgres_url(args.store_url):
            print(
                f"palfast bench: --store-url must start with {' or '.join(URL_SCHEMES)}, "
                f"got {args.store_url.split('://')[0]!r}...",
                file=sys.stderr,
            )
            return 2
        # The environment carries it into the harness's peak-memory subprocesses too.
        os.environ[STORE_URL_ENV] = args.store_url
    modules = [f"bench_{name}" for name in args.only] if args.only else harness.BENCH_MODULES
    available = [m for m in modules if importlib.util.find_spec(f"{harness.__package__}.{m}") is not None]
    for m in set(modules) - set(available):
        print(f"palfast bench: skipping {m} (not present in this version)", file=sys.stderr)
    harness.run_cases(
        available,
        device=device,
        quick=args.quick,
        repeats=args.repeats,
        warmup=args.warmup,
        min_time=args.min_time,
        memory=not args.no_memory,
        out_dir=args.out,
        case_filter=args.filter,
        contention=args.busy if args.contention else 0,
        impls=args.impls,
        kernels=not args.no_kernels,
    )
    return 0


def _demo(args) -> int:
    try:
        demo = importlib.import_module("palfast.demo")
    except ImportError as e:
        print(f"palfast demo: not available in this build ({e})", file=sys.stderr)
        return 2
    return demo.run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="palfast",
        description="palfast: fast Positive Active Learning for PyTorch. "
        "Graph-weighted SSL losses as fused C++/CUDA ops, FAISS query selection, "
        "and a crash-safe store of oracle answers.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{demo,bench,info,annotate}")

    demo = sub.add_parser(
        "demo",
        help="active PAL end to end on scikit-learn's digits (active vs passive)",
        description="Train a small encoder on scikit-learn's bundled digits (1,797 real 8x8 "
        "images) with palfast.info_nce on a graph of augmentation views plus the "
        "answers of a simulated oracle, choosing the questions actively (pal, nearest) "
        "or at random. Prints accuracy against the number of queries, writes a PNG "
        "plot and the SQLite answer store.",
    )
    try:
        importlib.import_module("palfast.demo").add_demo_arguments(demo)
    except ImportError:
        pass

    bench = sub.add_parser(
        "bench",
        help="micro-benchmarks against baselines (table, JSON, CSV)",
        description="Time palfast's ops against naive eager PyTorch, torch.compile and library "
        "baselines in the same process (alternating runs, medians, ratios, effective "
        "TFLOP/s; CUDA events on a GPU) and measure peak memory (a fresh subprocess "
        "per run on the CPU, max_memory_allocated on CUDA) and, on CUDA, the kernels "
        "a run launches. Writes JSON and CSV with device, versions, git SHA and the "
        "targets the results meet (bench/README.md).",
    )
    from palfast.benchmarks.harness import BENCH_MODULES

    ops = [m.removeprefix("bench_") for m in BENCH_MODULES]
    bench.add_argument(
        "--only", nargs="+", metavar="OP", choices=ops, help=f"benchmarks to run: {', '.join(ops)} (default: all)"
    )
    bench.add_argument("--filter", metavar="TEXT", help="only the cases whose name contains TEXT (e.g. vicreg, N=8192)")
    bench.add_argument(
        "--impls", nargs="+", metavar="IMPL", help="only these implementations (e.g. palfast); the baseline always runs"
    )
    bench.add_argument(
        "--device",
        default="auto",
        type=bench_device,
        help=f"{BENCH_DEVICES} (default: auto: cuda when a GPU is visible)",
    )
    bench.add_argument("--quick", action="store_true", help="small sizes only (about a minute)")
    bench.add_argument("--repeats", type=int_at_least(1), default=5, help="timed rounds per case, >= 1 (default 5)")
    bench.add_argument("--warmup", type=int_at_least(0), default=1, help="untimed runs first, >= 0 (default 1)")
    bench.add_argument(
        "--min-time",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep alternating rounds past --repeats until a case has run this "
        "long, up to a round limit (for millisecond GPU steps; default 0)",
    )
    bench.add_argument(
        "--contention",
        action="store_true",
        help="time every case twice: quiet, then beside --busy busy-loop processes "
        "(as data-loader workers or other jobs compete for cores in training); "
        "reports the speedups of both",
    )
    bench.add_argument(
        "--busy", type=int, default=1, metavar="K", help="busy-loop processes for --contention (default 1)"
    )
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    bench.add_argument(
        "--no-kernels",
        action="store_true",
        help="skip the torch.profiler run that records the kernels (grid sizes) of each implementation on CUDA",
    )
    bench.add_argument(
        "--store-url",
        metavar="URL",
        default=None,
        help="--only store: also time the PostgreSQL store in this database "
        "(postgresql://user@host/db; a schema per store, dropped after; "
        "needs psycopg). Default: $PALFAST_BENCH_STORE_URL if set, else "
        "SQLite only",
    )
    bench.add_argument(
        "--out", default="bench_results", help="folder for the JSON and CSV files (default: ./bench_results)"
    )

    annotate = sub.add_parser(  # palfast/annotate/ fills in the description and options
        "annotate", help="a local web page where people answer 'are these alike?' into the store"
    )
    importlib.import_module("palfast.annotate").add_arguments(annotate)

    sub.add_parser(
        "info",
        help="versions, compiled kernels (CPU, CUDA archs), FAISS",
        description="Print palfast, torch and CUDA versions, which kernels were "
        "compiled (CPU; CUDA and for which archs) and which FAISS is "
        "importable.",
    )
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handler = {
        "demo": _demo,
        "bench": _bench,
        "info": _info,
        "annotate": lambda a: importlib.import_module("palfast.annotate").run(a),
    }[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
