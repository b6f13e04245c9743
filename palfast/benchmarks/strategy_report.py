"""The strategy suite's evaluation (``bench_strategies.py``): paired summaries, table, grid.

Input: the per-round records of the suite's runs (``task``, ``noise``, ``strategy``,
``seed``, ``n_queries``, ``accuracy``, ...). Every run of one seed on one task and noise
level starts from the same weights and oracle seed, so strategies are compared seed by
seed against :data:`BASELINE` ("paired"): a difference is taken on each seed, then its
mean and spread (sample standard deviation) over the seeds are reported.
"""

from __future__ import annotations

import math

from ..metrics import area_under_curve, queries_to_reach

__all__ = ["BASELINE", "IDEAL", "format_summary", "plot_grid", "summarize"]

#: The strategy every other one is compared with, seed by seed.
BASELINE = "random"
#: The reference run: the same number of samples labelled directly (bench_strategies.py).
IDEAL = "ideal"


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); (nan, nan) for none."""
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def curve(rows: list[dict], budget: int) -> tuple[list[int], list[float]]:
    """One run's (queries, accuracy) in order, carried flat to ``budget`` when the run
    stopped early (every pair known: nothing more would be asked or learnt)."""
    rows = sorted(rows, key=lambda r: r["round"])
    q = [r["n_queries"] for r in rows]
    a = [r["accuracy"] for r in rows]
    if q[-1] < budget:
        q, a = q + [budget], a + [a[-1]]
    return q, a


def at(queries: list[int], acc: list[float], q: int) -> float:
    """Accuracy of the last evaluation with at most ``q`` queries."""
    return [a for n, a in zip(queries, acc) if n <= q][-1]


def _runs(rows: list[dict]) -> dict:
    """{(task, noise, strategy): {seed: [records]}}."""
    out: dict = {}
    for r in rows:
        out.setdefault((r["task"], r["noise"], r["strategy"]), {}).setdefault(r["seed"], []).append(r)
    return out


def summarize(rows: list[dict], checkpoints: list[int], budget: int) -> list[dict]:
    """One dict per (task, noise, strategy), in the order first seen, with for each
    checkpoint q: ``acc@q`` / ``acc@q_sd`` (mean / spread over seeds), ``vs_random@q`` /
    ``vs_random@q_sd`` (paired difference), ``ideal@q`` (mean accuracy of the ideal run
    of the same task without noise); ``auc`` (mean accuracy over 0..budget queries) and its
    paired difference; ``reach_random_final``: per seed, the queries after which the run
    first reached ``random``'s accuracy at ``budget`` on that seed (None: never),
    ``reach_median`` (None when fewer than half the seeds reached it) and ``n_reached``."""
    runs = _runs(rows)
    out = []
    for (task, noise, strategy), by_seed in runs.items():
        curves = {s: curve(rs, budget) for s, rs in sorted(by_seed.items())}
        base = {s: curve(rs, budget) for s, rs in sorted(runs.get((task, noise, BASELINE), {}).items())}
        ideal = {s: curve(rs, budget) for s, rs in sorted(runs.get((task, 0.0, IDEAL), {}).items())}
        paired = [s for s in curves if s in base]
        row = {"task": task, "noise": noise, "strategy": strategy, "seeds": len(curves)}
        for q in checkpoints:
            row[f"acc@{q}"], row[f"acc@{q}_sd"] = mean_sd([at(*c, q) for c in curves.values()])
            row[f"vs_random@{q}"], row[f"vs_random@{q}_sd"] = mean_sd(
                [at(*curves[s], q) - at(*base[s], q) for s in paired]
            )
            row[f"ideal@{q}"] = mean_sd([at(*c, q) for c in ideal.values()])[0]
        row["auc"], row["auc_sd"] = mean_sd([area_under_curve(*c) for c in curves.values()])
        row["vs_random_auc"], row["vs_random_auc_sd"] = mean_sd(
            [area_under_curve(*curves[s]) - area_under_curve(*base[s]) for s in paired]
        )
        reach = [queries_to_reach(*curves[s], at(*base[s], budget)) for s in paired]
        row["reach_random_final"] = reach
        row["n_reached"] = sum(r is not None for r in reach)
        row["reach_median"] = _median_or_never(reach)
        out.append(row)
    return out


def _median_or_never(values: list) -> float | None:
    """Median with None counted as +infinity; None when that median is infinite."""
    if not values:
        return None
    ordered = sorted(values, key=lambda v: math.inf if v is None else v)
    mid = len(ordered) // 2
    pick = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1], ordered[mid])
    if isinstance(pick, tuple):
        return None if None in pick else (pick[0] + pick[1]) / 2
    return pick


def _pct(m: float, sd: float | None = None, sign: bool = False) -> str:
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "—"
    s = f"{100 * m:+.1f}" if sign else f"{100 * m:.1f}"
    return s if sd is None or math.isnan(sd) else f"{s}±{100 * sd:.1f}"


def format_summary(summary: list[dict], checkpoints: list[int]) -> str:
    """A plain-text table per task and noise level: accuracy (%) at each checkpoint with
    its paired difference to random, AUC with its difference, queries to reach random's
    final accuracy (per seed), and the ideal reference."""
    lines = []
    groups: dict = {}
    for r in summary:
        groups.setdefault((r["task"], r["noise"]), []).append(r)
    for (task, noise), group in groups.items():
        seeds = max(r["seeds"] for r in group)
        lines.append(
            f"\n{task}, oracle noise {100 * noise:g} %, {seeds} seed(s): test accuracy (%) "
            f"mean, Δ = paired difference to {BASELINE} (mean±sd over seeds)"
        )
        head = f"{'strategy':>10} | {'AUC':>5} {'Δ':>10}"
        for q in checkpoints:
            head += f" | {'@' + str(q):>5} {'Δ':>10}"
        head += " | reaches random's final at (per seed)"
        lines += [head, "-" * len(head)]
        for r in group:
            auc_delta = _pct(r["vs_random_auc"], r["vs_random_auc_sd"], True)
            line = f"{r['strategy']:>10} | {_pct(r['auc']):>5} {auc_delta:>10}"
            for q in checkpoints:
                line += f" | {_pct(r[f'acc@{q}']):>5} {_pct(r[f'vs_random@{q}'], r[f'vs_random@{q}_sd'], True):>10}"
            line += " | " + ", ".join("—" if v is None else str(v) for v in r["reach_random_final"])
            lines.append(line)
        ideal = group[0]
        if not math.isnan(ideal[f"ideal@{checkpoints[-1]}"]):
            lines.append(
                f"{'ideal ref':>10} | "
                + ", ".join(f"@{q} {_pct(ideal[f'ideal@{q}'])}" for q in checkpoints)
                + " (the same number of samples labelled directly, no noise)"
            )
    return "\n".join(lines)


#: Colours per strategy, the same in every panel (matplotlib's default cycle order).
COLORS = {"pal": "C0", "uncertain": "C1", "nearest": "C2", "random": "C3", "passive": "C4", IDEAL: "black"}


def plot_grid(rows: list[dict], budget: int, path: str, note: str = "") -> None:
    """One PNG: a panel per task (rows) and noise level (columns), test accuracy against
    queries, mean over seeds with a ±1 sd band, one line per strategy; the ideal reference
    dashed black in every column of its task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _runs(rows)
    # Strategies without a colour of their own (the suite's variants, a callable's name)
    # take the cycle's next ones, C5 onwards, in order of appearance: never another's.
    others = [t for t in dict.fromkeys(r["strategy"] for r in rows) if t not in COLORS]
    colors = {**COLORS, **{t: f"C{5 + i % 5}" for i, t in enumerate(others)}}
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    noises = sorted({r["noise"] for r in rows})
    fig, axes = plt.subplots(
        len(tasks),
        len(noises),
        squeeze=False,
        sharex=True,
        figsize=(3.6 * len(noises) + 0.6, 2.5 * len(tasks) + 0.8),
        constrained_layout=True,
    )
    for i, task in enumerate(tasks):
        for j, noise in enumerate(noises):
            ax = axes[i][j]
            for (t, nz, strategy), by_seed in runs.items():
                if t != task or not (nz == noise or (strategy == IDEAL and nz == 0.0)):
                    continue
                curves = [curve(rs, budget) for rs in by_seed.values()]
                qs = sorted({q for c in curves for q in c[0]})
                stats = [mean_sd([at(*c, q) for c in curves]) for q in qs]
                m = [100 * s[0] for s in stats]
                sd = [100 * s[1] for s in stats]
                style = "--" if strategy == IDEAL else "-"
                ax.plot(qs, m, style, marker="o", ms=2.5, lw=1.2, label=strategy, color=colors[strategy])
                if strategy != IDEAL:
                    ax.fill_between(
                        qs,
                        [a - b for a, b in zip(m, sd)],
                        [a + b for a, b in zip(m, sd)],
                        alpha=0.12,
                        color=colors[strategy],
                    )
            ax.set_title(f"{task}, noise {100 * noise:g} %", fontsize=9)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            if j == 0:
                ax.set_ylabel("test accuracy (%)", fontsize=8)
            if i == len(tasks) - 1:
                ax.set_xlabel("oracle queries (pairs)", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8)
    if note:
        fig.suptitle(note, fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
