"""The strategy suite (palfast/benchmarks/bench_strategies.py): its quick form end to end,
its evaluation, its bad input, and the noise range of LabelOracle it relies on."""

import csv
import dataclasses
import json
import math

import pytest
import torch

from palfast.active import LabelOracle
from palfast.benchmarks import bench_strategies as bs
from palfast.benchmarks import strategy_report as report
from palfast.benchmarks.strategy_tasks import TASKS, blobs, resolve_tasks, rings, spirals


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The CI form, as `palfast bench --only strategies --quick` runs it."""
    from palfast.benchmarks import harness

    out = tmp_path_factory.mktemp("suite")
    lines = []
    result = harness.run_cases(["bench_strategies"], quick=True, out_dir=str(out), progress=lines.append)
    return out, lines, result


@pytest.mark.slow
def test_quick_suite_writes_csv_and_grid_with_every_strategy(quick_run):
    out, lines, result = quick_run
    assert result == {"suites": ["bench_strategies"]}
    (summary_csv,) = out.glob("strategies_cpu_*[0-9].csv")
    (png,) = out.glob("strategies_cpu_*_grid.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(str(png) in line for line in lines) and any(str(summary_csv) in line for line in lines)
    assert not list(out.glob("bench_cpu_*"))  # nothing timed, no empty timing report
    rows = list(csv.DictReader(summary_csv.open()))
    q = bs.QUICK
    expected = {(t, n, s) for t in q.tasks for n in q.noise for s in q.strategies}
    expected |= {(t, 0.0, report.IDEAL) for t in q.tasks}
    assert {(r["task"], float(r["noise"]), r["strategy"]) for r in rows} == expected
    for r in rows:
        for c in q.checkpoints:
            assert 0 <= float(r[f"acc@{c}"]) <= 1 and 0 <= float(r[f"ideal@{c}"]) <= 1
            assert not math.isnan(float(r[f"vs_random@{c}"]))
        assert int(r["seeds"]) == q.seeds
        if r["strategy"] == "random":  # its own paired difference is exactly 0
            assert float(r["vs_random_auc"]) == 0.0 and int(r["n_reached"]) == q.seeds


@pytest.mark.slow
def test_noisy_oracle_makes_contradictions_in_the_suite(quick_run):
    out, *_ = quick_run
    (curves,) = out.glob("strategies_cpu_*_curves.csv")
    rows = list(csv.DictReader(curves.open()))
    noisy = [int(r["n_conflicts"]) for r in rows if float(r["noise"]) > 0]
    clean = [int(r["n_conflicts"]) for r in rows if float(r["noise"]) == 0]
    assert max(clean) == 0 and max(noisy) > 0


def _rows(strategy, seed, accs, task="t", noise=0.0, step=50):
    return [
        {
            "task": task,
            "noise": noise,
            "strategy": strategy,
            "seed": seed,
            "round": i,
            "n_queries": i * step,
            "accuracy": a,
        }
        for i, a in enumerate(accs)
    ]


def test_summary_is_paired_by_seed_and_counts_queries_to_reach_random():
    rows = (
        _rows("random", 0, [0.5, 0.6, 0.7])
        + _rows("random", 1, [0.5, 0.8, 0.9])
        + _rows("pal", 0, [0.5, 0.7, 0.8])
        + _rows("pal", 1, [0.5, 0.9, 0.95])
        + _rows("ideal", 0, [0.5, 1.0, 1.0])
        + _rows("ideal", 1, [0.5, 0.9, 1.0])
        + _rows("pal", 0, [0.5, 0.6], noise=0.1)
        + _rows("random", 0, [0.5, 0.4, 0.5], noise=0.1)
    )
    s = {(r["strategy"], r["noise"]): r for r in report.summarize(rows, [50, 100], 100)}
    pal = s[("pal", 0.0)]
    assert pal["acc@50"] == pytest.approx(0.8) and pal["acc@50_sd"] == pytest.approx(math.sqrt(0.02))
    # Paired: (0.7 − 0.6, 0.9 − 0.8) → 0.1 ± 0: the seeds' own spread cancels.
    assert pal["vs_random@50"] == pytest.approx(0.1) and pal["vs_random@50_sd"] == pytest.approx(0)
    assert pal["ideal@100"] == pytest.approx(1.0)
    # random's 100-query accuracy: 0.7 (seed 0) reached at 50; 0.9 (seed 1) reached at 50.
    assert pal["reach_random_final"] == [50, 50] and pal["reach_median"] == 50
    assert s[("random", 0.0)]["reach_random_final"] == [100, 100]
    # A run that stopped early (every pair known) keeps its last accuracy up to the budget,
    # and the noisy task's ideal reference is the noise-free one.
    noisy = s[("pal", 0.1)]
    assert noisy["acc@100"] == pytest.approx(0.6) and noisy["vs_random@100"] == pytest.approx(0.1)
    assert noisy["ideal@50"] == pytest.approx(0.95)
    assert report.area_under_curve([0, 50, 100], [0.5, 0.6, 0.6]) == pytest.approx(noisy["auc"])
    assert "reaches random's final" in report.format_summary(list(s.values()), [50, 100])


def _refuse(constant):
    raise ValueError(f"not strict JSON: {constant}")


def test_json_is_strict_with_null_where_random_did_not_run(tmp_path):
    """Without ``random`` the paired differences are NaN: the JSON holds null there, and a
    strict parser (one refusing NaN and Infinity) reads it."""
    s = dataclasses.replace(
        bs.QUICK,
        tasks=("iris",),
        noise=(0.0,),
        seeds=1,
        strategies=("pal",),
        budget=50,
        checkpoints=(50,),
        steps_per_round=1,
    )
    result = bs.run_suite(out_dir=str(tmp_path), settings=s, progress=lambda line: None)
    assert math.isnan(result["summary"][0]["vs_random@50"])  # the NaN the file must not hold
    written = json.loads(result["paths"]["json"].read_text(), parse_constant=_refuse)
    pal = written["summary"][0]
    assert pal["strategy"] == "pal" and pal["vs_random@50"] is None and pal["vs_random_auc_sd"] is None
    assert pal["acc@50"] == result["summary"][0]["acc@50"] and pal["acc@50_sd"] == 0.0


def test_median_of_reach_counts_never_as_infinite():
    assert report._median_or_never([50, None, 100]) == 100
    assert report._median_or_never([50, None, None]) is None
    assert report._median_or_never([50, 150]) == 100
    assert report._median_or_never([50, None]) is None


def test_ideal_labels_samples_directly_one_pair_per_sample():
    y = torch.tensor([0, 1, 0, 1, 2, 0, 2, 1])
    ideal = bs.LabelDirectly(y, seed=0)
    first = ideal(None, None, 3)
    rest = ideal(None, None, 100)
    pairs = torch.cat([first, rest])
    assert first.shape == (3, 2)
    # Every pair is alike, the labelled samples form one chain per class: 8 samples, 3
    # classes → 5 pairs, and nothing is left to label.
    assert bool((y[pairs[:, 0]] == y[pairs[:, 1]]).all()) and pairs.shape[0] == 8 - 3
    assert ideal(None, None, 5).shape == (0, 2)


def test_synthetic_tasks_are_seeded_and_the_views_do_not_separate_the_classes():
    from palfast.metrics import linear_probe_accuracy

    for make in (rings, spirals, blobs):
        x, y = make(300, seed=1)
        x2, y2 = make(300, seed=1)
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert x.shape == (300, 6) and not torch.equal(x, make(300, seed=2)[0])
    # The raw inputs of rings and spirals are far from linearly separable (3 classes):
    # a linear probe on them with every pool label stays under half right.
    for name in ("rings", "spirals"):
        xp, yp, xt, yt = TASKS[name].load()
        assert linear_probe_accuracy(xp, yp, xt, yt) < 0.5


def test_unknown_task_names_the_valid_ones():
    with pytest.raises(
        ValueError,
        match=r"tasks must name some of digits-views, .*breast-cancer; "
        r"unknown: 'ringz'",
    ):
        resolve_tasks("rings,ringz", "palfast bench strategies")
    with pytest.raises(ValueError, match=r"no task name contains 'nope'; the tasks are digits-views"):
        bs.run_suite(quick=True, out_dir=None, task_filter="nope")


@pytest.mark.parametrize("noise", [-0.1, 0.51, 1.0, float("nan")])
def test_noise_outside_zero_to_half_is_refused(noise, capsys):
    with pytest.raises(ValueError, match=r"LabelOracle: noise must be a probability in \[0, 0.5\]"):
        LabelOracle(torch.tensor([0, 1]), noise=noise)
    with pytest.raises(
        ValueError,
        match=r"palfast bench strategies: noise must be a probability "
        r"in \[0, 0.5\]",
    ):
        bs.check_settings(bs.Settings(**{**bs.QUICK.__dict__, "noise": (0.0, noise)}))
    assert bs.main(["--quick", "--noise", f"0,{noise}", "--out", "unused"]) == 2
    assert "noise must be a probability in [0, 0.5]" in capsys.readouterr().err


def test_noise_half_is_a_coin_toss_and_allowed():
    assert LabelOracle(torch.tensor([0, 1]), noise=0.5).noise == 0.5


def test_bad_settings_are_refused_before_any_run(capsys):
    assert bs.main(["--tasks", "iris,nosuch"]) == 2
    assert "unknown: 'nosuch'" in capsys.readouterr().err
    assert bs.main(["--strategies", "pal,best"]) == 2
    assert "strategies must name some of pal" in capsys.readouterr().err
    assert bs.main(["--checkpoints", "30", "--budget", "100"]) == 2
    assert "checkpoints must be multiples of queries_per_round (50)" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(bs.VARIANTS))
def test_variants_run_their_strategy_with_their_options_and_keep_state(name):
    """A suite variant is select_queries with the variant's options, one state dict across
    calls (as ActiveLearner keeps pal's), and the suite's reask passed through."""
    from palfast.active import RelationStore, select_queries

    strategy, options = bs.VARIANTS[name]
    x = torch.randn(60, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(60) % 4
    variant, store, state = bs.Variant(name), RelationStore(), {}
    for r in range(3):
        got = variant(x, store, 10, k=5, generator=torch.Generator().manual_seed(r))
        want = select_queries(
            x, store, 10, strategy, k=5, generator=torch.Generator().manual_seed(r), state=state, **options
        )
        assert torch.equal(got, want) and variant.state == state
        store.record(got, (y[got[:, 0]] == y[got[:, 1]]).tolist())
    with pytest.raises(ValueError, match="reask=0.5 asks answers again"):
        bs.Variant(name, reask=0.5)(x, store, 10)  # the store's policy is "first"
