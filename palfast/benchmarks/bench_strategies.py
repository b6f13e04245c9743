"""The strategy suite: every query strategy, paired by seed, over many tasks (docs/active.md,
"Choosing a strategy").

Run it with ``palfast bench --only strategies [--quick] [--filter TASK] [--out DIR]``, or
with every option: ``python -m palfast.benchmarks.bench_strategies --help``
(``bench/bench_strategies.py`` writes into ``bench/results/``). It is an evaluation, not a
timing: the harness hands it over to :func:`run_suite`.

For each task (``strategy_tasks.py``: digits with and without views, synthetic manifolds
the views do not separate, scikit-learn's iris, wine and breast cancer), each oracle noise
level (``LabelOracle(noise=...)``) and each seed, every strategy of
:data:`palfast.active.STRATEGIES` runs an :class:`~palfast.active.ActiveLearner`: a small
MLP encoder trained with :func:`palfast.info_nce` (τ = 0.2) on the store's graph, rounds
of select → ask → record → train until the budget. After each round the embedding is
evaluated with a linear probe (:func:`palfast.metrics.linear_probe_accuracy`, fitted on
every pool label, measured on the test set): the standard measure of a representation;
only the representation saw the oracle's answers.

The *ideal* reference labels samples directly: in a random order, each sample is joined
to the last sample of its class labelled before it, one "alike" pair per sample (the first
sample of each class costs nothing). So q queries hold the labels of q samples plus one per
class, which is what the default loss (InfoNCE with ``unknown_weight=1``, positives only)
can use of q labels. It runs without noise, through the same learner and training.

Every run of one seed starts from the same initial weights and oracle seed, so the report
(``strategy_report.py``) compares strategies seed by seed with ``random``. Outputs in the
output folder, paths printed: ``strategies_<device>_<time>.csv`` (one row per task, noise
and strategy), ``..._curves.csv`` (one row per round of every run), ``..._grid.png`` (one
panel per task and noise level) and ``.json`` (settings, environment, summary; strict
JSON, a number without a value, such as the difference to ``random`` where random did not
run, written as null).

Cost: one torch thread and one BLAS thread (the model is too small to gain from more, and
beside other processes more threads spin-wait: docs/active.md, "The demo").
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from .._json import dumps
from ..active.oracle import check_noise
from ..active.policy import POLICIES, check_policy, check_reask
from .strategy_report import IDEAL, format_summary, plot_grid, summarize
from .strategy_tasks import TASKS, Task, resolve_tasks

__all__ = ["FULL", "QUICK", "Settings", "cases", "main", "run_suite"]

_OP = "palfast bench strategies"


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one suite run covers. ``checkpoints`` must be multiples of
    ``queries_per_round`` (an evaluation follows every round); ``steps_per_round`` is the
    optimiser steps of each round's training (epochs = steps / batches per epoch, at least
    one), the same work on every task whatever its pool size."""

    tasks: tuple[str, ...]
    noise: tuple[float, ...]
    seeds: int
    strategies: tuple[str, ...]
    budget: int
    checkpoints: tuple[int, ...]
    queries_per_round: int
    steps_per_round: int
    lr: float = 2e-3
    temperature: float = 0.2
    batch_size: int = 256
    #: The stores' answer-resolution policy and the share of each round re-asked
    #: (``RelationStore(policy=)``, ``select_queries(reask=)``; the ideal reference,
    #: noise-free, always asks new pairs).
    policy: str = "first"
    reask: float = 0.0


def _all_strategies() -> tuple[str, ...]:
    from ..active import STRATEGIES

    return tuple(STRATEGIES)


#: Variants of a strategy the suite can run by name beside :data:`STRATEGIES` (``--strategies
#: pal,pal-adaptive``), to measure an option before it becomes a default: name → the
#: strategy and the :func:`~palfast.active.select_queries` options it runs with.
VARIANTS = {
    "pal-adaptive": ("pal", {"mix": "adaptive"}),
    "pal-gain-order": ("pal", {"order": "gain"}),
}


class Variant:
    """A :data:`VARIANTS` entry as a callable strategy of
    :class:`~palfast.active.ActiveLearner`, keeping its own ``state`` across rounds as the
    learner does for ``"pal"``."""

    def __init__(self, name: str, reask: float = 0.0):
        self.__name__ = name
        self.strategy, options = VARIANTS[name]
        self.options = {**options, "reask": reask}  # a callable strategy re-asks itself
        self.state: dict = {}

    def __call__(self, embeddings, store, budget, k=10, generator=None) -> torch.Tensor:
        from ..active import select_queries

        return select_queries(
            embeddings, store, budget, self.strategy, k=k, generator=generator, state=self.state, **self.options
        )


#: The full suite: every task, without noise and with 5 % and 10 % of answers flipped,
#: 10 seeds, 300 queries in rounds of 50 (an evaluation at 0, 50, …, 300 queries). Not
#: fewer seeds: the paired differences between strategies spread by up to 2–4 points
#: from seed to seed (rings, wine), so 3 seeds once read `pal` 1.2 AUC points below
#: `random` on rings where 20 seeds read +0.07 ± 2.31 (docs/active.md, "Twenty seeds").
FULL = Settings(
    tasks=tuple(TASKS),
    noise=(0.0, 0.05, 0.1),
    seeds=10,
    strategies=_all_strategies(),
    budget=300,
    checkpoints=(50, 100, 200, 300),
    queries_per_round=50,
    steps_per_round=20,
)
#: Small enough for CI (about 40 s of one core): the two smallest pools (iris, wine), without
#: noise and with 10 %, 2 seeds, 100 queries.
QUICK = Settings(
    tasks=("iris", "wine"),
    noise=(0.0, 0.1),
    seeds=2,
    strategies=_all_strategies(),
    budget=100,
    checkpoints=(50, 100),
    queries_per_round=50,
    steps_per_round=8,
)


def check_settings(s: Settings) -> Settings:
    """``s`` with its tasks, strategies and noise levels validated (clear errors)."""
    resolve_tasks(s.tasks, _OP)
    known = _all_strategies() + tuple(VARIANTS)
    bad = [t for t in s.strategies if t not in known]
    if bad or not s.strategies:
        raise ValueError(
            f"{_OP}: strategies must name some of {', '.join(known)}; unknown: "
            f"{', '.join(map(repr, bad)) or '(none given)'}"
        )
    check_policy(_OP, s.policy)
    check_reask(_OP, s.reask, s.policy, False)
    for level in s.noise:
        check_noise(_OP, "noise", level)
    if not s.noise:
        raise ValueError(f"{_OP}: noise must give at least one level, e.g. 0")
    for name in ("seeds", "budget", "queries_per_round", "steps_per_round"):
        if not isinstance(getattr(s, name), int) or getattr(s, name) < 1:
            raise ValueError(f"{_OP}: {name} must be an int >= 1, got {getattr(s, name)!r}")
    bad_q = [q for q in s.checkpoints if q % s.queries_per_round or not 0 < q <= s.budget]
    if bad_q or not s.checkpoints:
        raise ValueError(
            f"{_OP}: checkpoints must be multiples of queries_per_round "
            f"({s.queries_per_round}) in (0, budget={s.budget}], got "
            f"{list(s.checkpoints)}"
        )
    return s


# ------------------------------------------------------------------------ runs
class LabelDirectly:
    """The ideal reference's "strategy": samples labelled in a random order (seeded), each
    joined by one pair to the last labelled sample of its class (module docstring). A
    callable strategy of :class:`~palfast.active.ActiveLearner`."""

    __name__ = IDEAL

    def __init__(self, labels: torch.Tensor, seed: int):
        self.labels = labels
        self.order = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))
        self.cursor = 0
        self.last: dict[int, int] = {}

    def __call__(self, embeddings, store, budget, k=None, generator=None) -> torch.Tensor:
        pairs = []
        while len(pairs) < budget and self.cursor < self.order.numel():
            i = int(self.order[self.cursor])
            self.cursor += 1
            c = int(self.labels[i])
            if c in self.last:
                pairs.append((min(i, self.last[c]), max(i, self.last[c])))
            self.last[c] = i
        return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def run_one(
    task: Task, data, strategy: str, seed: int, noise: float, s: Settings, keep: list | None = None
) -> list[dict]:
    """One active run; returns its per-round records with the probe's test accuracy.
    ``keep``: a list that receives the run's :class:`~palfast.active.ActiveLearner` (its
    store, to study the answers after the run: ``tools/merge_breakdown.py``)."""
    from ..active import ActiveLearner, ContradictionWarning, LabelOracle, RelationStore
    from ..metrics import linear_probe_accuracy, merged_classes

    x_pool, y_pool, x_test, y_test = data
    torch.manual_seed(seed)  # the same initial weights for every strategy of this seed
    encoder = task.encoder(x_pool.shape[1])
    batches = -(-x_pool.shape[0] // s.batch_size)
    epochs = max(1, round(s.steps_per_round / batches))

    def evaluate(learner, record):
        return {
            "accuracy": linear_probe_accuracy(learner.embed(x_pool), y_pool, learner.embed(x_test), y_test),
            "merged": merged_classes(learner.store.components(torch.arange(y_pool.numel())), y_pool),
        }

    chooser = (
        LabelDirectly(y_pool, seed)
        if strategy == IDEAL
        else Variant(strategy, s.reask)
        if strategy in VARIANTS
        else strategy
    )
    learner = ActiveLearner(
        encoder,
        x_pool,
        LabelOracle(y_pool, noise=noise, seed=seed),
        RelationStore(policy=s.policy),
        strategy=chooser,
        reask=0.0 if strategy == IDEAL or strategy in VARIANTS else s.reask,
        augment=task.views,
        n_views=2,
        epochs_per_round=epochs,
        batch_size=s.batch_size,
        lr=s.lr,
        temperature=s.temperature,
        seed=seed,
        progress=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ContradictionWarning)  # counted in n_conflicts
        history = learner.run(s.budget, s.queries_per_round, on_round=evaluate)
    if keep is not None:
        keep.append(learner)
    return [
        {
            "task": task.name,
            "noise": noise,
            "strategy": strategy,
            "seed": seed,
            "round": h["round"],
            "n_queries": h["n_queries"],
            "n_positive": h["n_positive"],
            "n_conflicts": h["n_conflicts"],
            "accuracy": h["accuracy"],
            "merged": h["merged"],
            "stop": h["stop"],
        }
        for h in history
    ]


@contextlib.contextmanager
def one_thread():
    """One torch thread and one BLAS/OpenMP thread (scikit-learn's probe) inside the block;
    the caller's settings come back after it. Measured on the 2-core machine beside other
    jobs: the digits probe took 0.88 s with two BLAS threads, 0.08 s with one."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


def run_settings(s: Settings, progress=print) -> list[dict]:
    """Every run of ``s``: per task, noise level and seed, each strategy (and the ideal
    reference, without noise only). Returns the per-round records."""
    check_settings(s)
    rows: list[dict] = []
    with one_thread():
        for task in resolve_tasks(s.tasks, _OP):
            data = task.load()
            for noise in s.noise:
                start = time.perf_counter()
                names = list(s.strategies) + ([IDEAL] if noise == 0 else [])
                for seed in range(s.seeds):
                    for strategy in names:
                        rows += run_one(task, data, strategy, seed, noise, s)
                progress(
                    f"[bench_strategies] {task.name}, noise {100 * noise:g} %: "
                    f"{len(names)} runs × {s.seeds} seed(s) in "
                    f"{time.perf_counter() - start:.0f} s"
                )
    return rows


# --------------------------------------------------------------------- outputs
def _write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(
                {
                    k: (";".join("" if v is None else str(v) for v in r[k]) if isinstance(r.get(k), list) else r.get(k))
                    for k in keys
                }
            )


def write_outputs(
    rows: list[dict], s: Settings, out_dir: str, env: dict, seconds: float, stem: str | None = None
) -> dict[str, Path]:
    """Write the summary CSV, the per-round CSV, the PNG grid and the JSON into
    ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or f"strategies_{env.get('device', 'cpu')}_{time.strftime('%Y%m%d_%H%M%S')}"
    summary = summarize(rows, list(s.checkpoints), s.budget)
    paths = {
        "csv": out / f"{stem}.csv",
        "curves": out / f"{stem}_curves.csv",
        "png": out / f"{stem}_grid.png",
        "json": out / f"{stem}.json",
    }
    _write_csv(paths["csv"], summary)
    _write_csv(paths["curves"], rows)
    note = (
        f"{s.seeds} seed(s), linear probe; {env.get('cpu', '')}, {seconds / 60:.1f} min, "
        f"load average {env.get('load_average_start')} → {env.get('load_average_end')}"
    )
    plot_grid(rows, s.budget, str(paths["png"]), note=note)
    report = {"settings": dataclasses.asdict(s), "environment": env, "seconds": seconds, "summary": summary}
    # NaN where a number does not exist (vs_random when random did not run): null.
    paths["json"].write_text(dumps(report, indent=2, default=str))
    return paths


def run_suite(
    quick: bool = False,
    out_dir: str | None = "bench_results",
    task_filter: str | None = None,
    progress=print,
    settings: Settings | None = None,
) -> dict:
    """Run the suite (``QUICK`` or ``FULL``, or ``settings``), print the table, write the
    outputs into ``out_dir`` (none when None) and print their paths. ``task_filter``
    keeps the tasks whose name contains it; a filter that matches none is a ValueError
    listing the task names. Returns ``{"rows", "summary", "paths", "seconds"}``."""
    from .harness import environment, load_average

    s = settings or (QUICK if quick else FULL)
    if task_filter:
        pool = tuple(TASKS) if settings is None else s.tasks
        keep = tuple(t for t in pool if task_filter in t)
        if not keep:
            raise ValueError(f"{_OP}: no task name contains {task_filter!r}; the tasks are {', '.join(TASKS)}")
        s = dataclasses.replace(s, tasks=keep)
    check_settings(s)
    env = environment()
    env.update(device="cpu", load_average_start=load_average(), cpu_count=os.cpu_count())
    start = time.perf_counter()
    rows = run_settings(s, progress)
    seconds = time.perf_counter() - start
    env["load_average_end"] = load_average()
    summary = summarize(rows, list(s.checkpoints), s.budget)
    progress(format_summary(summary, list(s.checkpoints)))
    progress(
        f"[bench_strategies] {len(rows)} evaluations in {seconds:.0f} s "
        f"({os.cpu_count()} CPU cores, load average {env['load_average_start']} → "
        f"{env['load_average_end']})"
    )
    paths = {}
    if out_dir is not None:
        paths = write_outputs(rows, s, out_dir, env, seconds)
        for path in paths.values():
            progress(f"wrote {path}")
    return {"rows": rows, "summary": summary, "paths": paths, "seconds": seconds}


def cases(quick: bool = False, device: str = "cpu") -> list:
    """Nothing to time: the harness runs :func:`run_suite` instead."""
    return []


# ------------------------------------------------------------------------- CLI
def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m palfast.benchmarks.bench_strategies",
        description="Every query strategy, paired by seed, over the suite's tasks "
        "(docs/active.md, 'Choosing a strategy'). Defaults: the full suite; "
        "--quick: the CI form.",
    )
    p.add_argument("--quick", action="store_true", help=f"the small CI form ({QUICK})")
    p.add_argument("--tasks", type=_names, help=f"comma-separated, from {', '.join(TASKS)}")
    p.add_argument("--noise", type=_floats, help="comma-separated oracle noise levels in [0, 0.5] (default 0,0.05,0.1)")
    p.add_argument("--seeds", type=int, help=f"seeds 0..S-1 (default {FULL.seeds}, quick {QUICK.seeds})")
    p.add_argument(
        "--strategies",
        type=_names,
        help=f"comma-separated (default: all of palfast.active.STRATEGIES; variants: {', '.join(VARIANTS)})",
    )
    p.add_argument("--budget", type=int, help=f"queries per run (default {FULL.budget}, quick {QUICK.budget})")
    p.add_argument(
        "--checkpoints",
        type=_ints,
        help=f"queries at which the table reports accuracy (default {','.join(map(str, FULL.checkpoints))})",
    )
    p.add_argument("--queries-per-round", type=int, help=f"default {FULL.queries_per_round}")
    p.add_argument("--steps-per-round", type=int, help=f"optimiser steps per round (default {FULL.steps_per_round})")
    p.add_argument(
        "--policy",
        choices=POLICIES,
        help="how the stores resolve answers that disagree (docs/active.md, 'Answers from "
        "people who make mistakes'; default first)",
    )
    p.add_argument(
        "--reask",
        type=float,
        metavar="FRACTION",
        help="share in [0, 1] of each round's questions spent first on asking again the "
        "answers a second one could overturn (needs --policy confirm or majority; default 0)",
    )
    p.add_argument("--out", default="bench_results", help="output folder (default %(default)s)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    s = QUICK if args.quick else FULL
    changes = {
        k: getattr(args, k)
        for k in (
            "tasks",
            "noise",
            "seeds",
            "strategies",
            "budget",
            "checkpoints",
            "queries_per_round",
            "steps_per_round",
            "policy",
            "reask",
        )
        if getattr(args, k) is not None
    }
    if "budget" in changes and "checkpoints" not in changes:
        changes["checkpoints"] = tuple(q for q in s.checkpoints if q < changes["budget"]) + (changes["budget"],)
    s = dataclasses.replace(s, **changes)
    try:
        check_settings(s)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    run_suite(out_dir=args.out, settings=s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
