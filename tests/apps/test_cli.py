"""The palfast command line: info, bench (the harness), --help."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from palfast import cli
from palfast._ops import BUILD_INFO


def test_info_tells_what_was_compiled(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "CPU: compiled" in out
    assert f"torch          {torch.__version__}" in out
    assert ("CUDA: compiled for sm_" in out) == BUILD_INFO["with_cuda"]
    assert "info_nce" in out and "FAISS" in out


def _bench_info_nce_on_cpu(out_dir, *args: str) -> int:
    """``palfast bench`` of info_nce on the CPU, one repeat, results in ``out_dir``:
    its exit status."""
    return cli.main(["bench", "--only", "info_nce", "--repeats", "1", "--device", "cpu", "--out", str(out_dir), *args])


@pytest.mark.slow
def test_bench_quick_writes_json_csv_and_table(tmp_path, capsys):
    # N=1024 has both steps (fwd, fwd+bwd); each row's peak memory costs a subprocess.
    assert _bench_info_nce_on_cpu(tmp_path, "--quick", "--filter", "N=1024") == 0
    out = capsys.readouterr().out
    assert "palfast" in out and "naive_eager" in out and "git" in out
    assert "TFLOP/s" in out and "fwd counted as 2·N²·D" in out and "fwd+bwd counted as 6·N²·D" in out
    [jpath] = tmp_path.glob("*.json")
    [cpath] = tmp_path.glob("*.csv")
    report = json.loads(jpath.read_text())
    assert report["environment"]["torch"] == torch.__version__
    assert "inf-cl" in report["environment"]["baseline_packages"]
    rows = [r for r in report["results"] if r["status"] == "ok"]
    assert {r["impl"] for r in rows} >= {"palfast", "naive_eager"}
    assert {r["step"] for r in rows} == {"fwd", "fwd+bwd"}
    for r in rows:
        assert r["median_s"] > 0 and r["peak_mib"] is not None
        assert r["tflops"] == pytest.approx(r["flops"] / r["median_s"] / 1e12)
        assert r["speedup_vs_naive_eager"] > 0
    # The CUDA speed targets (docs/cuda.md, "What the benchmark reports") need a GPU:
    # stated, and unmeasured here.
    assert report["targets"] and all(t["status"] == "unmeasured (no GPU)" for t in report["targets"])
    assert "unmeasured (no GPU)" in out
    assert len(list(csv.DictReader(cpath.open()))) == len(report["results"])


def test_help_explains_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "bench", "info"):
        assert cmd in out


@pytest.mark.slow
def test_bench_contention_times_quiet_and_busy(tmp_path, capsys):
    assert _bench_info_nce_on_cpu(tmp_path, "--quick", "--filter", "N=1024", "--no-memory", "--contention") == 0
    out = capsys.readouterr().out
    assert "quiet" in out and "1 busy process" in out and "load average" in out
    [jpath] = tmp_path.glob("*.json")
    rows = json.loads(jpath.read_text())["results"]
    assert {(r["impl"], r["busy_processes"]) for r in rows} >= {
        ("palfast", 0),
        ("palfast", 1),
        ("naive_eager", 0),
        ("naive_eager", 1),
    }
    for r in rows:
        assert r["status"] == "ok" and r["speedup_vs_naive_eager"] > 0
        assert len(r["load_average"]) == 2


def test_bench_contention_needs_a_busy_process(capsys):
    assert cli.main(["bench", "--contention", "--busy", "0", "--device", "cpu"]) == 2
    assert "--busy must be >= 1" in capsys.readouterr().err


def test_bench_min_time_must_not_be_negative(capsys):
    assert cli.main(["bench", "--min-time", "-1", "--device", "cpu"]) == 2
    assert "--min-time must be >= 0 seconds, got -1.0" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_cpu_skips_inf_cl_with_its_reason(tmp_path, capsys):
    status = _bench_info_nce_on_cpu(
        tmp_path, "--filter", "N=1024 D=128 float32 fwd+bwd", "--impls", "palfast", "inf_cl", "--no-memory"
    )
    assert status == 0
    assert "inf_cl" in capsys.readouterr().out
    [jpath] = tmp_path.glob("*.json")
    status = {r["impl"]: r["status"] for r in json.loads(jpath.read_text())["results"]}
    assert status == {
        "palfast": "ok",
        "naive_eager": "ok",
        "inf_cl": "skipped: Inf-CL's kernels are written in Triton for CUDA GPUs",
    }


# A bench run that stays short if an argument check is missing (one case, one impl, no
# subprocess): the test then fails on the exit status, not on time.
SMALL_BENCH = [
    "--quick",
    "--filter",
    "N=1024 D=128 float32 fwd+bwd",
    "--impls",
    "palfast",
    "--no-memory",
    "--no-kernels",
]


@pytest.mark.parametrize(
    "args, named, allowed",
    [
        (["--device", "bogus"], "argument --device", "cpu, cuda, cuda:N or auto"),
        (["--device", "cuda:x"], "argument --device", "cpu, cuda, cuda:N or auto"),
        (["--repeats", "-1"], "argument --repeats", "an integer >= 1"),
        (["--repeats", "0"], "argument --repeats", "an integer >= 1"),
        (["--warmup", "-1"], "argument --warmup", "an integer >= 0"),
        (["--only", "bogus"], "argument --only", "'info_nce', 'covariance', 'candidates'"),
        (["--only", "info_nce", "bogus"], "argument --only", "'info_nce', 'covariance', 'candidates'"),
    ],
)
def test_bench_bad_arguments_are_usage_errors_and_write_nothing(tmp_path, capsys, args, named, allowed):
    out = tmp_path / "results"
    argv = ["bench", "--repeats", "1", *SMALL_BENCH, "--out", str(out), *args]
    if "--only" not in args:
        argv += ["--only", "info_nce"]
    if "--device" not in args:
        argv += ["--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert named in err and allowed in err and args[-1] in err
    assert not out.exists()


def test_bench_device_cuda_needs_a_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: --device cuda is valid here")
    assert cli.main(["bench", "--device", "cuda:0", "--out", str(tmp_path / "r")]) == 2
    assert "needs a visible GPU" in capsys.readouterr().err and not (tmp_path / "r").exists()
