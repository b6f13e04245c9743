"""palfast.knn approximate indexes: recall against exact search on a clustered set,
index choice, bad parameters rejected before FAISS sees them."""

import pytest
import torch

from palfast import knn as knn_mod
from palfast.knn import knn

faiss = pytest.importorskip("faiss")

#: Recall@10 that an approximate index must reach against exact search.
MIN_RECALL = 0.95


def clustered(n=3000, classes=60, d=32, noise=0.6, seed=0):
    """Class centres + Gaussian noise (noise · √d against centres of norm ≈ √d: the
    classes overlap at noise ≈ 1)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    return torch.randn(classes, d, generator=g)[y] + noise * torch.randn(n, d, generator=g)


def recall(approx, exact):
    return sum(len(set(a) & set(b)) for a, b in zip(approx.tolist(), exact.tolist())) / exact.numel()


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_recall_at_10_against_exact(index):
    x = clustered()
    _, exact = knn(x, 10, index="exact")
    sims, nbrs = knn(x, 10, index=index)
    assert recall(nbrs, exact) >= MIN_RECALL
    assert bool((nbrs != torch.arange(x.shape[0])[:, None]).all())  # never itself
    assert bool((sims[:, :-1] >= sims[:, 1:] - 1e-6).all())


def test_ivf_with_keys_and_ivfpq_run():
    x = clustered()
    queries = x[:100] + 0.01
    _, exact = knn(queries, 10, keys=x, index="exact")
    _, nbrs = knn(queries, 10, keys=x, index="ivf")
    assert recall(nbrs, exact) >= MIN_RECALL
    # IVF-PQ compresses each row to pq_m bytes: similarities and neighbours approximate.
    sims, nbrs = knn(queries, 10, keys=x, index="ivfpq", pq_m=8)
    assert nbrs.shape == (100, 10) and bool((nbrs >= 0).all())


def test_ivf_is_reproducible():
    x = clustered(n=2000)
    assert torch.equal(knn(x, 5, index="ivf", seed=3)[1], knn(x, 5, index="ivf", seed=3)[1])


def test_auto_is_exact_below_the_threshold_and_ivf_above(monkeypatch):
    x = clustered(n=2000)
    exact = knn(x, 10, index="exact")
    assert torch.equal(knn(x, 10, index="auto")[1], exact[1])
    assert knn_mod.resolve_index("op", "auto", "faiss", knn_mod.AUTO_EXACT_MAX_ROWS) == "exact"
    assert knn_mod.resolve_index("op", "auto", "faiss", knn_mod.AUTO_EXACT_MAX_ROWS + 1) == "ivf"
    assert knn_mod.resolve_index("op", "auto", "torch", 10 ** 9) == "exact"


def test_missing_neighbours_are_marked():
    # nprobe = 1 of 40 lists: a list holds about 2000 / 40 = 50 rows, fewer than k = 60.
    x = clustered(n=2000, classes=400, d=8, noise=0.05)
    sims, nbrs = knn(x, 60, index="ivf", nlist=40, nprobe=1)
    missing = nbrs < 0
    assert bool(missing.any())
    assert bool(torch.isneginf(sims[missing]).all())
    # missing places are last in their row
    assert bool((missing[:, :-1] <= missing[:, 1:]).all())


def test_default_nlist():
    assert knn_mod.default_nlist(10 ** 6) == 4000
    assert knn_mod.default_nlist(100) == 2  # at least 39 training rows per list
    assert knn_mod.default_nlist(5) == 1


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"index": "ivf", "nlist": 10, "nprobe": 11}, ValueError, "nprobe must be <= nlist = 10"),
    ({"index": "ivf", "nlist": 501}, ValueError, "nlist must be <= N = 500"),
    ({"index": "ivf", "nlist": 0}, ValueError, "nlist must satisfy 1 <= nlist"),
    ({"index": "ivf", "nprobe": 1.5}, TypeError, "nprobe must be an int"),
    ({"index": "annoy"}, ValueError, "index must be one of"),
    ({"index": "hnsw", "ef_search": 3}, ValueError, "ef_search must satisfy 5 <= ef_search"),
    ({"index": "exact", "nprobe": 4}, ValueError, "nlist and nprobe apply to index='ivf'"),
    ({"index": "ivf", "ef_search": 4}, ValueError, "ef_search applies to index='hnsw' only"),
    ({"index": "ivfpq", "pq_m": 5}, ValueError, "pq_m must divide the width D = 32"),
    ({"index": "ivf", "pq_m": 4}, ValueError, "pq_m applies to index='ivfpq' only"),
    ({"index": "ivfpq", "x": 200}, ValueError, "index='ivfpq' needs at least 256 rows"),
    ({"index": "ivf", "backend": "torch"}, ValueError, "needs backend='faiss' or 'auto'"),
])
def test_bad_index_parameters(kwargs, exc, match):
    kwargs = dict(kwargs)
    x = clustered(n=kwargs.pop("x", 500))
    with pytest.raises(exc, match=match):
        knn(x, 5, op="palfast.knn.knn", **kwargs)


def test_approximate_index_without_faiss_says_how_to_install(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss" or name.startswith("faiss."):
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_faiss)
    x = clustered(n=100)
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        knn(x, 5, index="ivf")
    # exact search still works, through torch
    assert knn(x, 5, index="auto")[1].shape == (100, 5)
