"""``palfast demo``: active PAL end to end on scikit-learn's digits (README.md).

The 1797 8×8 digit images ship with scikit-learn (no download). A fixed stratified
split keeps 2/3 as the pool the oracle is asked about and 1/3 as the test set.
For each strategy and seed, a small MLP encoder is trained with
:func:`palfast.info_nce` on mini-batches of two augmented views (±1 pixel shift +
Gaussian noise) with the graph ``store.graph(batch, n_views=2)``: views graph +
the classes the oracle revealed so far (transitive closure included; for ``passive``
only the pairs answered "alike"). Rounds of
select → ask (a :class:`LabelOracle` on the pool labels) → record → train, as in
:class:`palfast.active.ActiveLearner`. After each round the frozen 32-d
embedding is evaluated: k-NN accuracy (k=20, cosine, majority vote) and linear
probe accuracy (logistic regression on standardised features), both fitted on the
whole labelled pool and measured on the test set — the standard protocols for a
representation; only the *representation* saw the oracle's answers.

Every run of one seed starts from the same initial weights and oracle seed, so the
strategies are compared paired by seed: the printed evaluation gives, per strategy,
the area under the accuracy-vs-queries curve (mean accuracy over the budget), the
accuracy at a third, two thirds and all of the budget, each with its paired
difference to ``random``, and per seed the queries needed to reach ``random``'s final
accuracy. ``--views none`` (no views: the loss sees only the answers) is the harder
setting, where the value of queries shows; ``--views noise`` (Gaussian noise only, no
shift) is another view family (measured: not harder on digits, docs/active.md).

Outputs in ``--out``: ``results.csv`` / ``results.json`` (one row per round;
the JSON also holds the evaluation), ``accuracy_vs_queries.png``, and one SQLite store
per run (``store_<strategy>_seed<s>.sqlite``; ``--resume`` continues them). The stores
are SQLite only: a run starts over by deleting its file, which a PostgreSQL store refuses
(docs/active.md, "The demo").
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import time

import torch
from torch import nn

from ._json import dumps
from .datasets import augment, augment_noise, load_digits_split
from .metrics import area_under_curve, queries_to_reach

__all__ = ["add_demo_arguments", "run_demo"]

# Rounds of 50 / 25 queries put a checkpoint at 100, 200 and 300 queries, where
# docs/active.md compares the strategies.
QUICK = {"budget": 300, "queries_per_round": 50, "seeds": 2, "epochs": 25, "strategies": "pal,random"}
FULL = {
    "budget": 300,
    "queries_per_round": 25,
    "seeds": 5,
    "epochs": 15,
    "strategies": "pal,nearest,uncertain,random,passive",
}
#: --views: what one augmented view of a digit is ("none": no views, one row per image,
#: the graph holds only the oracle's answers).
VIEWS = ("shift", "noise", "none")
#: Torch threads of the demo (--threads). Its encoder is a small MLP on 64 pixels in
#: batches of 256, too little work per op to gain from more threads; and when another
#: process competes for the cores, ATen's OpenMP threads spin-wait for each other:
#: measured on a 2-core machine beside a test run, a 50-query run took 12 s on one
#: thread and 90 s on two.
DEMO_THREADS = 1
#: The strategy the others are compared with ("queries to reach its final accuracy").
BASELINE = "random"


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the demo's options to ``parser`` (used by ``palfast demo``)."""
    from .active import POLICIES, STRATEGIES
    from .active.strategies import DEFAULT_ORDER, ORDERS

    parser.add_argument("--out", default="palfast_demo_out", help="output directory (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help=f"small run, under 2 minutes on 2 CPU cores ({QUICK})")
    parser.add_argument(
        "--budget",
        type=int,
        default=None,
        help=f"oracle queries per run (default {FULL['budget']}, quick {QUICK['budget']})",
    )
    parser.add_argument(
        "--queries-per-round", type=int, default=None, help=f"queries per round (default {FULL['queries_per_round']})"
    )
    parser.add_argument("--seeds", type=int, default=None, help=f"number of seeds 0..S-1 (default {FULL['seeds']})")
    parser.add_argument(
        "--strategies",
        default=None,
        help=f"comma-separated, from {','.join(STRATEGIES)} (default {FULL['strategies']})",
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help=f"training epochs per round (default {FULL['epochs']})"
    )
    parser.add_argument("--noise", type=float, default=0.0, help="probability that the simulated oracle answers wrong")
    parser.add_argument(
        "--threads",
        type=int,
        default=DEMO_THREADS,
        help=f"torch threads (default {DEMO_THREADS}: the demo's small "
        "model gains nothing from more, and loses much when other "
        "processes compete for the cores)",
    )
    parser.add_argument(
        "--unknown-weight",
        type=float,
        default=1.0,
        metavar="LAMBDA",
        help="InfoNCE's weight in [0, 1] on pairs not known to be alike or "
        "different (1: plain InfoNCE; below 1 the loss also gets the "
        "known 'different' answers, docs/api.md 'Known negatives')",
    )
    parser.add_argument(
        "--order",
        default=DEFAULT_ORDER,
        choices=ORDERS,
        help="pal's order inside a class: random (default) or gain, likeliest 'alike' "
        "first (docs/active.md, 'Query strategies')",
    )
    parser.add_argument(
        "--policy",
        default="first",
        choices=POLICIES,
        help="how the store resolves answers that disagree (docs/active.md, 'Answers from "
        "people who make mistakes'): first = the first answer wins (default); majority = "
        "each pair's majority answer; confirm = a merge of two known classes waits for a "
        "second 'alike' answer",
    )
    parser.add_argument(
        "--reask",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="share in [0, 1] of each round's questions spent first on asking again the "
        "answers a second one could overturn (contested ones, then joins of two classes by size, then "
        "single-sample joins least similar first; needs --policy "
        "confirm or majority; default 0)",
    )
    parser.add_argument(
        "--views",
        default="shift",
        choices=VIEWS,
        help="views per image: shift = ±1 pixel shift + noise (default); "
        "noise = Gaussian noise only, no shift (not harder on digits: docs/active.md); "
        "none = no views, the loss sees only the answers (hardest)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the SQLite stores found in --out instead of starting over "
        "(the demo's stores are SQLite files, one per strategy and seed; "
        "palfast annotate --store takes a PostgreSQL URL)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


class Encoder(nn.Module):
    """MLP 64 → 256 → 256 → 32. The 32-d output is both what the loss trains and what
    is evaluated (PAL trains the embedding f_θ on the graph directly; no projector).

    Why no projector: the features before a projector keep nearly all the pixel
    information, and a linear probe fitted with every pool label on them scores
    ~98% whatever the graph (measured: 250 perfectly labelled samples moved it by
    +0.3 ± 0.5 points), so no query strategy could be told apart there."""

    def __init__(self, dim: int = 32, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim)
        )

    def forward(self, x):
        return self.net(x)


# ------------------------------------------------------------------------- run
def _settings(args) -> dict:
    base = QUICK if args.quick else FULL
    s = {
        key: getattr(args, key) if getattr(args, key, None) is not None else base[key]
        for key in ("budget", "queries_per_round", "seeds", "epochs", "strategies")
    }
    from .active import STRATEGIES

    strategies = [t.strip() for t in str(s["strategies"]).split(",") if t.strip()]
    bad = [t for t in strategies if t not in STRATEGIES]
    if bad or not strategies:
        raise ValueError(f"palfast demo: --strategies must name some of {STRATEGIES}, got {s['strategies']!r}")
    s["strategies"] = strategies
    for key in ("budget", "queries_per_round", "seeds"):
        if s[key] < (0 if key == "budget" else 1):
            raise ValueError(
                f"palfast demo: --{key.replace('_', '-')} must be >= {0 if key == 'budget' else 1}, got {s[key]}"
            )
    if s["epochs"] < 1:
        raise ValueError(f"palfast demo: --epochs must be >= 1, got {s['epochs']}")
    from .active.oracle import check_noise

    check_noise("palfast demo", "--noise", args.noise)  # LabelOracle's range, checked before any work
    s["threads"] = getattr(args, "threads", DEMO_THREADS)
    if s["threads"] < 1:
        raise ValueError(f"palfast demo: --threads must be >= 1, got {s['threads']}")
    s["unknown_weight"] = getattr(args, "unknown_weight", 1.0)
    if not 0 <= s["unknown_weight"] <= 1:
        raise ValueError(f"palfast demo: --unknown-weight must be in [0, 1], got {s['unknown_weight']}")
    from .active.strategies import DEFAULT_ORDER

    s["order"] = getattr(args, "order", DEFAULT_ORDER)
    s["views"] = getattr(args, "views", "shift")
    if s["views"] not in VIEWS:
        raise ValueError(f"palfast demo: --views must be one of {VIEWS}, got {s['views']!r}")
    from .active.policy import check_policy_options

    s["policy"], s["reask"] = check_policy_options(
        "palfast demo", getattr(args, "policy", "first"), getattr(args, "reask", 0.0)
    )
    return s


def run_one(
    strategy: str,
    seed: int,
    settings: dict,
    data,
    store_path,
    *,
    noise: float = 0.0,
    progress: bool = True,
    resume: bool = False,
) -> list[dict]:
    """One active run; returns the per-round history with test accuracies."""
    from .active import ActiveLearner, LabelOracle, RelationStore
    from .active.strategies import DEFAULT_ORDER
    from .metrics import knn_accuracy, linear_probe_accuracy, merged_classes

    x_pool, y_pool, x_test, y_test = data
    if store_path is not None and not resume and os.path.exists(store_path):
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(store_path + suffix):
                os.remove(store_path + suffix)
    torch.manual_seed(seed)
    encoder = Encoder()

    def evaluate(learner, record):
        f_pool, f_test = learner.embed(x_pool), learner.embed(x_test)
        return {
            "knn": knn_accuracy(f_pool, y_pool, f_test, y_test, k=20),
            "linear": linear_probe_accuracy(f_pool, y_pool, f_test, y_test),
            "merged": merged_classes(learner.store.components(torch.arange(y_pool.numel())), y_pool),
        }

    views = settings.get("views", "shift")
    view_fn = {"shift": augment, "noise": augment_noise, "none": None}[views]
    with RelationStore(store_path, policy=settings.get("policy", "first")) as store:
        learner = ActiveLearner(
            encoder,
            x_pool,
            LabelOracle(y_pool, noise=noise, seed=seed),
            store,
            strategy=strategy,
            augment=view_fn,
            n_views=2,
            epochs_per_round=settings["epochs"],
            batch_size=256,
            lr=1e-3,
            temperature=0.2,
            seed=seed,
            progress=progress,
            order=settings.get("order", DEFAULT_ORDER),
            unknown_weight=settings.get("unknown_weight", 1.0),
            reask=settings.get("reask", 0.0),
        )
        history = learner.run(settings["budget"], settings["queries_per_round"], on_round=evaluate)
    for h in history:
        h.update(strategy=strategy, seed=seed)
    return history


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def summarize(rows: list[dict], strategies: list[str]) -> dict:
    """{strategy: {metric: [(n_queries, mean, std), ...]}} over seeds, by round."""
    out = {}
    for s in strategies:
        runs = {}
        for r in rows:
            if r["strategy"] == s:
                runs.setdefault(r["round"], []).append(r)
        out[s] = {
            m: [(max(x["n_queries"] for x in rs), *_mean_std([x[m] for x in rs])) for _, rs in sorted(runs.items())]
            for m in ("linear", "knn")
        }
    return out


def _curves(rows: list[dict], strategy: str, metric: str) -> dict:
    """{seed: ([n_queries], [accuracy])} of one strategy, rounds in order."""
    out: dict = {}
    for r in sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: r["round"]):
        q, acc = out.setdefault(r["seed"], ([], []))
        q.append(r["n_queries"])
        acc.append(r[metric])
    return out


def _at(queries: list[int], acc: list[float], q: int) -> float:
    """Accuracy of the last checkpoint with at most q queries."""
    return [a for n, a in zip(queries, acc) if n <= q][-1]


def evaluate_strategies(rows: list[dict], strategies: list[str], budget: int, metric: str = "linear") -> dict:
    """Paired-by-seed comparison (every run of one seed starts from the same weights and
    oracle seed). Per strategy: area under the accuracy-vs-queries curve (mean accuracy
    over [0, budget]) and, when :data:`BASELINE` ran, its paired difference to it;
    accuracy at a third, two thirds and all of the budget with the paired difference;
    per seed, the queries needed to reach the baseline's final accuracy of that seed."""
    checkpoints = sorted({budget // 3, 2 * budget // 3, budget})
    curves = {s: _curves(rows, s, metric) for s in strategies}
    base = curves.get(BASELINE)
    out = {}
    for s in strategies:
        seeds = sorted(curves[s])
        auc = [area_under_curve(*curves[s][k]) for k in seeds]
        entry = {
            "seeds": seeds,
            "auc": _mean_std(auc),
            "at": {q: _mean_std([_at(*curves[s][k], q) for k in seeds]) for q in checkpoints},
        }
        if base is not None and all(k in base for k in seeds):
            entry["auc_vs_baseline"] = _mean_std([a - area_under_curve(*base[k]) for a, k in zip(auc, seeds)])
            entry["at_vs_baseline"] = {
                q: _mean_std([_at(*curves[s][k], q) - _at(*base[k], q) for k in seeds]) for q in checkpoints
            }
            entry["reach_baseline_final"] = [queries_to_reach(*curves[s][k], base[k][1][-1]) for k in seeds]
        out[s] = entry
    return out


def format_evaluation(ev: dict, metric_name: str) -> str:
    """The table printed by the demo (and pasted into docs/active.md)."""
    first = next(iter(ev.values()))
    qs = list(first["at"])
    paired = "auc_vs_baseline" in first
    head = f"{'strategy':>10} | {'AUC (mean acc)':>15}"
    head += f" | {'Δ vs ' + BASELINE:>13}" if paired else ""
    for q in qs:
        head += f" | {'@' + str(q):>8}" + (f" {'Δ':>13}" if paired else "")
    if paired:
        head += f" | queries to reach {BASELINE}'s final (per seed)"
    lines = [
        f"{metric_name} test accuracy (%), mean ± std over {len(first['seeds'])} seed(s), "
        f"Δ = paired difference to {BASELINE} (same seed)"
        if paired
        else f"{metric_name} test accuracy (%), mean ± std over {len(first['seeds'])} seed(s)",
        head,
        "-" * len(head),
    ]
    pct = lambda ms: f"{100 * ms[0]:6.2f} ± {100 * ms[1]:4.2f}"
    for s, e in ev.items():
        line = f"{s:>10} | {pct(e['auc']):>15}"
        line += f" | {pct(e['auc_vs_baseline']):>13}" if paired else ""
        for q in qs:
            line += f" | {100 * e['at'][q][0]:8.2f}"
            line += f" {pct(e['at_vs_baseline'][q]):>13}" if paired else ""
        if paired:
            line += " | " + ", ".join("—" if r is None else str(r) for r in e["reach_baseline_final"])
        lines.append(line)
    return "\n".join(lines)


def format_table(summary: dict, metric: str) -> str:
    strategies = list(summary)
    checkpoints = [q for q, _, _ in summary[strategies[0]][metric]]
    if len(checkpoints) > 8:  # keep the table readable: about 6 columns, always the last
        step = math.ceil((len(checkpoints) - 1) / 6)
        keep = sorted(set(range(0, len(checkpoints), step)) | {len(checkpoints) - 1})
    else:
        keep = list(range(len(checkpoints)))
    head = f"{'queries':>10} | " + " | ".join(f"{checkpoints[i]:>13}" for i in keep)
    lines = [head, "-" * len(head)]
    for s in strategies:
        cells = []
        for i in keep:
            if i < len(summary[s][metric]):
                _, m, sd = summary[s][metric][i]
                cells.append(f"{100 * m:6.2f} ± {100 * sd:4.2f}")
            else:
                cells.append(" " * 13)
        lines.append(f"{s:>10} | " + " | ".join(cells))
    return "\n".join(lines)


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, metric, title in zip(axes, ("linear", "knn"), ("linear probe", "k-NN (k=20)")):
        for s, curves in summary.items():
            q = [c[0] for c in curves[metric]]
            m = [100 * c[1] for c in curves[metric]]
            sd = [100 * c[2] for c in curves[metric]]
            ax.plot(q, m, marker="o", ms=3, label=s)
            ax.fill_between(q, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], alpha=0.2)
        ax.set_xlabel("oracle queries (pairs)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"digits, {title}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo described in the module docstring; returns an exit status."""
    try:
        settings = _settings(args)
    except ValueError as e:
        print(e)
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(settings["threads"])
    try:
        return _run(args, settings)
    finally:
        torch.set_num_threads(threads)  # run_demo may be called from a longer program


def _run(args: argparse.Namespace, settings: dict) -> int:
    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    data = load_digits_split()
    print(
        f"palfast demo: digits, pool {data[0].shape[0]} / test {data[2].shape[0]}, "
        f"views {settings['views']}, unknown weight {settings['unknown_weight']:g}, "
        f"policy {settings['policy']}, reask {settings['reask']:g}, noise {args.noise:g}, "
        f"budget {settings['budget']} queries in rounds of {settings['queries_per_round']}, "
        f"{settings['seeds']} seed(s), strategies {', '.join(settings['strategies'])}"
    )
    rows: list[dict] = []
    progress = not args.no_progress
    for seed in range(settings["seeds"]):
        for strategy in settings["strategies"]:
            path = os.path.join(args.out, f"store_{strategy}_seed{seed}.sqlite")
            history = run_one(
                strategy, seed, settings, data, path, noise=args.noise, progress=progress, resume=args.resume
            )
            last = history[-1]
            print(
                f"  seed {seed} {strategy:>9}: {last['n_queries']} queries "
                f"({last['n_positive']} alike) -> linear {100 * last['linear']:.2f}%  "
                f"k-NN {100 * last['knn']:.2f}%, {last['n_conflicts']} contradictions, "
                f"{last['merged']} known classes mixing true classes"
            )
            rows.extend(history)
    summary = summarize(rows, settings["strategies"])
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(
            f,
            fieldnames=[
                "strategy",
                "seed",
                "round",
                "n_queries",
                "n_positive",
                "n_conflicts",
                "merged",
                "n_seeds",
                "stop",
                "loss",
                "linear",
                "knn",
            ],
        )
        w.writeheader()
        w.writerows(rows)
    evaluation = {
        m: evaluate_strategies(rows, settings["strategies"], settings["budget"], m) for m in ("linear", "knn")
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        results = {
            "settings": {**settings, "noise": args.noise},
            "rows": rows,
            "summary": summary,
            "evaluation": evaluation,
        }
        f.write(dumps(results, indent=1))
    plot(summary, os.path.join(args.out, "accuracy_vs_queries.png"))
    print("\nlinear probe test accuracy (%), mean ± std over seeds, vs oracle queries")
    print(format_table(summary, "linear"))
    print("\nk-NN (k=20) test accuracy (%), mean ± std over seeds, vs oracle queries")
    print(format_table(summary, "knn"))
    for metric, name in (("linear", "linear probe"), ("knn", "k-NN (k=20)")):
        print()
        print(format_evaluation(evaluation[metric], name))
    print(
        f"\nwrote {args.out}/results.csv, results.json, accuracy_vs_queries.png and "
        f"{len(settings['strategies']) * settings['seeds']} SQLite stores "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return 0
