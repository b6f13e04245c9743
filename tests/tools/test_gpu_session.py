"""tools/gpu_session.sh, the first command on a GPU machine (docs/cuda.md, "On a GPU"),
and its Python parts in tools/gpu_bench.py, checked without a GPU: the order of the
steps and their caps, where compute-sanitizer is looked for, the record a run leaves in
$OUT/steps.json as it goes (also when it is cut off), the curated CUDA test ids, and the
shapes of the sanitizers' workload."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_session.sh"
CHECKS = ["env", "build", "memcheck", "racecheck", "synccheck", "initcheck", "tests"]
# Only the test file's interpreter on PATH: no compute-sanitizer or nvcc of the machine.
BARE_PATH = f"{Path(sys.executable).parent}:/usr/bin:/bin"


def _gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "tools" / "gpu_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args, **env):
    full = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full, timeout=120)


def _plan(**env):
    out = _run("--plan", **env)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_checks_run_before_the_bench_and_their_caps_leave_it_time():
    plan = _plan()
    total, safety = map(int, re.search(r"total (\d+) s, (\d+) s kept", plan).groups())
    steps = re.findall(r"^step (\w+) cap (\d+|what is left)$", plan, re.M)
    assert [name for name, _ in steps] == [*CHECKS, "bench"]
    assert steps[-1][1] == "what is left"
    checks_s = sum(int(cap) for _, cap in steps[:-1])
    bench_min = int(re.search(r"^BENCH_MIN_S=(\d+)", SCRIPT.read_text(), re.M).group(1))
    # Every check may take its whole cap and the benchmark still gets its least useful time.
    assert checks_s + bench_min <= total - safety, (checks_s, bench_min, total, safety)
    wrong = _run("--plan", "--steps", "memcheck,nope")
    assert wrong.returncode == 2 and "no step 'nope'" in wrong.stderr


def _fake_tool(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


@pytest.mark.skipif(
    shutil.which("compute-sanitizer", path=BARE_PATH) is not None, reason="a compute-sanitizer in /usr/bin"
)
def test_compute_sanitizer_is_found_beside_nvcc_and_in_cuda_home(tmp_path):
    nvcc = _fake_tool(tmp_path / "toolkit" / "bin" / "nvcc")
    beside = _fake_tool(tmp_path / "toolkit" / "bin" / "compute-sanitizer")
    plan = _plan(PATH=BARE_PATH, CUDACXX=str(nvcc))
    assert f"compute-sanitizer: {beside.resolve()}" in plan.splitlines()
    # A toolkit that keeps it in its own folder, found through CUDA_HOME alone.
    home = tmp_path / "home"
    _fake_tool(home / "bin" / "nvcc")
    own = _fake_tool(home / "compute-sanitizer" / "compute-sanitizer")
    plan = _plan(PATH=BARE_PATH, CUDA_HOME=str(home))
    assert f"compute-sanitizer: {own}" in plan.splitlines()
    # One on PATH comes first.
    on_path = _fake_tool(tmp_path / "onpath" / "compute-sanitizer")
    plan = _plan(PATH=f"{on_path.parent}:{BARE_PATH}", CUDACXX=str(nvcc))
    assert f"compute-sanitizer: {on_path}" in plan.splitlines()


@pytest.mark.slow
def test_steps_json_records_each_step_as_it_ends_and_survives_a_cut(tmp_path):
    """The run is killed while its second step runs: steps.json still holds the first
    step's verdict, and names the step that was running."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), "--dry-run", "--steps", "tests"],
        env={**os.environ, "PYTHON": sys.executable, "OUT": str(out)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    steps_json = out / "steps.json"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and '"tests", "verdict": "RUNNING"' not in (
            steps_json.read_text() if steps_json.exists() else ""
        ):
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    record = json.loads(steps_json.read_text())
    env, running = record["steps"]
    assert env["name"] == "env" and env["verdict"] == "PASS" and env["cap_s"] == 15
    assert env["log"] == "env.log" and "torch" in (out / "env.log").read_text()
    assert running["name"] == "tests" and running["verdict"] == "RUNNING"
    assert record["dry_run"] is True and record["gpu"] is False


@pytest.mark.slow
def test_steps_json_after_a_whole_run_of_some_steps(tmp_path):
    out = tmp_path / "out"
    done = _run("--dry-run", "--steps", "racecheck", OUT=str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "--- env: PASS in " in done.stdout and "--- racecheck: SKIPPED in " in done.stdout
    steps = json.loads((out / "steps.json").read_text())["steps"]
    assert [(s["name"], s["verdict"]) for s in steps] == [("env", "PASS"), ("racecheck", "SKIPPED")]
    assert steps[1]["note"].startswith("skipped: no GPU")
    assert sorted(p.name for p in out.iterdir()) == ["env.log", "racecheck.log", "steps.json"]


def test_curated_cuda_test_ids_all_exist(tmp_path):
    """Every id in tools/gpu_tests.txt names a test (collected as on a GPU), and a list
    with an id that names none fails."""
    gpu_bench = ROOT / "tools" / "gpu_bench.py"
    cmd = [sys.executable, "-P", str(gpu_bench), "tests", "--collect-only"]
    ok = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    listed = _gpu_bench().test_ids(ROOT / "tools" / "gpu_tests.txt")
    collected = int(re.search(r"(\d+) tests? collected", ok.stdout).group(1))
    assert collected >= len(listed) > 0
    bad = tmp_path / "bad.txt"
    bad.write_text(f"# a comment\n{listed[0]}\ntests/losses/test_info_nce_cuda.py::test_no_such_test\n")
    wrong = subprocess.run([*cmd, "--list", str(bad)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert wrong.returncode != 0


def test_workload_shapes_reach_every_tile_case():
    """The sanitizers' workload has partial tiles, an odd D, an even D that is not a
    multiple of 16 (FA2 kernels), and a D past the FA2 kernels' 128 (16-bit z in the
    shared-memory tile kernels): csrc/cuda/info_nce/info_nce_fa2.cuh, kMaxD and kB."""
    gpu_bench = _gpu_bench()
    fa2_max_d = fa2_rows = 128
    shapes = [(n, d) for n, d, _ in gpu_bench.WORKLOAD_SHAPES]
    assert all(n % 64 and n % fa2_rows for n, _ in shapes)
    assert any(n > 2 * fa2_rows for n, _ in shapes)
    assert any(d <= fa2_max_d and d % 2 for _, d in shapes)
    assert any(d <= fa2_max_d and d % 2 == 0 and d % 16 for _, d in shapes)
    assert any(d > fa2_max_d for _, d in shapes)
    assert len(gpu_bench.WORKLOAD_DTYPES) == 4
