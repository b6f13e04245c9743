"""One active-PAL selection round on a large pool, per k-NN index (docs/active.md, "Large pools").

A case is one pool size N and one index of :func:`palfast.knn.knn` (``exact``, ``ivf``,
``hnsw``, ``ivf-join``: what ``index="auto"`` picks above
:data:`palfast.knn.AUTO_EXACT_MAX_ROWS`); one run is a whole selection round as a user calls it:
``select_queries(x, store, budget=500, strategy="pal", index=...)``, the k-NN search
(index training, adding the rows, searching every row) included. Time is seconds per
round; peak memory comes from the harness's subprocess per implementation, which here
runs no warm-up round (``peak_rss_mib``: the whole process at its peak, inputs and
imports included, what the targets below judge).

Data: synthetic clustered embeddings, D = 128, :data:`N_CLASSES` class centres drawn
from N(0, I) plus N(0, :data:`NOISE`²·I) per row (the set of docs/active.md's "Large
pools" measurements). The store holds what earlier rounds found: :data:`KNOWN_PER_CLASS`
known members of every class (chains of "alike" answers), so the round grows known
classes as well as seeding new ones.

Recall (``recall_at_10``, an extra of each row): the index is built on all N rows as the
round builds it (same seed and parameters), searched for :data:`RECALL_QUERIES` sampled
rows, and their 10 nearest other rows are compared with an exact search of the same
rows (torch mm + topk over all N; the exact result is computed once per N). ``ivf-join``
has no index to query: its whole self search runs, as in the round, and the sampled rows'
neighbours are taken from it. The row also carries ``build_s``: the seconds of building
the index and searching those rows (for ``exact``: the exact search of the sampled rows;
for ``ivf-join``: the whole search).

Each case has one implementation, so there are no ratios; the table compares rows.
Rounds at N = 10⁶ take minutes: run them with ``--repeats 1 --warmup 0``.
"""

from __future__ import annotations

import functools
import time

import torch

from ..active import RelationStore, select_queries
from ..knn import knn
from .harness import Case, Skip

D = 128
N_CLASSES = 1000
NOISE = 0.3
BUDGET = 500
K = 10
#: Known members per class in the store at the start of the round (2 answers per class).
KNOWN_PER_CLASS = 3
#: Rows whose neighbours are compared with the exact search (all rows when N is smaller).
RECALL_QUERIES = 10_000
#: Pool sizes: --quick runs the first two, a full run all three.
SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = SIZES[:2]
#: The exact index is timed up to this N: a self search is N²·D multiply-adds, about a
#: minute at N = 10⁵ on this project's 2-core machine and hours at 10⁶ (docs/active.md).
EXACT_MAX_N = 100_000
#: ... and up to this N in a --quick run, where 10⁵ would take most of its time.
QUICK_EXACT_MAX_N = 10_000
INDEXES = ("exact", "ivf", "hnsw", "ivf-join")
#: The indexes that need faiss (skipped without it); ``exact`` runs on the torch backend and
#: ``ivf-join`` is torch only.
FAISS_INDEXES = ("ivf", "hnsw")
#: The targets (docs/active.md, "Large pools"): a round at N = 10⁶ within this many
#: seconds and this peak RSS, and this recall@10 against the exact search.
TARGET_N = 1_000_000
TARGET_SECONDS = 60.0
TARGET_RSS_MIB = 4 * 1024
TARGET_RECALL = 0.95


def pool(n: int) -> torch.Tensor:
    """``[n, D]`` float32 embeddings: row r belongs to class r % N_CLASSES."""
    gen = torch.Generator().manual_seed(n)
    centres = torch.randn(N_CLASSES, D, generator=gen)
    x = torch.empty(n, D)
    # in chunks, so no second [n, D] temporary exists beside x
    for start in range(0, n, 1 << 16):
        rows = torch.arange(start, min(n, start + (1 << 16)))
        x[rows] = centres[rows % N_CLASSES] + NOISE * torch.randn(rows.numel(), D, generator=gen)
    return x


def known_store(n: int) -> RelationStore:
    """An in-memory store where samples c, c + C, c + 2C are known alike (class c)."""
    store = RelationStore()
    first = torch.arange(min(N_CLASSES, n))
    chain = [torch.stack([first + m * N_CLASSES, first + (m + 1) * N_CLASSES], 1) for m in range(KNOWN_PER_CLASS - 1)]
    chain = torch.cat(chain)
    chain = chain[chain.max(1).values < n]
    store.record(chain, torch.ones(chain.shape[0], dtype=torch.bool))
    return store


def recall_rows(n: int) -> torch.Tensor:
    """The sampled rows whose neighbours are checked (every row when n is small)."""
    if n <= RECALL_QUERIES:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(n + 1)
    return torch.randperm(n, generator=gen)[:RECALL_QUERIES].sort().values


def _without_self(nbrs: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """The first k neighbours of each query row other than the row itself (searched with
    k + 1); −1 where fewer were found."""
    keep = (nbrs != rows[:, None]) & (nbrs >= 0)
    keep &= keep.cumsum(1) <= k
    order = torch.sort(keep.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :k]
    return nbrs.gather(1, order).masked_fill(~keep.gather(1, order), -1)


def neighbours(x: torch.Tensor, rows: torch.Tensor, index: str) -> torch.Tensor:
    """The K nearest other rows of x for each of ``rows``, with the index a round builds
    (the exact one by torch mm + topk; ``ivf-join``: the self search of all rows, which
    has no index to query): ``[len(rows), K]``."""
    if index == "ivf-join":
        return knn(x, K, index="ivf-join", seed=0)[1][rows]
    if index == "exact":
        _, nbrs = knn(x[rows], K + 1, keys=x, backend="torch")
    else:
        _, nbrs = knn(x[rows], K + 1, keys=x, backend="faiss", index=index, seed=0)
    return _without_self(nbrs, rows, K)


@functools.lru_cache(maxsize=1)
def _exact_neighbours(n: int) -> torch.Tensor:
    x = pool(n)
    return neighbours(x, recall_rows(n), "exact")


def recall_at_k(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean over queries of |found ∩ exact| / K (−1 places never match)."""
    hits = (found[:, :, None] == exact[:, None, :]) & (found[:, :, None] >= 0)
    return float(hits.any(2).sum(1).float().mean() / exact.shape[1])


def _need_faiss(index: str):
    """Skip a case of a FAISS index where faiss is not installed (exact and ivf-join are torch only)."""
    if index not in FAISS_INDEXES:
        return
    try:
        import faiss  # noqa: F401
    except ImportError as e:
        raise Skip("faiss is not installed (pip install faiss-cpu)") from e


def _round(n: int, index: str):
    def make():
        _need_faiss(index)
        x = pool(n)
        store = known_store(n)

        def run():
            q = select_queries(
                x, store, BUDGET, "pal", k=K, index=index, seed=0, backend="torch" if index == "exact" else "auto"
            )
            if q.shape[0] != BUDGET:  # a round that asks less is not the workload
                raise RuntimeError(f"select_queries returned {q.shape[0]} pairs, not {BUDGET}")
            return q

        return run

    return make


def _recall(n: int, index: str):
    def extra():
        _need_faiss(index)
        exact = _exact_neighbours(n)
        x = pool(n)
        t0 = time.perf_counter()
        found = neighbours(x, recall_rows(n), index)
        return {
            "recall_at_10": recall_at_k(found, exact),
            "recall_queries": exact.shape[0],
            "build_s": time.perf_counter() - t0,
        }

    return extra


def cases(quick: bool = False, device: str = "cpu") -> list[Case]:
    # The search and the strategy run on the CPU (FAISS CPU indexes), whatever the device.
    out = []
    for n in QUICK_SIZES if quick else SIZES:
        for index in INDEXES:
            if index == "exact" and n > (QUICK_EXACT_MAX_N if quick else EXACT_MAX_N):
                continue
            out.append(
                Case(
                    "bench_active",
                    f"pal round N={n} index={index}",
                    {
                        "N": n,
                        "D": D,
                        "classes": N_CLASSES,
                        "budget": BUDGET,
                        "k": K,
                        "index": index,
                        "known_per_class": KNOWN_PER_CLASS,
                    },
                    {index: _round(n, index)},
                    index,
                    "cpu",
                    extras={index: _recall(n, index)},
                    peak_warmup=False,
                )
            )
    return out


def targets(rows: list[dict], env: dict) -> list[dict]:
    """The round at N = 10⁶ (time, peak RSS) and recall@10, per approximate index."""
    out = []
    for index in (i for i in INDEXES if i != "exact"):
        row = next((r for r in rows if r.get("N") == TARGET_N and r.get("index") == index), None)
        checks = (
            ("median_s", f"pal round <= {TARGET_SECONDS:.0f} s at N=1e6 ({index})", "s", TARGET_SECONDS, "le"),
            ("peak_rss_mib", f"pal round peak RSS <= 4 GiB at N=1e6 ({index})", "MiB", TARGET_RSS_MIB, "le"),
            ("recall_at_10", f"recall@10 >= {TARGET_RECALL} at N=1e6 ({index})", "", TARGET_RECALL, "ge"),
        )
        for key, name, unit, limit, way in checks:
            value = None if row is None or row.get("status") != "ok" else row.get(key)
            if value is None:
                why = (
                    "not run"
                    if row is None
                    else (row["status"] if row.get("status") != "ok" else f"{key} not measured")
                )
                status = f"unmeasured ({why})"
            else:
                met = value <= limit if way == "le" else value >= limit
                status = "met" if met else "missed"
            out.append({"target": name, "value": value, "unit": unit, "limit": limit, "status": status})
    return out
