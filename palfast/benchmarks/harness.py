"""One benchmark harness for every op (bench/README.md).

A benchmark module ``palfast/benchmarks/bench_<op>.py`` exposes ``cases(quick, device) ->
list[Case]``. A :class:`Case` names a set of implementations of one workload
(palfast and its baselines) and how to build each one; this harness

* times them in the same process, alternating implementations round by round
  so that drift (thermal, other load) hits all of them alike, and reports
  medians and the ratio ``baseline_median / impl_median`` (> 1: faster than the
  baseline);
* times CUDA runs with CUDA events (warm-up runs excluded), CPU runs with the
  wall clock; a factory returning a :class:`Prepared` gets its ``prepare()`` run
  untimed before every run (the state a run uses up, made again);
* reports effective TFLOP/s where a case counts its FLOPs (``Case.flops``; each
  ``bench_<op>.py`` says how it counts them) and ratios to the baseline and to the
  labels in ``Case.compare_to``;
* measures peak memory of one run: on CUDA with ``max_memory_allocated``, on
  the CPU in a fresh subprocess per implementation (peak RSS during the run
  minus RSS before it, so imports and inputs are not counted);
* on CUDA, records the kernels one run launches (torch.profiler: name, blocks,
  threads per block, GPU time), so that grid sizes can be checked;
* with ``contention=k``, times every case twice: quiet, then with k busy-loop
  processes (``while True: pass``, pinned nowhere) competing for the cores, as
  data-loader workers or other jobs do in training; each row says which
  (``load``) and carries the load average seen during it;
* writes JSON and CSV (with device, versions and git SHA) after every case, so
  that a run stopped by a time limit keeps what it measured, and prints a table;
* asks each benchmark module that has a ``targets(rows, environment)`` function
  which of its targets the results meet (``report["targets"]``);
* on CUDA, measures the card's bf16 matmul rate once per run (:func:`matmul_rate`,
  ``environment["bf16_mm_tflops"]``) and gives every row with effective TFLOP/s its
  share of that rate (``mm_share``): what "a good share of peak" means on the card at
  hand, measured beside the rows rather than taken from a datasheet.

Timed tests are not benchmarks: nothing here asserts a speed.

A module with ``run_suite(quick, out_dir, task_filter, progress)`` is an evaluation, not a
timing (``bench_strategies.py``): the harness calls it, with ``--filter`` as its task
filter, and times nothing of it.

Run it with ``palfast bench`` (see ``palfast bench --help``).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gc
import importlib
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .._json import dumps

__all__ = ["Case", "Prepared", "Skip", "run_cases", "environment"]

BENCH_MODULES = ["bench_info_nce", "bench_covariance", "bench_candidates", "bench_active", "bench_store"]


class Skip(Exception):
    """Raised by a factory when an implementation cannot run this case (e.g. no memory)."""


@dataclasses.dataclass
class Prepared:
    """What a factory returns for a step that uses up its input (a refresh reads the rows
    appended for it once): ``prepare()`` makes the input again, untimed, before every
    run (warm-up, timed and peak-memory runs alike); only ``run()`` is measured. Calling
    it does both, in that order."""

    prepare: Callable[[], object]
    run: Callable[[], object]

    def __call__(self) -> object:
        self.prepare()
        return self.run()


@contextlib.contextmanager
def deterministic_algorithms(warn_only: bool = False):
    """torch.use_deterministic_algorithms(True, warn_only=warn_only) inside the block;
    the previous mode is restored after it. (The benchmarks time palfast's deterministic
    CUDA backward with it; tools/gpu_bench.py and the tests use it too.)"""
    before = torch.are_deterministic_algorithms_enabled()
    before_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=before_warn)


# The variable that picks info_nce's CUDA backward kernel (docs/cuda.md, "info_nce kernels").
INFO_NCE_BACKWARD_ENV = "PALFAST_INFO_NCE_BACKWARD"


@contextlib.contextmanager
def info_nce_backward_kernel(kernel: str | None):
    """PALFAST_INFO_NCE_BACKWARD=kernel inside the block (None: unset, the default
    kernel); the previous value is restored after it. (The benchmarks time each CUDA
    backward kernel with it; tools/gpu_bench.py and the tests use it too.)"""
    before = os.environ.get(INFO_NCE_BACKWARD_ENV)
    if kernel is None:
        os.environ.pop(INFO_NCE_BACKWARD_ENV, None)
    else:
        os.environ[INFO_NCE_BACKWARD_ENV] = kernel
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(INFO_NCE_BACKWARD_ENV, None)
        else:
            os.environ[INFO_NCE_BACKWARD_ENV] = before


@contextlib.contextmanager
def allow_tf32(allow: bool):
    """torch.backends.cuda.matmul.fp32_precision = "tf32" (allow) or "ieee" inside the
    block, the previous value restored after it: what allow_tf32 = True / False sets,
    through PyTorch's newer flag, whose reading never fails (reading allow_tf32 raises
    once both flags have been set). float32 info_nce on CUDA reads it at each call:
    plain TF32 tensor cores for "tf32", 3×TF32 split precision otherwise
    (docs/cuda.md). (The benchmarks time float32 both ways with it; the tests use it too.)"""
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32" if allow else "ieee"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


@dataclasses.dataclass
class Case:
    """One workload. ``impls`` maps a label to a factory; calling the factory builds
    inputs and returns a zero-argument ``run()`` doing one step of the workload.
    ``baseline`` is the label the ratios are taken against; ``compare_to`` names
    more labels to take ratios against. ``flops`` is the effective FLOP count of one
    run (the rows then carry ``tflops``), None where a case counts none."""

    module: str
    name: str
    params: dict
    impls: dict[str, Callable[[], Callable[[], object]]]
    baseline: str
    device: str = "cpu"
    compare_to: tuple[str, ...] = ()
    flops: float | None = None
    #: Measurements beside the time, per implementation label: a zero-argument callable
    #: run once in the main process after the timing, returning fields for the row
    #: (e.g. ``{"recall_at_10": 0.97}``). A Skip or error there is recorded in the row's
    #: ``extras_status`` and the timing stands.
    extras: dict[str, Callable[[], dict]] = dataclasses.field(default_factory=dict)
    #: Whether the peak-memory subprocess runs one untimed step before the measured one.
    #: False for steps that take minutes and whose one-time allocations (imports, thread
    #: pools) are small beside them.
    peak_warmup: bool = True


#: The matmul whose rate :func:`matmul_rate` measures: two MM_RATE_SIZE² bf16 matrices
#: (2·8192³ = 1.1 TFLOP, a few ms on a current card: large enough for cuBLAS to reach
#: its sustained rate), timed MM_RATE_REPEATS times after MM_RATE_WARMUP untimed runs.
MM_RATE_SIZE = 8192
MM_RATE_WARMUP = 3
MM_RATE_REPEATS = 10


def matmul_rate(device: str) -> float | None:
    """TFLOP/s of a bf16 ``torch.mm`` of two MM_RATE_SIZE² matrices on ``device`` (the
    median of MM_RATE_REPEATS runs timed with CUDA events); None on the CPU, whose
    benchmarks count no bf16 rate. The denominator of each CUDA row's ``mm_share``."""
    if not device.startswith("cuda"):
        return None
    n = MM_RATE_SIZE
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(MM_RATE_WARMUP):
        torch.mm(a, b)
    seconds = []
    for _ in range(MM_RATE_REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b)
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3)
    del a, b
    _free_cuda_cache(device)
    return 2 * n**3 / statistics.median(seconds) / 1e12


def environment() -> dict:
    """Device, versions and git SHA, written next to every result."""
    import palfast

    sha = "unknown"
    try:
        sha = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
                timeout=10,
            ).stdout.strip()
            or sha
        )
    except (OSError, subprocess.SubprocessError):
        pass
    env = {
        "palfast": palfast.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_sha": sha,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "baseline_packages": _package_versions(BASELINE_PACKAGES),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(
            cuda=torch.version.cuda,
            sm_count=props.multi_processor_count,
            compute_capability=f"{props.major}.{props.minor}",
        )
    return env


# Libraries whose versions a result depends on beside torch and palfast: the baselines'
# (bench_info_nce.py: pytorch-metric-learning, inf-cl) and Triton, which runs Inf-CL's and
# torch.compile's GPU kernels.
BASELINE_PACKAGES = ("inf-cl", "triton", "pytorch-metric-learning")


def _package_versions(names) -> dict:
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _busy_loop() -> None:
    while True:
        pass


@contextlib.contextmanager
def busy_processes(count: int):
    """``count`` processes spinning ``while True: pass`` for the duration of the block.

    Forked (the child runs no torch code, so the parent's thread pools do not
    matter), started before the timed runs and killed after them."""
    procs = [multiprocessing.get_context("fork").Process(target=_busy_loop, daemon=True) for _ in range(count)]
    for p in procs:
        p.start()
    try:
        time.sleep(0.2 if count else 0.0)  # let the scheduler see them before timing starts
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.join()


def load_average() -> float | None:
    """The 1-minute load average (/proc/loadavg), or None where there is none."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _load_label(busy: int) -> str:
    return "quiet" if busy == 0 else f"{busy} busy process{'es' if busy > 1 else ''}"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_one(run: Callable[[], object], device: str) -> float:
    """Seconds of one run(): CUDA events around it on a GPU (the device's own clock,
    after a synchronize so that earlier work is not counted), the wall clock on the CPU.
    A :class:`Prepared` run is prepared first, untimed."""
    if isinstance(run, Prepared):
        run.prepare()
        run = run.run
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # elapsed_time is in milliseconds
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def _free_cuda_cache(device: str) -> None:
    """Give cached blocks back, so that the next implementation (or an N×N baseline after
    an out-of-memory error) finds the memory free."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# The most rounds ``min_time`` may add: enough for a stable median of millisecond GPU steps.
MAX_ROUNDS = 100


def _failed(e: Exception) -> dict:
    return {"status": f"failed: {type(e).__name__}: {str(e)[:200]}"}


def _time_impls(case: Case, repeats: int, warmup: int, min_time: float) -> dict[str, dict]:
    runs, result = {}, {}
    for label, factory in case.impls.items():
        try:
            runs[label] = factory()
        except Skip as e:
            result[label] = {"status": f"skipped: {e}"}
        except torch.OutOfMemoryError:
            result[label] = {"status": "skipped: out of memory"}
        except Exception as e:  # a baseline that breaks (a compiler, a library) must not stop the rest
            result[label] = _failed(e)
    for label, run in list(runs.items()):
        try:
            for _ in range(warmup):
                run()
            _sync(case.device)
        except Exception as e:  # as above; also out of memory, or a Skip raised late
            result[label] = _failed(e)
            del runs[label]
            _free_cuda_cache(case.device)
    times = {label: [] for label in runs}
    start = time.perf_counter()
    rounds = 0
    while runs and (rounds < repeats or (time.perf_counter() - start < min_time and rounds < MAX_ROUNDS)):
        for label, run in runs.items():  # alternate implementations every round
            times[label].append(_time_one(run, case.device))
        rounds += 1
    for label, ts in times.items():
        result[label] = {"status": "ok", "median_s": statistics.median(ts), "min_s": min(ts), "runs": len(ts)}
    runs.clear()  # the timed implementations' inputs are freed before the extras run
    gc.collect()
    for label, extra in case.extras.items():
        if result.get(label, {}).get("status") != "ok":
            continue
        try:
            result[label].update(extra())
        except Skip as e:
            result[label]["extras_status"] = f"skipped: {e}"
        except Exception as e:  # as above: a measurement beside the time must not stop the rest
            result[label]["extras_status"] = _failed(e)["status"]
    return result


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_peak_here(module: str, case_name: str, label: str, quick: bool) -> dict:
    """Build one implementation of one case and return its peak extra memory of one run."""
    case = _find_case(module, case_name, quick, "cpu")
    try:
        run = case.impls[label]()
    except Skip as e:
        return {"status": f"skipped: {e}"}
    if case.peak_warmup:
        run()  # warm-up: one-time allocations (thread pools, BLAS buffers) are not the op's
    if isinstance(run, Prepared):
        run.prepare()  # its memory is the input's, not the measured step's
        run = run.run
    gc.collect()
    # Writing 5 to clear_refs resets the kernel's peak-RSS mark (VmHWM) to the current RSS.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_bytes()
    run()
    peak = _vm_hwm_bytes()
    # peak_rss_bytes: the whole process at its peak (interpreter, imports and inputs
    # included), what a memory limit on the process sees.
    return {"status": "ok", "peak_bytes": max(0, peak - before), "peak_rss_bytes": peak}


def _peak_cpu_subprocess(case: Case, label: str, quick: bool, timeout: float) -> dict:
    cmd = [sys.executable, "-m", f"{__package__}.harness", "--peak", case.module, case.name, label] + (
        ["--quick"] if quick else []
    )
    # A fixed mmap threshold makes glibc return every large block to the OS when
    # it is freed, so the warm-up run's memory does not hide the measured run's.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    # From a checkout, `-m` would import the source tree's palfast (no compiled _C)
    # ahead of the installed one: run the subprocess from a neutral cwd.
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired:
        return {"status": "skipped: peak-memory run timed out"}
    if out.returncode != 0:
        return {"status": f"failed: {out.stderr.strip().splitlines()[-1:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _peak_cuda(case: Case, label: str) -> dict:
    try:
        run = case.impls[label]()
    except Skip as e:
        return {"status": f"skipped: {e}"}
    except Exception as e:  # it was timed, so this is rare: say so, go on
        return _failed(e)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    try:
        run()
    except torch.OutOfMemoryError:
        return {"status": "skipped: out of memory"}
    except Exception as e:
        return _failed(e)
    torch.cuda.synchronize()
    return {"status": "ok", "peak_bytes": torch.cuda.max_memory_allocated() - before}


# The heaviest kernels of one run kept in the JSON; the rest of a step's launches are
# small (fills, reductions, casts) and would only make the file long.
KERNELS_KEPT = 8
# Kernel names are whole C++ template signatures; this much names one.
KERNEL_NAME_CHARS = 160


def _dims(value) -> int | None:
    """The product of a kernel's grid or block dimensions as the profiler's trace writes
    them: a list [x, y, z] (or its string form)."""
    if isinstance(value, str):
        value = [int(v) for v in value.strip("[]() ").split(",") if v.strip()]
    if not value:
        return None
    total = 1
    for v in value:
        total *= int(v)
    return total


def summarize_kernels(trace: dict) -> list[dict]:
    """The GPU kernels of a Chrome trace written by torch.profiler (events of category
    "kernel"), one entry per kernel name: launches, the fewest and most blocks a launch
    had, threads per block, GPU time in µs and its share of the run's kernel time;
    heaviest first, the first KERNELS_KEPT."""
    kernels: dict[str, dict] = {}
    for e in trace.get("traceEvents", []):
        if e.get("cat") != "kernel":
            continue
        args = e.get("args", {})
        blocks, threads = _dims(args.get("grid")), _dims(args.get("block"))
        k = kernels.setdefault(
            e["name"],
            {
                "name": e["name"][:KERNEL_NAME_CHARS],
                "launches": 0,
                "min_blocks": blocks,
                "max_blocks": blocks,
                "threads_per_block": threads,
                "gpu_us": 0.0,
            },
        )
        k["launches"] += 1
        k["gpu_us"] += float(e.get("dur", 0.0))
        if blocks is not None:
            k["min_blocks"] = min(k["min_blocks"] or blocks, blocks)
            k["max_blocks"] = max(k["max_blocks"] or blocks, blocks)
    total = sum(k["gpu_us"] for k in kernels.values())
    out = sorted(kernels.values(), key=lambda k: -k["gpu_us"])
    for k in out:
        k["share"] = k["gpu_us"] / total if total else None
    return out[:KERNELS_KEPT]


def kernel_launches(run: Callable[[], object]) -> list[dict]:
    """The CUDA kernels one run() launches (:func:`summarize_kernels` of a torch.profiler
    trace of it): the grid sizes come from the launch records, not from formulas."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        return summarize_kernels(json.loads(path.read_text()))


def _kernels_cuda(case: Case, label: str) -> dict:
    try:
        run = case.impls[label]()
        run()  # warm-up: compilation and one-time set-up launch kernels of their own
        return {"status": "ok", "kernels": kernel_launches(run)}
    except Skip as e:
        return {"status": f"skipped: {e}"}
    except Exception as e:  # the profiler unavailable, out of memory: the timing stands
        return _failed(e)


def _import_module(module: str):
    return importlib.import_module(f"{__package__}.{module}")


def _find_case(module: str, name: str, quick: bool, device: str) -> Case:
    for case in _import_module(module).cases(quick=quick, device=device):
        if case.name == name:
            return case
    raise KeyError(f"no case {name!r} in {module}")


def run_cases(
    modules: list[str],
    *,
    device: str = "cpu",
    quick: bool = False,
    repeats: int = 5,
    warmup: int = 1,
    min_time: float = 0.0,
    memory: bool = True,
    out_dir: str | None = None,
    peak_timeout: float = 600.0,
    progress: Callable[[str], None] = print,
    case_filter: str | None = None,
    contention: int = 0,
    impls: list[str] | None = None,
    kernels: bool = True,
) -> dict:
    """Run every case of ``modules`` (those whose name contains ``case_filter``, when
    given; only the implementations in ``impls`` and the baseline, when given), print a
    table, write JSON + CSV into ``out_dir`` (rewritten after every case). With
    ``contention`` > 0, every case is timed quiet and then beside that many busy-loop
    processes (peak memory and kernels are measured in the quiet pass only). With
    ``kernels`` on CUDA, each row carries the kernels one run launches."""
    suites = [m for m in modules if hasattr(_import_module(m), "run_suite")]
    for module in suites:  # evaluations with their own report, not timed (bench_strategies.py)
        _import_module(module).run_suite(quick=quick, out_dir=out_dir, task_filter=case_filter, progress=progress)
    modules = [m for m in modules if m not in suites]
    if suites and not modules:
        return {"suites": suites}
    env = environment()
    env["device"] = device
    env["bf16_mm_tflops"] = matmul_rate(device)
    env["load_average_start"] = load_average()
    rows = []
    report = {"environment": env, "results": rows, "targets": []}
    stem = _report_stem(device)
    loads = [0, contention] if contention > 0 else [0]
    for module in modules:
        mod = _import_module(module)
        for case in mod.cases(quick=quick, device=device):
            if case_filter and case_filter not in case.name:
                continue
            if impls:  # the baseline stays: the ratios are taken against it
                case = dataclasses.replace(
                    case, impls={k: v for k, v in case.impls.items() if k in impls or k == case.baseline}
                )
            for busy in loads:
                progress(f"[{module}] {case.name} ({_load_label(busy)}) ...")
                with busy_processes(busy):
                    load_before = load_average()
                    timing = _time_impls(case, repeats, warmup, min_time)
                    load_after = load_average()
                for label in case.impls:
                    row = {
                        "module": module,
                        "case": case.name,
                        "impl": label,
                        **case.params,
                        "baseline": case.baseline,
                        "load": _load_label(busy),
                        "busy_processes": busy,
                        "load_average": [load_before, load_after],
                        **{k: v for k, v in timing[label].items()},
                    }
                    if row.get("median_s"):
                        if case.flops:
                            row["flops"] = case.flops
                            row["tflops"] = case.flops / row["median_s"] / 1e12
                            if env["bf16_mm_tflops"]:
                                row["mm_share"] = row["tflops"] / env["bf16_mm_tflops"]
                        for other in (case.baseline, *case.compare_to):
                            if timing.get(other, {}).get("median_s"):
                                row["speedup_vs_" + other] = timing[other]["median_s"] / row["median_s"]
                    if memory and busy == 0 and row["status"] == "ok":
                        peak = (
                            _peak_cuda(case, label)
                            if device.startswith("cuda")
                            else _peak_cpu_subprocess(case, label, quick, peak_timeout)
                        )
                        row["peak_mib"] = peak["peak_bytes"] / 2**20 if peak["status"] == "ok" else None
                        if peak.get("peak_rss_bytes") is not None:
                            row["peak_rss_mib"] = peak["peak_rss_bytes"] / 2**20
                        if peak["status"] != "ok":
                            row["memory_status"] = peak["status"]
                    if kernels and device.startswith("cuda") and busy == 0 and row["status"] == "ok":
                        launched = _kernels_cuda(case, label)
                        row["kernels"] = launched.get("kernels")
                        if launched["status"] != "ok":
                            row["kernels_status"] = launched["status"]
                    rows.append(row)
                    _free_cuda_cache(device)
                _add_memory_ratios(rows, case)
                gc.collect()
            env["load_average_end"] = load_average()
            report["targets"] = _targets(modules, rows, env)
            if out_dir:
                write_report(report, out_dir, stem, quiet=True)
    print(format_table(report))
    if out_dir:
        write_report(report, out_dir, stem)
    return report


def _targets(modules: list[str], rows: list[dict], env: dict) -> list[dict]:
    """The targets of every module that states some (``targets(rows, environment)``),
    judged on the rows so far; each carries its module's name."""
    out = []
    for module in modules:
        judge = getattr(_import_module(module), "targets", None)
        if judge is not None:
            mine = [r for r in rows if r["module"] == module]
            out += [{"module": module, **t} for t in judge(mine, env)]
    return out


def _add_memory_ratios(rows: list[dict], case: Case) -> None:
    mine = [
        r for r in rows if r["case"] == case.name and r["module"] == case.module and r.get("busy_processes", 0) == 0
    ]
    base = next((r.get("peak_mib") for r in mine if r["impl"] == case.baseline), None)
    for r in mine:
        if base and r.get("peak_mib"):
            r["memory_ratio_vs_" + case.baseline] = base / r["peak_mib"]


#: Row fields printed after the ratios when a row has them: (key, label, format).
SHOWN_FIELDS = (
    ("mm_share", "of bf16 mm", ".1%"),
    ("peak_rss_mib", "peak RSS MiB", ".0f"),
    ("recall_at_10", "recall@10", ".4f"),
    ("extras_status", "extras", ""),
)


def format_table(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"palfast {env['palfast']} | torch {env['torch']} | device {env['device']} "
        f"({env['cuda_device'] or env['cpu']}, {env['threads']} threads) | git {env['git_sha']}"
    ]
    load = f" | load average {env['load_average_start']}" if env.get("load_average_start") else ""
    lines[0] += load
    if env.get("bf16_mm_tflops"):
        lines[0] += f" | bf16 mm {env['bf16_mm_tflops']:.0f} TFLOP/s ({MM_RATE_SIZE}³, measured)"
    header = (
        f"{'case':<44} {'impl':<22} {'load':<16} {'median ms':>10} {'TFLOP/s':>8} "
        f"{'speedup':>8} {'peak MiB':>9} {'mem x':>6}  other ratios"
    )
    lines += [header, "-" * len(header)]
    for r in report["results"]:
        where = f"{r['case']:<44} {r['impl']:<22} {r.get('load', 'quiet'):<16}"
        if r["status"] != "ok":
            lines.append(f"{where} {r['status']}")
            continue
        speedups = {k[len("speedup_vs_") :]: v for k, v in r.items() if k.startswith("speedup_vs_")}
        speed = speedups.pop(r.get("baseline"), None)
        others = ", ".join(
            [f"vs {k} {v:.2f}x" for k, v in speedups.items() if k != r["impl"] and v is not None]
            + [f"{label} {r[key]:{fmt}}" for key, label, fmt in SHOWN_FIELDS if r.get(key) is not None]
        )
        mem = next((v for k, v in r.items() if k.startswith("memory_ratio_vs_")), None)
        peak, tflops = r.get("peak_mib"), r.get("tflops")
        lines.append(
            f"{where} {1e3 * r['median_s']:>10.2f} "
            f"{(f'{tflops:.3g}' if tflops is not None else '-'):>8} "
            f"{(f'{speed:.2f}x' if speed else '-'):>8} "
            f"{(f'{peak:.1f}' if peak is not None else '-'):>9} "
            f"{(f'{mem:.1f}x' if mem else '-'):>6}  {others}".rstrip()
        )
    notes = sorted({r["flop_count"] for r in report["results"] if r.get("flop_count")})
    if notes:
        lines.append("TFLOP/s: effective, " + "; ".join(notes))
    if report.get("targets"):
        lines.append("targets:")
        for t in report["targets"]:
            value = "-" if t.get("value") is None else f"{t['value']:.4g} {t.get('unit', '')}".rstrip()
            lines.append(f"  {t['target']:<64} {value:>14}  {t['status']}")
    return "\n".join(lines)


def _report_stem(device: str) -> str:
    return f"bench_{device.split(':')[0]}_{time.strftime('%Y%m%d_%H%M%S')}"


def write_report(report: dict, out_dir: str, stem: str | None = None, quiet: bool = False) -> tuple[Path, Path]:
    """Write ``report`` as STEM.json and STEM.csv into ``out_dir`` (STEM: bench_DEVICE_TIME
    unless given), replacing earlier versions of the same files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or _report_stem(report["environment"]["device"])
    jpath, cpath = out / f"{stem}.json", out / f"{stem}.csv"
    # Written aside and renamed: a run killed by a time limit mid-write keeps the last whole file.
    tmp = jpath.with_name(jpath.name + ".tmp")
    tmp.write_text(dumps(report, indent=2, default=str))
    tmp.replace(jpath)
    # The kernel lists stay in the JSON: a CSV cell cannot hold them readably.
    keys = sorted(
        {k for r in report["results"] for k in r if k != "kernels"},
        key=lambda k: (k not in ("module", "case", "impl"), k),
    )
    with cpath.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in report["results"]:
            w.writerow({k: v for k, v in r.items() if k != "kernels"})
    if not quiet:
        print(f"wrote {jpath} and {cpath}")
    return jpath, cpath


if __name__ == "__main__":  # the peak-memory subprocess: harness --peak MODULE CASE IMPL
    import argparse

    p = argparse.ArgumentParser(description="internal: peak memory of one benchmark run")
    p.add_argument("--peak", nargs=3, metavar=("MODULE", "CASE", "IMPL"), required=True)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    print(json.dumps(measure_peak_here(*a.peak, quick=a.quick)))
