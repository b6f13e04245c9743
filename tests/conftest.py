"""Shared fixtures: devices to test on and graph factories for every graph kind."""

from __future__ import annotations

import os

import pytest
import torch

import palfast
from palfast.testing import views_graph

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def make_graph(kind: str, n: int, *, seed: int = 0) -> palfast.PairGraph:
    """A graph over n rows of the given kind, with fresh random structure."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "views":
        return views_graph(n)
    if kind == "labels":  # with unknowns (-1)
        return palfast.PairGraph.from_labels(torch.randint(-1, max(2, n // 5), (n,), generator=gen))
    if kind == "edges":  # weighted, sparse, not symmetric, with duplicates and self-loops
        e = 3 * n
        src = torch.randint(0, n, (e,), generator=gen)
        dst = torch.randint(0, n, (e,), generator=gen)
        w = torch.rand(e, generator=gen) * 2
        return palfast.PairGraph.from_edges(src, dst, w, num_nodes=n, symmetric=False)
    if kind == "dense":
        W = torch.rand(n, n, generator=gen) * (torch.rand(n, n, generator=gen) < 0.2)
        return palfast.PairGraph.from_dense(W)
    if kind == "semi":  # PAL's semi-supervised mix of views and some labels
        m = max(1, n // 2)
        y = torch.randint(-1, 3, (m,), generator=gen).repeat(2)
        y = torch.cat([y, torch.randint(-1, 3, (max(0, n - y.numel()),), generator=gen)])[:n]
        base = palfast.PairGraph.from_views(m, 2) if 2 * m == n else palfast.PairGraph.from_views(n, 1)
        return 0.7 * base + 0.3 * palfast.PairGraph.from_labels(y)
    raise ValueError(kind)


@pytest.fixture
def graph_factory():
    """``graph_factory(kind, n, seed=0)`` -> PairGraph (test modules cannot import conftest)."""
    return make_graph


@pytest.fixture
def seeded_inputs(device, graph_factory):
    """``seeded_inputs(kind, n, d)`` -> ``(z, graph)``: a float64 ``z [n, d]`` of standard
    normal entries, the global RNG seeded by (n, d), and a graph of that kind over its
    rows, both on ``device``: what each loss is checked against its reference on."""

    def make(kind: str, n: int, d: int):
        torch.manual_seed(n * 1000 + d)
        z = torch.randn(n, d, dtype=torch.float64, device=device)
        return z, graph_factory(kind, n, seed=n + d).to(device)

    return make


# ------------------------------------------------ RelationStore backends (tests/_postgres.py)
@pytest.fixture(scope="session")
def postgres_server():
    """The throwaway PostgreSQL server of this session (tests/_postgres.py's Server), or
    None when PALFAST_TEST_POSTGRES names a server (someone else's: never restarted or
    stopped); the tests that need one skip when neither can be."""
    import _postgres

    why = _postgres.missing()
    if why and _postgres.required():
        pytest.fail(f"{_postgres.REQUIRED_ENV} is set and there is no PostgreSQL for the RelationStore tests: {why}")
    if why:
        pytest.skip(f"no PostgreSQL for the RelationStore tests: {why}")
    server = None if os.environ.get(_postgres.ENV) else _postgres.Server()
    try:
        yield server
    finally:
        if server is not None:
            server.close()


@pytest.fixture(scope="session")
def postgres_admin(postgres_server):
    """URL of a PostgreSQL server the tests may create databases on: PALFAST_TEST_POSTGRES,
    or the session's throwaway server."""
    import _postgres

    return _postgres.admin_url(postgres_server)


@pytest.fixture
def postgres_url(postgres_admin):
    """A new empty database for one test (dropped after it)."""
    import _postgres

    url, drop = _postgres.new_database(postgres_admin)
    yield url
    drop()


@pytest.fixture(params=["sqlite", "postgres"])
def store_path(request, tmp_path):
    """Where a RelationStore lives, once per backend: an SQLite file, a PostgreSQL URL."""
    if request.param == "postgres":
        return request.getfixturevalue("postgres_url")
    return str(tmp_path / "store.sqlite")
