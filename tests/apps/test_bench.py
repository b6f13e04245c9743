"""The benchmark harness and the info_nce cases (palfast/benchmarks/, bench/README.md):
effective FLOPs and TFLOP/s, ratios, the Inf-CL baseline's skip and glue, kernel
records, the CUDA speed targets (docs/cuda.md), and tools/gpu_bench.py's summary. No GPU needed: the
CUDA plan is built, not run, and GPU results are written by hand."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from palfast.benchmarks import bench_info_nce as bi
from palfast.benchmarks import harness
from palfast.benchmarks.harness import Case, Skip, deterministic_algorithms

ROOT = Path(__file__).resolve().parents[2]


def test_effective_flops_count_the_dense_algorithm():
    assert bi.effective_flops(4096, 128, "fwd") == 2 * 4096**2 * 128
    assert bi.effective_flops(65536, 128, "fwd+bwd") == 6 * 65536**2 * 128
    # The step target: 6 ms for forward + backward at N = 65536, D = 128 is about 550 TFLOP/s.
    assert bi.effective_flops(65536, 128, "fwd+bwd") / 6e-3 / 1e12 == pytest.approx(550, rel=0.01)


def test_cuda_plan_has_the_issue_sizes_and_baselines():
    cases = bi.cases(quick=False, device="cuda")  # built, not run
    got = {(c.params["N"], c.params["dtype"], c.params["step"]) for c in cases}
    want = {(N, "bfloat16", step) for N in (4096, 16384, 65536) for step in ("fwd", "fwd+bwd")}
    assert got == want | {(65536, "float32", step) for step in ("fwd", "fwd+bwd")}
    # The targets' size first, so that a run cut by a time limit has it.
    assert cases[0].params["N"] == 65536
    for c in cases:
        assert c.baseline == "naive_eager"
        others = {"torch_compile_naive", "inf_cl"}
        palfast_variants = {"palfast_tf32", "palfast_deterministic", "palfast_sym", "palfast_tile"}
        assert set(c.compare_to) == others | palfast_variants
        assert {"torch_compile_naive", "inf_cl"} <= set(c.impls)
        # Every CUDA backward kernel is timed: deterministic mode and PALFAST_INFO_NCE_BACKWARD pick them.
        for impl in ("palfast_deterministic", "palfast_sym", "palfast_tile"):
            assert (impl in c.impls) == (c.params["step"] == "fwd+bwd")
        # float32 is timed with allow_tf32 off (palfast: 3×TF32) and on (plain TF32).
        assert "palfast_tf32" in c.impls
        if c.params["dtype"] != "float32":
            with pytest.raises(Skip, match="allow_tf32"):
                c.impls["palfast_tf32"]()
        assert c.flops == bi.effective_flops(c.params["N"], bi.D, c.params["step"])
        assert c.name.endswith(c.params["step"]) and c.device == "cuda"
    cpu = bi.cases(quick=True, device="cpu")
    assert {c.params["step"] for c in cpu} == {"fwd", "fwd+bwd"}
    assert {c.params["dtype"] for c in cpu} == {"float32"}


def test_inf_cl_skips_on_the_cpu_and_when_missing(monkeypatch):
    [cpu_case] = [c for c in bi.cases(quick=False, device="cpu") if c.params["N"] == 1024 and c.params["step"] == "fwd"]
    with pytest.raises(Skip, match="Triton for CUDA GPUs"):
        cpu_case.impls["inf_cl"]()
    monkeypatch.setitem(sys.modules, "inf_cl", None)  # makes `import inf_cl` fail
    cuda_case = bi.cases(quick=False, device="cuda")[0]
    with pytest.raises(Skip, match="inf_cl cannot be imported.*pip install inf-cl"):
        cuda_case.impls["inf_cl"]()


def _fake_inf_cl(swap_labels: bool = False):
    """inf_cl.cal_inf_loss as its source computes it (inf_cl/flash.py, _cal_flash_loss):
    mean_i of logsumexp_k(scale q_i·k_k) − scale q_i·k_{labels_i}, no diagonal mask."""

    def cal_inf_loss(q, k, labels=None, scale=None, head_dim=256):
        assert head_dim == q.shape[1]
        labels = labels.roll(1) if swap_labels else labels
        logits = scale * q @ k.T
        return (torch.logsumexp(logits, 1) - logits.gather(1, labels[:, None])[:, 0]).mean()

    return types.SimpleNamespace(cal_inf_loss=cal_inf_loss)


@pytest.mark.parametrize("swap_labels", [False, True])
def test_inf_cl_glue_is_checked_against_the_dense_formula(monkeypatch, swap_labels):
    monkeypatch.setitem(sys.modules, "inf_cl", _fake_inf_cl(swap_labels))
    bi._inf_cl_mismatch.cache_clear()
    try:
        mismatch = bi._inf_cl_mismatch("cpu")
    finally:
        bi._inf_cl_mismatch.cache_clear()
    if swap_labels:  # a wrong positive index must not pass as Inf-CL
        assert mismatch and "not timed" in mismatch
    else:
        assert mismatch is None


def _sleeper(seconds):
    def factory():
        return lambda: time.sleep(seconds)

    return factory


def _cannot_run():
    raise Skip("no way")


def _fake_module(monkeypatch, judged):
    mod = types.ModuleType("palfast.benchmarks.bench_fake")

    def cases(quick=False, device="cpu"):
        impls = {"fast": _sleeper(0.01), "base": _sleeper(0.03), "other": _sleeper(0.02)}
        skipping = {"base": _sleeper(0.01), "gone": _cannot_run}
        return [
            Case(
                "bench_fake",
                "fake one",
                {"step": "fwd", "flop_count": "fwd counted as 1e9"},
                impls,
                "base",
                compare_to=("other",),
                flops=1e9,
            ),
            Case("bench_fake", "fake two", {}, skipping, "base"),
        ]

    def targets(rows, env):
        judged.append(len(rows))
        return [{"target": "fast below 1 s", "value": 0.5, "unit": "s", "limit": 1.0, "status": "met"}]

    mod.cases, mod.targets = cases, targets
    monkeypatch.setitem(sys.modules, "palfast.benchmarks.bench_fake", mod)


@pytest.mark.slow
def test_harness_reports_tflops_ratios_targets_and_writes_after_each_case(monkeypatch, tmp_path, capsys):
    judged, seen = [], []

    def progress(msg):
        if "fake two" in msg:  # the first case's results must already be on disk
            [path] = tmp_path.glob("bench_cpu_*.json")
            seen.extend(json.loads(path.read_text())["results"])

    _fake_module(monkeypatch, judged)
    report = harness.run_cases(
        ["bench_fake"], device="cpu", repeats=3, memory=False, out_dir=str(tmp_path), progress=progress
    )
    assert {r["case"] for r in seen} == {"fake one"}
    rows = {(r["case"], r["impl"]): r for r in report["results"]}
    fast, base, other = (rows["fake one", k] for k in ("fast", "base", "other"))
    assert fast["tflops"] == pytest.approx(1e9 / fast["median_s"] / 1e12)
    assert fast["speedup_vs_base"] == pytest.approx(base["median_s"] / fast["median_s"])
    assert fast["speedup_vs_other"] == pytest.approx(other["median_s"] / fast["median_s"])
    assert fast["speedup_vs_base"] > other["speedup_vs_base"] > 1.0 > base["speedup_vs_other"]
    assert rows["fake two", "gone"]["status"] == "skipped: no way"
    assert "tflops" not in rows["fake two", "base"]  # that case counts no FLOPs
    assert judged == [3, 5]  # the targets are judged after every case
    assert report["targets"] == [
        {"module": "bench_fake", "target": "fast below 1 s", "value": 0.5, "unit": "s", "limit": 1.0, "status": "met"}
    ]
    out = capsys.readouterr().out
    assert "TFLOP/s" in out and "vs other" in out and "fwd counted as 1e9" in out
    assert "fast below 1 s" in out and "met" in out
    [path] = tmp_path.glob("bench_cpu_*.json")
    assert json.loads(path.read_text())["targets"] == report["targets"]


def test_rows_carry_their_share_of_the_measured_matmul_rate(monkeypatch, tmp_path, capsys):
    """On CUDA every row with TFLOP/s gets ``mm_share``, its share of the bf16 matmul rate
    measured in the same run (here a stand-in rate: no GPU); the CPU measures none."""
    assert harness.matmul_rate("cpu") is None
    _fake_module(monkeypatch, [])
    report = harness.run_cases(["bench_fake"], device="cpu", repeats=3, memory=False)
    assert report["environment"]["bf16_mm_tflops"] is None
    assert not any("mm_share" in r for r in report["results"])
    monkeypatch.setattr(harness, "matmul_rate", lambda device: 2e-3)
    capsys.readouterr()
    report = harness.run_cases(["bench_fake"], device="cpu", repeats=3, memory=False)
    fast = next(r for r in report["results"] if r["impl"] == "fast")
    assert fast["mm_share"] == pytest.approx(fast["tflops"] / 2e-3)
    assert not any("mm_share" in r for r in report["results"] if "tflops" not in r)
    out = capsys.readouterr().out
    assert "bf16 mm 0 TFLOP/s (8192³, measured)" in out and f"of bf16 mm {fast['mm_share']:.1%}" in out


def test_summarize_kernels_reads_profiler_trace():
    trace = {
        "traceEvents": [
            {
                "ph": "X",
                "cat": "kernel",
                "name": "void ns::tile_kernel<T>(int)",
                "dur": 60.0,
                "args": {"grid": [66, 8, 1], "block": [128, 1, 1]},
            },
            {
                "ph": "X",
                "cat": "kernel",
                "name": "void ns::tile_kernel<T>(int)",
                "dur": 20.0,
                "args": {"grid": [16, 1, 1], "block": [128, 1, 1]},
            },
            {
                "ph": "X",
                "cat": "kernel",
                "name": "fill",
                "dur": 20.0,
                "args": {"grid": "[2, 1, 1]", "block": "[256, 1, 1]"},
            },
            {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "dur": 500.0, "args": {}},
        ]
    }
    tile, fill = harness.summarize_kernels(trace)
    assert tile == {
        "name": "void ns::tile_kernel<T>(int)",
        "launches": 2,
        "min_blocks": 16,
        "max_blocks": 528,
        "threads_per_block": 128,
        "gpu_us": 80.0,
        "share": 0.8,
    }
    assert (fill["min_blocks"], fill["threads_per_block"], fill["share"]) == (2, 256, 0.2)


def _gpu_rows(fwd_ms, step_ms, fp32_ms, blocks, peaks):
    rows = []
    for (N, dtype, step), ms in {
        (65536, "bfloat16", "fwd"): fwd_ms,
        (65536, "bfloat16", "fwd+bwd"): step_ms,
        (65536, "float32", "fwd+bwd"): fp32_ms,
        (4096, "bfloat16", "fwd"): 1.0,
        (4096, "bfloat16", "fwd+bwd"): 1.0,
        (16384, "bfloat16", "fwd"): 1.0,
        (16384, "bfloat16", "fwd+bwd"): 1.0,
    }.items():
        kernels = [
            {"name": "void palfast::cuda::tile<T>()", "min_blocks": blocks, "share": 0.8},
            {"name": "at::native::reduce_kernel", "min_blocks": 1, "share": 0.15},
            {"name": "void palfast::cuda::small()", "min_blocks": 1, "share": 0.05},
        ]
        rows.append(
            {
                "module": "bench_info_nce",
                "impl": "palfast",
                "N": N,
                "dtype": dtype,
                "step": step,
                "status": "ok",
                "median_s": ms / 1e3,
                "busy_processes": 0,
                "kernels": kernels,
                "peak_mib": peaks.get((N, dtype, step)),
            }
        )
    return rows


def test_targets_are_unmeasured_without_a_gpu():
    got = bi.targets(_gpu_rows(1, 1, 1, 1000, {}), {"device": "cpu"})
    assert len(got) == 8
    assert all(t["status"] == "unmeasured (no GPU)" for t in got)


def test_targets_are_judged_on_gpu_rows():
    env = {"device": "cuda", "sm_count": 132}
    peaks = {(16384, "bfloat16", "fwd+bwd"): 100.0, (65536, "bfloat16", "fwd+bwd"): 390.0}
    met = bi.targets(_gpu_rows(1.9, 5.9, 20.0, 264, peaks), env)
    assert [t["status"] for t in met] == ["met"] * 8
    assert met[2]["value"] == pytest.approx(20.0 / 5.9)
    # torch's one-block reduction and palfast's light kernel do not count, its tile kernel does
    assert met[3]["value"] == 264 and met[3]["limit"] == 264
    assert [k["name"] for k in met[3]["kernels"]] == ["void palfast::cuda::tile<T>()"]
    peaks[65536, "bfloat16", "fwd+bwd"] = 1600.0  # an N×N buffer: 16× for 4× the rows
    missed = bi.targets(_gpu_rows(2.1, 6.1, 25.0, 263, peaks), env)
    assert [t["status"] for t in missed] == ["missed"] * 8
    some = [r for r in _gpu_rows(1.9, 5.9, 20.0, 264, {}) if r["N"] != 16384]
    partial = {t["target"]: t["status"] for t in bi.targets(some, env)}
    assert partial["forward <= 2 ms at N=65536 bf16"] == "met"
    assert partial["fwd heavy kernels >= 2 x SMs blocks at N=16384 bf16"] == (
        "unmeasured (palfast not timed at N=16384 bfloat16 fwd)"
    )
    assert any(
        s == "unmeasured (peak memory not measured)"
        for s in (t["status"] for t in bi.targets(_gpu_rows(1, 1, 1, 300, {}), env))
    )


def _gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "tools" / "gpu_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_bench_table_prints_targets_and_heavy_kernels(tmp_path, capsys):
    gpu_bench = _gpu_bench()
    assert (
        gpu_bench._short_name("void palfast::cuda::(anonymous namespace)::sym_lse_kernel<Tile<bf16>>(const T*)")
        == "sym_lse_kernel"
    )
    assert gpu_bench.table(tmp_path) == 1
    env = {
        "palfast": "0",
        "torch": torch.__version__,
        "device": "cuda",
        "cuda_device": "H200",
        "threads": 1,
        "git_sha": "abc",
        "sm_count": 132,
    }
    rows = _gpu_rows(1.9, 5.9, 20.0, 264, {})
    for r in rows:
        r.update(case=f"info_nce N={r['N']} {r['step']}", load="quiet")
    report = {"environment": env, "results": rows, "targets": bi.targets(rows, env)}
    (tmp_path / "bench_cuda_1.json").write_text(json.dumps(report))
    assert gpu_bench.table(tmp_path) == 0
    out = capsys.readouterr().out
    assert "forward <= 2 ms at N=65536 bf16" in out and "met" in out
    assert (
        "heavy kernels of palfast, info_nce N=4096 fwd (132 SMs): tile 264 blocks 80%, reduce_kernel 1 blocks 15%"
    ) in out
    assert "small" not in out


def test_deterministic_runs_under_the_flag_and_restores_the_callers():
    run = bi._inside(torch.are_deterministic_algorithms_enabled, lambda: deterministic_algorithms(warn_only=True))
    assert not torch.are_deterministic_algorithms_enabled()
    assert run() is True
    assert not torch.are_deterministic_algorithms_enabled()


# ---- bench_active and bench_store (docs/active.md, "Large pools"): the quick form, shrunk
# further so that it runs in seconds; the 10^6 runs are benchmarks, not tests.


def _run_quick(bench: str, out_dir) -> dict:
    """The harness's report of ``bench``'s quick form: one repeat, no warm-up, no memory
    subprocess, silent, written into ``out_dir``."""
    return harness.run_cases(
        [bench], quick=True, repeats=1, warmup=0, memory=False, out_dir=str(out_dir), progress=lambda msg: None
    )


def _small_active(monkeypatch):
    from palfast.benchmarks import bench_active as ba

    monkeypatch.setattr(ba, "QUICK_SIZES", (2000,))
    monkeypatch.setattr(ba, "N_CLASSES", 50)  # 150 known rows, the rest free
    monkeypatch.setattr(ba, "RECALL_QUERIES", 300)
    monkeypatch.setattr(ba, "QUICK_EXACT_MAX_N", 2000)
    ba._exact_neighbours.cache_clear()
    return ba


@pytest.mark.slow
def test_active_bench_quick_runs_every_index_with_recall(monkeypatch, tmp_path):
    pytest.importorskip("faiss")
    ba = _small_active(monkeypatch)
    report = _run_quick("bench_active", tmp_path)
    rows = {r["index"]: r for r in report["results"]}
    assert set(rows) == {"exact", "ivf", "hnsw", "ivf-join"}
    for r in rows.values():
        assert r["status"] == "ok" and r["N"] == 2000 and r["budget"] == ba.BUDGET
        assert r["recall_queries"] == 300 and r["build_s"] > 0 and "extras_status" not in r
        assert 0.0 <= r["recall_at_10"] <= 1.0
    assert rows["exact"]["recall_at_10"] == 1.0  # the exact round against itself
    assert rows["hnsw"]["recall_at_10"] > 0.9
    assert rows["ivf-join"]["recall_at_10"] > 0.9
    assert all(t["status"] == "unmeasured (not run)" for t in report["targets"])
    [path] = tmp_path.glob("bench_cpu_*.json")
    assert json.loads(path.read_text())["results"][0]["recall_at_10"] == 1.0
    ba._exact_neighbours.cache_clear()


@pytest.mark.slow
def test_active_bench_runs_ivf_join_without_faiss(monkeypatch, tmp_path):
    """ivf-join, what index="auto" picks for a round on a large pool, is torch only: it runs
    (with its recall) where faiss is missing, and only the FAISS indexes are skipped."""
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    ba = _small_active(monkeypatch)
    report = _run_quick("bench_active", tmp_path)
    status = {r["index"]: r["status"] for r in report["results"]}
    assert status == {
        "exact": "ok",
        "ivf-join": "ok",
        "ivf": "skipped: faiss is not installed (pip install faiss-cpu)",
        "hnsw": "skipped: faiss is not installed (pip install faiss-cpu)",
    }
    join = next(r for r in report["results"] if r["index"] == "ivf-join")
    assert join["recall_at_10"] > 0.9 and join["recall_queries"] == 300
    ba._exact_neighbours.cache_clear()


def test_active_recall_counts_the_exact_neighbours_found():
    from palfast.benchmarks import bench_active as ba

    exact = torch.tensor([[1, 2, 3, 4], [0, 2, 3, 4]])
    found = torch.tensor([[4, 3, 9, -1], [0, 2, 3, 4]])
    assert ba.recall_at_k(found, exact) == pytest.approx((2 / 4 + 1) / 2)
    # self dropped from a k + 1 search, order kept; fewer found: -1 at the end
    nbrs = torch.tensor([[5, 0, 7], [1, 2, -1]])
    assert ba._without_self(nbrs, torch.tensor([5, 2]), 2).tolist() == [[0, 7], [1, -1]]


def test_active_targets_are_judged_at_a_million_rows():
    from palfast.benchmarks import bench_active as ba

    rows = [
        {
            "N": ba.TARGET_N,
            "index": "ivf",
            "status": "ok",
            "median_s": 50.0,
            "peak_rss_mib": 3000.0,
            "recall_at_10": 0.97,
        },
        {
            "N": ba.TARGET_N,
            "index": "hnsw",
            "status": "ok",
            "median_s": 70.0,
            "peak_rss_mib": 5000.0,
            "recall_at_10": 0.9,
        },
        {
            "N": ba.TARGET_N,
            "index": "ivf-join",
            "status": "ok",
            "median_s": 275.0,
            "peak_rss_mib": 2400.0,
            "recall_at_10": 1.0,
        },
        {"N": 10_000, "index": "ivf", "status": "ok", "median_s": 1.0},
    ]
    got = {t["target"]: t["status"] for t in ba.targets(rows, {})}
    assert [s for t, s in got.items() if "(ivf)" in t] == ["met"] * 3
    assert [s for t, s in got.items() if "(hnsw)" in t] == ["missed"] * 3
    assert [s for t, s in got.items() if "(ivf-join)" in t] == ["missed", "met", "met"]
    rows[0].pop("peak_rss_mib")
    rows[1]["status"] = "skipped: faiss is not installed"
    got = [t["status"] for t in ba.targets(rows, {})]
    assert got[1] == "unmeasured (peak_rss_mib not measured)"
    assert got[3:6] == ["unmeasured (skipped: faiss is not installed)"] * 3
    assert len(got) == 9


@pytest.mark.slow
def test_store_bench_quick_and_its_targets(monkeypatch, tmp_path):
    from palfast.benchmarks import bench_store as bs

    monkeypatch.setattr(bs, "QUICK_ANSWERS", 3000)
    monkeypatch.setattr(bs, "MASK_PAIRS", 20_000)
    monkeypatch.setattr(bs, "NEW_ROWS", 500)
    monkeypatch.delenv(bs.STORE_URL_ENV, raising=False)  # SQLite only
    pairs, ans = bs.answers(3000)
    assert 0.3 < float(ans.float().mean()) < 0.7 and bool((pairs[:, 0] != pairs[:, 1]).all())
    more, _ = bs.answers(3000, 500, seed=3001)  # the refresh case's new rows: other pairs
    assert 0 < more.shape[0] <= 500 and int(more.max()) < 3000 and not torch.equal(more, pairs[: more.shape[0]])
    report = _run_quick("bench_store", tmp_path)
    assert [r["status"] for r in report["results"]] == ["ok"] * 5
    assert report["results"][3]["case"] == "refresh (500 new) answers=3000"
    assert all(t["status"].startswith("unmeasured") for t in report["targets"])
    n = bs.ANSWERS
    rows = [
        {
            "case": f"record answers={n} batch=1000",
            "sample_ids": n,
            "answers": n - 10,
            "status": "ok",
            "median_s": 40.0,
        },
        {"case": f"reopen answers={n}", "sample_ids": n, "answers": n - 10, "status": "ok", "median_s": 12.0},
    ]
    record, reopen = bs.targets(rows, {})
    assert record["status"] == "met" and record["value"] == pytest.approx((n - 10) / 40.0)
    assert reopen["status"] == "missed" and reopen["value"] == 12.0


@pytest.mark.slow
def test_store_bench_times_postgres_beside_sqlite(monkeypatch, tmp_path, postgres_url, capsys):
    """With a PostgreSQL URL the store cases also run as ``postgres``, each store in a
    schema of its own that is dropped after; the targets stay SQLite's."""
    import gc

    from palfast.benchmarks import bench_store as bs
    from palfast.cli import main

    from _store_helpers import execute_sql

    assert main(["bench", "--only", "store", "--store-url", "mysql://u:pw@h/db"]) == 2
    assert "--store-url must start with postgresql://" in capsys.readouterr().err
    monkeypatch.setattr(bs, "QUICK_ANSWERS", 2000)
    monkeypatch.setattr(bs, "MASK_PAIRS", 20_000)
    monkeypatch.setattr(bs, "NEW_ROWS", 300)
    monkeypatch.setenv(bs.STORE_URL_ENV, postgres_url)
    report = _run_quick("bench_store", tmp_path)
    got = [(r["case"].split()[0], r["impl"], r["status"]) for r in report["results"]]
    assert got == [
        ("record", "palfast", "ok"),
        ("record", "postgres", "ok"),
        ("reopen", "palfast", "ok"),
        ("reopen", "postgres", "ok"),
        ("refresh", "palfast", "ok"),
        ("refresh", "postgres", "ok"),
        ("refresh", "palfast", "ok"),  # of 300 new rows
        ("refresh", "postgres", "ok"),
        ("known_mask", "palfast", "ok"),
    ]
    gc.collect()
    assert execute_sql(postgres_url, "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'palfast_bench_%'") == [(0,)]


@pytest.mark.slow
def test_harness_extras_join_the_row_and_their_failure_is_recorded(monkeypatch):
    mod = types.ModuleType("palfast.benchmarks.bench_extras")

    def broken():
        raise ValueError("no index")

    mod.cases = lambda quick=False, device="cpu": [
        Case(
            "bench_extras",
            "extras",
            {},
            {"a": _sleeper(0.0), "b": _sleeper(0.0)},
            "a",
            extras={"a": lambda: {"recall_at_10": 0.5}, "b": broken},
        )
    ]
    monkeypatch.setitem(sys.modules, "palfast.benchmarks.bench_extras", mod)
    report = harness.run_cases(["bench_extras"], repeats=1, memory=False, progress=lambda msg: None)
    a, b = report["results"]
    assert a["recall_at_10"] == 0.5 and b["status"] == "ok"
    assert b["extras_status"] == "failed: ValueError: no index"
    assert "recall@10 0.5000" in harness.format_table(report)


#: How long the test's prepare() sleeps: far above the time of its run(), so that a timing
#: that counted it would show.
PREPARE_S = 0.2


def test_prepared_runs_are_prepared_before_every_run_and_untimed(monkeypatch):
    """A factory returning Prepared: prepare() runs before each warm-up, timed and
    peak-memory run, outside the timing; run() alone is timed."""
    calls = []

    def factory():
        def prepare():
            time.sleep(PREPARE_S)
            calls.append("prepare")

        def run():
            if calls[-1:] != ["prepare"]:  # each run uses up what prepare() made
                raise RuntimeError("run() without prepare()")
            calls.append("run")

        return harness.Prepared(prepare, run)

    mod = types.ModuleType("palfast.benchmarks.bench_prepared")
    mod.cases = lambda quick=False, device="cpu": [Case("bench_prepared", "prepared", {}, {"a": factory}, "a")]
    monkeypatch.setitem(sys.modules, "palfast.benchmarks.bench_prepared", mod)
    report = harness.run_cases(["bench_prepared"], repeats=3, warmup=1, memory=False, progress=lambda msg: None)
    (row,) = report["results"]
    assert row["status"] == "ok" and row["runs"] == 3
    assert row["median_s"] < PREPARE_S / 2
    assert calls == ["prepare", "run"] * 4  # the warm-up and three timed runs
    calls.clear()
    assert harness.measure_peak_here("bench_prepared", "prepared", "a", quick=False)["status"] == "ok"
    assert calls == ["prepare", "run"] * 2  # its warm-up and the measured run


def test_peak_memory_reports_the_whole_process(monkeypatch):
    from palfast.benchmarks import bench_store as bs

    monkeypatch.setattr(bs, "QUICK_ANSWERS", 2000)
    monkeypatch.setattr(bs, "MASK_PAIRS", 200_000)
    got = harness.measure_peak_here("bench_store", "known_mask pairs=200000 answers=2000", "palfast", quick=True)
    assert got["status"] == "ok"
    # the whole process (interpreter, torch) is far above what one call adds
    assert got["peak_rss_bytes"] > got["peak_bytes"] + (50 << 20)
