"""Which answers mixed two true classes in a strategy-suite run (docs/active.md,
"Answers from people who make mistakes").

Runs the strategy suite's runs (``palfast.benchmarks.bench_strategies.run_one``, same
seeds, same training, so the same answers as the suite's) and, at the end of each run,
lists every *wrong join*: a pair the store's relation applied as "alike" whose two samples
have different true classes, found by replaying the relation's applied answers into a
fresh one. For each: the sizes of the two components it joined (a *single* join when one
of them is one sample, a *multi* join when both have two or more), the round in which the
pair was first asked (the last round's answers are asked after the last selection, so
they are never re-asked), its votes in the log (alike / different), and whether the store
lists it among its re-ask candidates now.

    PYTHONPATH=. python tools/merge_breakdown.py --noise 0.05 --seeds 3 \\
        --configs first:0,majority:0.2,confirm:0.2
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
import time
import warnings

import torch

from palfast.active.relation import Relation
from palfast.benchmarks import bench_strategies as bs
from palfast.benchmarks.strategy_tasks import resolve_tasks
from palfast.metrics import merged_classes


def wrong_joins(store, labels: torch.Tensor, queries_per_round: int) -> list[dict]:
    """The wrong joins the store's relation holds (module docstring), in the order the
    relation applied them."""
    pairs, alike = store._relation.answers()
    replay, joined = Relation("replay"), []
    replay.extend(zip(pairs[:, 0].tolist(), pairs[:, 1].tolist(), alike.tolist()), joined)
    log_pairs, log_alike = store.answers()
    votes: dict[tuple[int, int], list[int]] = collections.defaultdict(lambda: [0, 0, -1])
    for position, ((i, j), a) in enumerate(zip(log_pairs.tolist(), log_alike.tolist())):
        v = votes[(min(i, j), max(i, j))]
        v[0 if a else 1] += 1
        if v[2] < 0:
            v[2] = position
    cand = store.reask_candidates()[0]
    candidates = {(min(i, j), max(i, j)) for i, j in cand.tolist()}
    out = []
    for position, size_i, size_j in joined:
        i, j = int(pairs[position, 0]), int(pairs[position, 1])
        if labels[i] == labels[j]:
            continue
        key = (min(i, j), max(i, j))
        n_alike, n_different, first = votes[key]
        out.append(
            {
                "pair": key,
                "sizes": (size_i, size_j),
                "kind": "single" if min(size_i, size_j) == 1 else "multi",
                "round": first // queries_per_round,
                "votes": (n_alike, n_different),
                "candidate": key in candidates,
            }
        )
    return out


def _configs(text: str) -> list[tuple[str, float]]:
    out = []
    for item in text.split(","):
        policy, _, reask = item.partition(":")
        out.append((policy, float(reask or 0)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="digits-noviews")
    p.add_argument("--strategy", default="pal")
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--budget", type=int, default=300)
    p.add_argument("--configs", default="first:0,majority:0.2,confirm:0.2", help="policy:reask,...")
    args = p.parse_args(argv)
    (task,) = resolve_tasks((args.task,), "merge_breakdown")
    data = task.load()
    y_pool = data[1]
    last_round = args.budget // bs.FULL.queries_per_round - 1
    with bs.one_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for policy, reask in _configs(args.configs):
            s = bs.check_settings(
                dataclasses.replace(bs.FULL, policy=policy, reask=reask, budget=args.budget, checkpoints=(args.budget,))
            )
            for seed in range(args.seeds):
                keep: list = []
                start = time.perf_counter()
                rows = bs.run_one(task, data, args.strategy, seed, args.noise, s, keep)
                store = keep[0].store
                merged = merged_classes(store.components(torch.arange(y_pool.numel())), y_pool)
                wrong = wrong_joins(store, y_pool, s.queries_per_round)
                kinds = collections.Counter(
                    (w["kind"], "last round" if w["round"] == last_round else "earlier") for w in wrong
                )
                print(
                    f"{policy} reask {reask:g} seed {seed}: accuracy {rows[-1]['accuracy']:.3f}, merged {merged}, "
                    f"wrong joins {len(wrong)} {dict(kinds)} ({time.perf_counter() - start:.1f} s)"
                )
                for w in wrong:
                    print(
                        f"    pair {w['pair']} sizes {w['sizes']} {w['kind']} round {w['round']} "
                        f"votes alike/different {w['votes']} candidate {w['candidate']}"
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
