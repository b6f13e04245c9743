"""RelationStore at scale (docs/active.md, "Large pools"): record, reopen, known_mask.

Answers: :data:`ANSWERS` over as many sample ids (full run: 10⁶ over 10⁶), labels from
:data:`N_CLASSES` classes; half the pairs join two samples of one class, half two random
samples, and every answer is the true one (no contradictions), so about half are "alike".

Cases (one implementation each, ``palfast``):

* ``record``: a new file-backed store, every answer recorded in calls of
  :data:`BATCH` (one transaction, fsync and ``<path>-acked`` update each); the row's
  ``answers_per_s`` is answers / median seconds.
* ``reopen``: open a store file holding every answer (log replay, integrity checks).
  The file is built once per process, in large calls.
* ``refresh``: :meth:`RelationStore.refresh` of a reader of the store holding every
  answer when nothing is new: what ``palfast annotate`` pays on every page it serves.
* ``refresh (10000 new)``: the same reader's refresh after another writer (a second
  process's store, here in the same process) appended :data:`NEW_ROWS` answers in
  calls of :data:`BATCH`: reading, verifying and applying them. The append runs
  untimed before each run (:class:`palfast.benchmarks.harness.Prepared`), so the store
  grows by NEW_ROWS per run.
* ``known_mask``: :meth:`RelationStore.known_mask` on :data:`MASK_PAIRS` random pairs,
  against the store holding every answer.

Backends: ``palfast`` is the SQLite file store (the baseline). With a PostgreSQL
database named by ``$PALFAST_BENCH_STORE_URL`` (``palfast bench --store-url URL`` sets
it), ``record``, ``reopen`` and both ``refresh`` cases are also timed as ``postgres`` on that
server: each store lives in a schema of its own (``palfast_bench_<pid>_<k>``, through the
URL's ``search_path``), dropped after its run. The user of the URL must be allowed to
create schemas. The benchmark starts no server: give it one (bench/README.md says how
to start a throwaway one).

Peak memory is the harness's subprocess per case (``peak_rss_mib``: the whole process).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import urllib.parse

import numpy as np
import torch

from ..active import RelationStore
from .harness import Case, Prepared

N_CLASSES = 1000
#: Answers per record() call of the record case (an annotation app's flush, or a round).
BATCH = 1000
ANSWERS, QUICK_ANSWERS = 1_000_000, 10_000
MASK_PAIRS = 1_000_000
#: Answers per record() call when a case only needs the file built (fewer transactions).
BUILD_BATCH = 100_000
#: Answers another writer appends before each timed refresh of the ``refresh (10000 new)``
#: case: enough that reading, verifying and applying them outweighs a refresh's fixed cost
#: (the ``refresh (nothing new)`` case: 0.2 ms on SQLite, 2.4 ms on PostgreSQL at 10^5
#: answers, bench/README.md), so the time over NEW_ROWS is the cost of a row; and a tenth
#: of a store of 10^5 answers: a reader catching up, not a reopen.
NEW_ROWS = 10_000
#: The environment variable naming the PostgreSQL database the ``postgres`` cases use.
STORE_URL_ENV = "PALFAST_BENCH_STORE_URL"
_schemas = itertools.count()
#: The targets: record throughput in calls of BATCH, and reopen time, at ANSWERS answers.
TARGET_ANSWERS_PER_S = 20_000
TARGET_REOPEN_S = 10.0


def answers(n: int, count: int | None = None, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` (default ``n``) answers (pairs ``[m, 2]``, bool ``[m]``, m ≤ count: pairs
    of one sample dropped) over ``n`` sample ids, as the module docstring describes,
    drawn with ``seed`` (default ``n``)."""
    count = n if count is None else count
    rng = np.random.default_rng(n if seed is None else seed)
    label = np.arange(n) % N_CLASSES
    i = rng.integers(0, n, count)
    # a sample of i's class: same residue mod N_CLASSES
    per_class = (n - label[i] + N_CLASSES - 1) // N_CLASSES
    j_same = label[i] + N_CLASSES * (rng.random(count) * per_class).astype(np.int64)
    j = np.where(rng.random(count) < 0.5, j_same, rng.integers(0, n, count))
    keep = i != j
    i, j = i[keep], j[keep]
    return torch.from_numpy(np.stack([i, j], 1)), torch.from_numpy(label[i] == label[j])


def _record_all(store: RelationStore, pairs, ans, batch: int) -> None:
    for start in range(0, pairs.shape[0], batch):
        store.record(pairs[start : start + batch], ans[start : start + batch])


class _Schema:
    """A new schema in the PostgreSQL database ``url``: :attr:`path` is the URL of a store
    in it (its ``search_path``); dropped with its tables when garbage-collected."""

    def __init__(self, url: str):
        import psycopg

        self._admin = url
        self.name = f"palfast_bench_{os.getpid()}_{next(_schemas)}"
        with psycopg.connect(url, autocommit=True) as db:
            db.execute(f"CREATE SCHEMA {self.name}")
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qsl(parts.query) + [("options", f"-csearch_path={self.name}")]
        self.path = parts._replace(query=urllib.parse.urlencode(query)).geturl()

    def __del__(self):
        import psycopg

        # DROP removes the tables whole (their triggers refuse DELETE and TRUNCATE only).
        with psycopg.connect(self._admin, autocommit=True) as db:
            db.execute(f"DROP SCHEMA IF EXISTS {self.name} CASCADE")


class _Folder:
    """A temporary folder removed when the factory's run is garbage-collected;
    :meth:`store` names a new store file in it."""

    def __init__(self):
        self.path = tempfile.mkdtemp(prefix="palfast_bench_store_")
        self._count = itertools.count()

    def store(self) -> str:
        return os.path.join(self.path, f"store{next(self._count)}.db")

    def __del__(self):
        shutil.rmtree(self.path, ignore_errors=True)


def _place(url: str | None):
    """``(keeper, path)`` of a new empty store: a file in a temporary folder (``url``
    None) or a schema of the PostgreSQL database ``url``; the store goes with ``keeper``."""
    if url is None:
        folder = _Folder()
        return folder, folder.store()
    schema = _Schema(url)
    return schema, schema.path


def _record(n: int, url: str | None = None):
    def make():
        pairs, ans = answers(n)

        def run():
            keeper, path = _place(url)
            with RelationStore(path) as store:
                _record_all(store, pairs, ans, BATCH)
            del keeper  # the file or schema goes now, not at the end of the case

        return run

    return make


def _full_store(n: int, url: str | None):
    """``(keeper, path, recorded)``: a store holding the ``n`` answers, built in large calls."""
    pairs, ans = answers(n)
    keeper, path = _place(url)
    with RelationStore(path) as store:
        _record_all(store, pairs, ans, BUILD_BATCH)
    return keeper, path, pairs.shape[0]


def _reopen(n: int, url: str | None = None):
    def make():
        keeper, path, recorded = _full_store(n, url)

        def run():
            _ = keeper  # the store lives as long as the run
            with RelationStore(path) as store:
                if store.n_queries != recorded:
                    raise RuntimeError(f"reopened {store.n_queries} answers, wrote {recorded}")

        return run

    return make


def _refresh(n: int, url: str | None = None):
    def make():
        keeper, path, recorded = _full_store(n, url)
        reader = RelationStore(path, readonly=True)

        def run():
            _ = keeper
            if reader.refresh() != 0 or reader.n_queries != recorded:
                raise RuntimeError("the reader's store changed during the benchmark")

        return run

    return make


def _refresh_new(n: int, url: str | None = None):
    def make():
        keeper, path, _ = _full_store(n, url)
        reader = RelationStore(path, readonly=True)
        writer = RelationStore(path)
        seeds = itertools.count(n + 1)  # answers(n) drew with seed n: new pairs each run

        def prepare():
            pairs, ans = answers(n, NEW_ROWS, seed=next(seeds))
            _record_all(writer, pairs, ans, BATCH)

        def run():
            _ = keeper
            before = reader.n_queries
            if reader.refresh() != writer.n_queries - before or reader.n_queries != writer.n_queries:
                raise RuntimeError("the reader's refresh did not read what the writer appended")

        return Prepared(prepare, run)

    return make


def _known_mask(n: int):
    def make():
        pairs, ans = answers(n)
        store = RelationStore()
        _record_all(store, pairs, ans, BUILD_BATCH)
        gen = torch.Generator().manual_seed(n)
        queries = torch.randint(0, n, (MASK_PAIRS, 2), generator=gen)
        store.known_mask(queries[:1])  # its lookup arrays are built once per change
        return lambda: store.known_mask(queries)

    return make


def cases(quick: bool = False, device: str = "cpu") -> list[Case]:
    n = QUICK_ANSWERS if quick else ANSWERS
    # answers: those recorded (pairs of one sample are dropped from the n drawn)
    params = {"answers": answers(n)[0].shape[0], "sample_ids": n, "batch": BATCH}
    url = os.environ.get(STORE_URL_ENV) or None

    def backends(factory):
        """The SQLite store (``palfast``, the baseline) and, with a URL, ``postgres``."""
        return {"palfast": factory(n), **({"postgres": factory(n, url)} if url else {})}

    return [
        Case(
            "bench_store",
            f"record answers={n} batch={BATCH}",
            params,
            backends(_record),
            "palfast",
            "cpu",
            peak_warmup=False,
        ),
        Case("bench_store", f"reopen answers={n}", params, backends(_reopen), "palfast", "cpu"),
        Case("bench_store", f"refresh (nothing new) answers={n}", params, backends(_refresh), "palfast", "cpu"),
        Case(
            "bench_store",
            f"refresh ({NEW_ROWS} new) answers={n}",
            {**params, "new_rows": NEW_ROWS},
            backends(_refresh_new),
            "palfast",
            "cpu",
        ),
        Case(
            "bench_store",
            f"known_mask pairs={MASK_PAIRS} answers={n}",
            {**params, "pairs": MASK_PAIRS},
            {"palfast": _known_mask(n)},
            "palfast",
            "cpu",
        ),
    ]


def targets(rows: list[dict], env: dict) -> list[dict]:
    """Record throughput and reopen time at :data:`ANSWERS` answers (the SQLite store)."""
    out = []
    for prefix, name, unit, limit, way in (
        (
            "record",
            f"record >= {TARGET_ANSWERS_PER_S} answers/s in calls of {BATCH}",
            "answers/s",
            TARGET_ANSWERS_PER_S,
            "ge",
        ),
        ("reopen", f"reopen <= {TARGET_REOPEN_S:.0f} s", "s", TARGET_REOPEN_S, "le"),
    ):
        row = next(
            (
                r
                for r in rows
                if r["case"].startswith(prefix)
                and r.get("impl", "palfast") == "palfast"
                and r.get("sample_ids") == ANSWERS
            ),
            None,
        )
        if row is None or row.get("status") != "ok":
            why = "not run at 10^6 answers" if row is None else row["status"]
            out.append({"target": name, "value": None, "unit": unit, "limit": limit, "status": f"unmeasured ({why})"})
            continue
        value = row["median_s"] if way == "le" else row["answers"] / row["median_s"]
        met = value <= limit if way == "le" else value >= limit
        out.append({"target": name, "value": value, "unit": unit, "limit": limit, "status": "met" if met else "missed"})
    return out
