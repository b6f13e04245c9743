"""Helpers shared by the store, answer-log, k-NN and annotate tests (tests/active/,
tests/annotate/, tests/test_knn_memmap.py); the numeric ones are palfast.testing.
pyproject.toml's ``pythonpath`` puts tests/ on sys.path, so tests import this module
as ``_store_helpers``."""

from __future__ import annotations

import os
import sqlite3

import torch

import palfast


def is_url(path) -> bool:
    """Whether a store ``path`` is a PostgreSQL URL (else an SQLite file)."""
    return str(path).startswith(("postgresql://", "postgres://"))


def execute_sql(path, *statements: str) -> list:
    """Run SQL on a store behind RelationStore's back (to damage, age or inspect it), an
    SQLite file or a PostgreSQL URL; returns the rows of the last statement."""
    if is_url(path):
        import psycopg

        with psycopg.connect(path, autocommit=True) as db:
            for sql in statements:
                cur = db.execute(sql)
            return cur.fetchall() if cur.description else []
    db = sqlite3.connect(path)
    try:
        for sql in statements:
            rows = db.execute(sql).fetchall()
        db.commit()
    finally:
        db.close()
    return rows


def relation_of(store, n):
    """The relation over samples 0..n-1 as ``[n, n]``: 1 alike, 0 different, -1 unknown."""
    code = {True: 1, False: 0, None: -1}
    return torch.tensor([[code[store.same(i, j)] for j in range(n)] for i in range(n)])


def closure_reference(n, pairs, answers):
    """Brute force: components of the positive answers (flood fill), negatives lifted to
    components, first answer wins on contradictions. Returns an [n, n] matrix of
    1 (alike), 0 (different), -1 (unknown)."""
    comp = list(range(n))

    def relabel(old, new):
        for t in range(n):
            if comp[t] == old:
                comp[t] = new

    negatives = set()
    for (i, j), a in zip(pairs, answers):
        ci, cj = comp[i], comp[j]
        if a:
            if ci != cj and (min(ci, cj), max(ci, cj)) not in negatives:
                relabel(cj, ci)
                negatives = {tuple(sorted((ci if x == cj else x, ci if y == cj else y))) for x, y in negatives}
        elif ci != cj:
            negatives.add((min(ci, cj), max(ci, cj)))
    out = torch.full((n, n), -1)
    for i in range(n):
        for j in range(n):
            if comp[i] == comp[j]:
                out[i, j] = 1
            elif (min(comp[i], comp[j]), max(comp[i], comp[j])) in negatives:
                out[i, j] = 0
    return out


def random_answers(n, q, n_classes, seed, noise=0.0):
    """``q`` answers about ``n`` samples of ``n_classes`` hidden classes, a fraction
    ``noise`` of them flipped: ``(pairs [q, 2], answers [q])``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, n_classes, (n,), generator=g)
    a = torch.randint(0, n, (q,), generator=g)
    b = (a + torch.randint(1, n, (q,), generator=g)) % n
    pairs = torch.stack([a, b], 1)
    ans = y[a] == y[b]
    if noise:
        ans ^= torch.rand(q, generator=g) < noise
    return pairs, ans


def child_env():
    """The environment of a child Python process that writes a store."""
    # The children import the palfast these tests import. They also run in a
    # temporary cwd: `python -c` puts the cwd first on sys.path, and a checkout's
    # palfast/ (no compiled _C) would shadow the installed package.
    root = os.path.dirname(os.path.dirname(os.path.abspath(palfast.__file__)))
    return {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}


def count_knn_searches(monkeypatch) -> list[int]:
    """The k of every k-NN graph search select_queries runs from now on: the real
    ``palfast.knn.knn``, each call's k recorded in the returned list."""
    from palfast.active import strategies

    searches = []
    real = strategies.knn

    def counted(*args, **kwargs):
        searches.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(strategies, "knn", counted)
    return searches
