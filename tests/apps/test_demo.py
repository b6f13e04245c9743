"""The ActiveLearner loop (resume from the store) and a tiny `palfast demo` end to end."""

import argparse
import sqlite3

import pytest
import torch

from palfast.active import ActiveLearner, CallbackOracle, LabelOracle, RelationStore
from palfast.datasets import augment
from palfast.demo import add_demo_arguments, evaluate_strategies, format_evaluation, run_demo
from palfast.metrics import area_under_curve, queries_to_reach


def toy(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    return torch.randn(4, 8, generator=g)[y] + 0.3 * torch.randn(n, 8, generator=g), y


def make_learner(data, oracle, store, strategy="pal"):
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    return ActiveLearner(
        enc,
        data,
        oracle,
        store,
        strategy=strategy,
        epochs_per_round=1,
        batch_size=16,
        augment=lambda x, g: x + 0.1 * torch.randn(x.shape, generator=g),
        progress=False,
    )


@pytest.mark.parametrize("strategy", ["pal", "random"])
@pytest.mark.slow
def test_learner_runs_rounds_and_resumes_from_the_store(tmp_path, strategy):
    data, y = toy()
    path = tmp_path / "store.sqlite"
    oracle = LabelOracle(y)
    with RelationStore(path) as store:
        history = make_learner(data, oracle, store, strategy).run(budget=20, queries_per_round=8)
    assert [h["n_queries"] for h in history] == [0, 8, 16, 20]
    assert oracle.n_pairs == 20 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    # A new learner (new process in real life) on the same file continues from 20.
    oracle2 = LabelOracle(y)
    with RelationStore(path) as store:
        assert store.n_queries == 20
        history = make_learner(data, oracle2, store, strategy).run(budget=30, queries_per_round=8)
        assert store.n_queries == 30
    assert oracle2.n_pairs == 10
    assert [h["n_queries"] for h in history] == [20, 28, 30]


def test_learner_callback_oracle_and_grouped_batches():
    data, y = toy(48)
    asked = []

    def person(pairs):
        asked.append(pairs.clone())
        return y[pairs[:, 0]] == y[pairs[:, 1]]

    store = RelationStore()
    learner = make_learner(data, CallbackOracle(person), store)
    history = learner.run(budget=12, queries_per_round=6, on_round=lambda lr, rec: {"n_comp": 1})
    assert all(h["n_comp"] == 1 for h in history)
    assert sum(p.shape[0] for p in asked) == 12
    # Known components stay together in the epoch order (at most one run per chunk).
    order = learner._epoch_order(48)
    assert sorted(order.tolist()) == list(range(48))
    comp = store.roots(order)
    for c in torch.unique(store.components(torch.arange(48))):
        if c < 0:
            continue
        pos = (comp == c).nonzero().flatten()
        assert int(pos.max() - pos.min()) == pos.numel() - 1  # consecutive


def test_oracles_count_pairs_and_interactions():
    y = torch.tensor([0, 0, 1, 1, 2])
    o = LabelOracle(y)
    assert o.ask(torch.tensor([[0, 1], [1, 2]])).tolist() == [True, False]
    assert o.ask_batch(3, torch.tensor([0, 2, 4])).tolist() == [False, True, False]
    assert (o.n_pairs, o.n_interactions, o.n_queries) == (5, 3, 5)
    noisy = LabelOracle(y, noise=0.5, seed=0)
    flips = sum(int((noisy.ask(torch.tensor([[0, 1]] * 50)) ^ True).sum()) for _ in range(4))
    assert 50 < flips < 150
    screens = []
    cb = CallbackOracle(
        lambda p: [True] * p.shape[0], batch_fn=lambda a, c: screens.append((a, c.tolist())) or [False] * len(c)
    )
    assert cb.ask_batch(4, [1, 2]).tolist() == [False, False] and screens == [(4, [1, 2])]
    assert (cb.n_pairs, cb.n_interactions) == (2, 1)
    with pytest.raises(ValueError, match="sample ids must be < 5"):
        o.ask(torch.tensor([[0, 5]]))
    with pytest.raises(ValueError, match="one answer per pair"):
        CallbackOracle(lambda p: [True]).ask(torch.tensor([[0, 1], [1, 2]]))
    with pytest.raises(ValueError, match="noise must be a probability"):
        LabelOracle(y, noise=1.0)
    with pytest.raises(ValueError, match=r"LabelOracle: noise must be a probability in \[0, 0.5\]"):
        LabelOracle(y, noise=1.5)
    with pytest.raises(TypeError, match="LabelOracle: seed must be an int"):
        LabelOracle(y, seed="0")
    with pytest.raises(TypeError, match=r"CallbackOracle: fn must be a callable fn\(pairs"):
        CallbackOracle(3)
    with pytest.raises(TypeError, match="CallbackOracle: batch_fn must be a callable"):
        CallbackOracle(lambda p: p, batch_fn=[])


def test_augment_keeps_shape_and_varies():
    x = torch.rand(5, 64)
    g = torch.Generator().manual_seed(0)
    a, b = augment(x, g), augment(x, g)
    assert a.shape == x.shape and not torch.equal(a, b)


@pytest.mark.slow
def test_tiny_demo_end_to_end(tmp_path, capsys):
    parser = add_demo_arguments(argparse.ArgumentParser())
    out = tmp_path / "demo"
    args = parser.parse_args(
        [
            "--out",
            str(out),
            "--budget",
            "12",
            "--queries-per-round",
            "6",
            "--seeds",
            "1",
            "--epochs",
            "1",
            "--strategies",
            "pal,random",
            "--unknown-weight",
            "0.5",
            "--threads",
            "1",
            "--no-progress",
        ]
    )
    threads = torch.get_num_threads()
    assert run_demo(args) == 0
    assert torch.get_num_threads() == threads  # the demo's --threads is undone
    text = capsys.readouterr().out
    assert "unknown weight 0.5" in text
    assert "linear probe test accuracy" in text and "k-NN" in text
    assert "pal" in text and "random" in text
    assert "AUC (mean acc)" in text and "queries to reach random's final (per seed)" in text
    png = (out / "accuracy_vs_queries.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("strategy,seed,round,n_queries") and len(rows) == 1 + 2 * 3
    for strategy in ("pal", "random"):
        path = out / f"store_{strategy}_seed0.sqlite"
        assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        with RelationStore(path) as store:
            assert store.n_queries == 12


def test_demo_rejects_bad_options(tmp_path, capsys):
    parser = add_demo_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--out", str(tmp_path), "--strategies", "pal,greedy"])
    assert run_demo(args) == 2
    assert "--strategies must name some of" in capsys.readouterr().out
    for bad, message in (
        (["--threads", "0"], "--threads must be >= 1"),
        (["--unknown-weight", "1.5"], "--unknown-weight must be in [0, 1]"),
        (["--noise", "0.6"], "--noise must be a probability in [0, 0.5]"),
        (["--noise", "nan"], "--noise must be a probability in [0, 0.5]"),
        (["--reask", "0.2"], "--reask 0.2 asks answers again, which changes nothing under --policy first"),
        (["--policy", "majority", "--reask", "2"], "--reask must be a share in [0, 1]"),
    ):
        assert run_demo(parser.parse_args(["--out", str(tmp_path), *bad])) == 2
        assert message in capsys.readouterr().out


@pytest.mark.slow
def test_cli_main_dispatches_demo(tmp_path):
    from palfast.cli import main

    assert (
        main(
            [
                "demo",
                "--out",
                str(tmp_path / "o"),
                "--budget",
                "4",
                "--queries-per-round",
                "4",
                "--seeds",
                "1",
                "--epochs",
                "1",
                "--strategies",
                "nearest",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (tmp_path / "o" / "store_nearest_seed0.sqlite").exists()


def test_area_and_queries_to_reach():
    # Trapezoids over 0..300, divided by the range: the mean accuracy over the budget.
    assert area_under_curve([0, 100, 300], [0.5, 0.9, 0.9]) == pytest.approx((100 * 0.7 + 200 * 0.9) / 300)
    assert area_under_curve([0], [0.8]) == 0.8
    assert queries_to_reach([0, 100, 200], [0.5, 0.91, 0.95], 0.9) == 100
    assert queries_to_reach([0, 100, 200], [0.5, 0.6, 0.7], 0.9) is None


def test_evaluation_pairs_strategies_by_seed():
    rows = []
    for seed, base in ((0, 0.80), (1, 0.90)):  # seed 1 is an easier draw for every strategy
        for strategy, gain in (("pal", 0.05), ("random", 0.0)):
            for r, q in enumerate((0, 100, 200, 300)):
                acc = base + (gain if q else 0.0) + 0.01 * r
                rows.append({"strategy": strategy, "seed": seed, "round": r, "n_queries": q, "linear": acc})
    ev = evaluate_strategies(rows, ["pal", "random"], 300)
    assert ev["pal"]["at_vs_baseline"][100] == pytest.approx((0.05, 0.0))  # paired: no spread
    assert ev["pal"]["at"][300][1] > 0.05  # unpaired: the seeds' spread
    # pal at 100 (base + .06) >= random at 300 (base + .03): reached at 100 on both seeds.
    assert ev["pal"]["reach_baseline_final"] == [100, 100]
    assert ev["random"]["reach_baseline_final"] == [300, 300]
    assert ev["pal"]["auc_vs_baseline"][0] == pytest.approx(0.05 * (1 - 50 / 300))
    text = format_evaluation(ev, "linear probe")
    assert "100, 100" in text and "Δ vs random" in text
