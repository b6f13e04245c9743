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
* ``known_mask``: :meth:`RelationStore.known_mask` on :data:`MASK_PAIRS` random pairs,
  against the store holding every answer.

Peak memory is the harness's subprocess per case (``peak_rss_mib``: the whole process).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import torch

from ..active import RelationStore
from .harness import Case

N_CLASSES = 1000
#: Answers per record() call of the record case (an annotation app's flush, or a round).
BATCH = 1000
ANSWERS, QUICK_ANSWERS = 1_000_000, 10_000
MASK_PAIRS = 1_000_000
#: Answers per record() call when a case only needs the file built (fewer transactions).
BUILD_BATCH = 100_000
#: The targets: record throughput in calls of BATCH, and reopen time, at ANSWERS answers.
TARGET_ANSWERS_PER_S = 20_000
TARGET_REOPEN_S = 10.0


def answers(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` answers (pairs ``[m, 2]``, bool ``[m]``, m ≤ n: pairs of one sample dropped)
    over ``n`` sample ids, as the module docstring describes."""
    rng = np.random.default_rng(n)
    label = np.arange(n) % N_CLASSES
    i = rng.integers(0, n, n)
    # a sample of i's class: same residue mod N_CLASSES
    per_class = (n - label[i] + N_CLASSES - 1) // N_CLASSES
    j_same = label[i] + N_CLASSES * (rng.random(n) * per_class).astype(np.int64)
    j = np.where(rng.random(n) < 0.5, j_same, rng.integers(0, n, n))
    keep = i != j
    i, j = i[keep], j[keep]
    return torch.from_numpy(np.stack([i, j], 1)), torch.from_numpy(label[i] == label[j])


def _record_all(store: RelationStore, pairs, ans, batch: int) -> None:
    for start in range(0, pairs.shape[0], batch):
        store.record(pairs[start:start + batch], ans[start:start + batch])


class _Folder:
    """A temporary folder removed when the factory's run is garbage-collected."""

    def __init__(self):
        self.path = tempfile.mkdtemp(prefix="palfast_bench_store_")

    def __del__(self):
        shutil.rmtree(self.path, ignore_errors=True)


def _record(n: int):
    def make():
        pairs, ans = answers(n)
        folder = _Folder()
        count = [0]

        def run():
            count[0] += 1
            path = os.path.join(folder.path, f"record{count[0]}.db")
            with RelationStore(path) as store:
                _record_all(store, pairs, ans, BATCH)
            for suffix in ("", "-wal", "-shm", "-acked"):
                if os.path.exists(path + suffix):
                    os.remove(path + suffix)
        return run
    return make


def _reopen(n: int):
    def make():
        pairs, ans = answers(n)
        folder = _Folder()
        path = os.path.join(folder.path, "store.db")
        with RelationStore(path) as store:
            _record_all(store, pairs, ans, BUILD_BATCH)

        def run():
            _ = folder  # the folder lives as long as the run
            with RelationStore(path) as store:
                if store.n_queries != pairs.shape[0]:
                    raise RuntimeError(f"reopened {store.n_queries} answers, wrote {pairs.shape[0]}")
        return run
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
    return [Case("bench_store", f"record answers={n} batch={BATCH}", params,
                 {"palfast": _record(n)}, "palfast", "cpu", peak_warmup=False),
            Case("bench_store", f"reopen answers={n}", params, {"palfast": _reopen(n)},
                 "palfast", "cpu"),
            Case("bench_store", f"known_mask pairs={MASK_PAIRS} answers={n}",
                 {**params, "pairs": MASK_PAIRS}, {"palfast": _known_mask(n)}, "palfast", "cpu")]


def targets(rows: list[dict], env: dict) -> list[dict]:
    """Record throughput and reopen time at :data:`ANSWERS` answers."""
    out = []
    for prefix, name, unit, limit, way in (
            ("record", f"record >= {TARGET_ANSWERS_PER_S} answers/s in calls of {BATCH}",
             "answers/s", TARGET_ANSWERS_PER_S, "ge"),
            ("reopen", f"reopen <= {TARGET_REOPEN_S:.0f} s", "s", TARGET_REOPEN_S, "le")):
        row = next((r for r in rows if r["case"].startswith(prefix)
                    and r.get("sample_ids") == ANSWERS), None)
        if row is None or row.get("status") != "ok":
            why = "not run at 10^6 answers" if row is None else row["status"]
            out.append({"target": name, "value": None, "unit": unit, "limit": limit,
                        "status": f"unmeasured ({why})"})
            continue
        value = row["median_s"] if way == "le" else row["answers"] / row["median_s"]
        met = value <= limit if way == "le" else value >= limit
        out.append({"target": name, "value": value, "unit": unit, "limit": limit,
                    "status": "met" if met else "missed"})
    return out
