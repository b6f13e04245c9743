"""palfast.knn approximate indexes: recall against exact search on a clustered set,
index choice, bad parameters rejected before FAISS sees them. The FAISS indexes need
faiss; ``"ivf-join"`` is torch only and is tested without it too."""

import importlib.util

import numpy as np
import pytest
import torch

from palfast import knn as knn_mod
from palfast.knn import knn

needs_faiss = pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="faiss is not installed")

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


@needs_faiss
@pytest.mark.parametrize("index", ["ivf", "hnsw"])
@pytest.mark.slow
def test_recall_at_10_against_exact(index):
    x = clustered()
    _, exact = knn(x, 10, index="exact")
    sims, nbrs = knn(x, 10, index=index)
    assert recall(nbrs, exact) >= MIN_RECALL
    assert bool((nbrs != torch.arange(x.shape[0])[:, None]).all())  # never itself
    assert bool((sims[:, :-1] >= sims[:, 1:] - 1e-6).all())


@needs_faiss
@pytest.mark.slow
def test_ivf_with_keys_and_ivfpq_run():
    x = clustered()
    queries = x[:100] + 0.01
    _, exact = knn(queries, 10, keys=x, index="exact")
    _, nbrs = knn(queries, 10, keys=x, index="ivf")
    assert recall(nbrs, exact) >= MIN_RECALL
    # IVF-PQ compresses each row to pq_m bytes: similarities and neighbours approximate.
    sims, nbrs = knn(queries, 10, keys=x, index="ivfpq", pq_m=8)
    assert nbrs.shape == (100, 10) and bool((nbrs >= 0).all())


@needs_faiss
@pytest.mark.slow
def test_ivf_is_reproducible():
    x = clustered(n=2000)
    assert torch.equal(knn(x, 5, index="ivf", seed=3)[1], knn(x, 5, index="ivf", seed=3)[1])


@needs_faiss
def test_auto_is_exact_below_the_threshold_and_ivf_above(monkeypatch):
    x = clustered(n=2000)
    exact = knn(x, 10, index="exact")
    assert torch.equal(knn(x, 10, index="auto")[1], exact[1])
    assert knn_mod.resolve_index("op", "auto", "faiss", knn_mod.AUTO_EXACT_MAX_ROWS) == "exact"
    assert knn_mod.resolve_index("op", "auto", "faiss", knn_mod.AUTO_EXACT_MAX_ROWS + 1) == "ivf"
    assert knn_mod.resolve_index("op", "auto", "torch", 10**9) == "exact"


@pytest.mark.parametrize("index", [pytest.param("ivf", marks=needs_faiss), "ivf-join"])
@pytest.mark.slow
def test_missing_neighbours_are_marked(index):
    # nprobe = 1 of 40 lists: a list holds about 2000 / 40 = 50 rows, fewer than k = 60.
    x = clustered(n=2000, classes=400, d=8, noise=0.05)
    sims, nbrs = knn(x, 60, index=index, nlist=40, nprobe=1)
    missing = nbrs < 0
    assert bool(missing.any())
    assert bool(torch.isneginf(sims[missing]).all())
    assert not bool(torch.isneginf(sims[~missing]).any())
    assert bool((missing[:, :-1] <= missing[:, 1:]).all())  # missing places last


@needs_faiss
def test_default_nlist():
    assert knn_mod.default_nlist(10**6) == 4000
    assert knn_mod.default_nlist(100) == 2  # at least 39 training rows per list
    assert knn_mod.default_nlist(5) == 1


@needs_faiss
@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
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
    ],
)
def test_bad_index_parameters(kwargs, exc, match):
    kwargs = dict(kwargs)
    x = clustered(n=kwargs.pop("x", 500))
    with pytest.raises(exc, match=match):
        knn(x, 5, op="palfast.knn.knn", **kwargs)


@needs_faiss
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


# --- "ivf-join": the IVF self search as GEMMs (torch only) ---------------------------


def overlapping(n=20_000):
    """A harder set than :func:`clustered`: noise as large as the spread of the class
    centres (classes overlap), 1000 classes of about 20 rows, D = 128 (the set that
    palfast.knn.DEFAULT_JOIN_NPROBE was chosen on)."""
    return clustered(n=n, classes=1000, d=128, noise=1.0, seed=2)


@pytest.mark.parametrize("make", [clustered, overlapping], ids=["clustered", "overlapping"])
@pytest.mark.slow
def test_ivf_join_recall_at_10_against_exact(make):
    x = make()
    _, exact = knn(x, 10, backend="torch")
    sims, nbrs = knn(x, 10, index="ivf-join", backend="torch")
    assert recall(nbrs, exact) >= MIN_RECALL
    assert bool((nbrs != torch.arange(x.shape[0])[:, None]).all())  # never itself
    assert bool((sims[:, :-1] >= sims[:, 1:]).all())
    # the similarities are the rows' cosines
    xn = torch.nn.functional.normalize(x, dim=1)
    torch.testing.assert_close(sims, (xn[:, None, :] * xn[nbrs]).sum(-1), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_ivf_join_probing_every_list_is_exact():
    x = clustered(n=1500)
    exact = knn(x, 10, backend="torch")
    sims, nbrs = knn(x, 10, index="ivf-join", nlist=12, nprobe=12)
    assert torch.equal(nbrs, exact[1])
    torch.testing.assert_close(sims, exact[0], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_ivf_join_is_reproducible_and_follows_the_seed():
    x = overlapping(n=2000)
    a = knn(x, 5, index="ivf-join", nlist=20, nprobe=2, seed=3)
    b = knn(x, 5, index="ivf-join", nlist=20, nprobe=2, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = knn(x, 5, index="ivf-join", nlist=20, nprobe=2, seed=4)
    assert not torch.equal(a[1], c[1])  # another sample and start of the k-means


@pytest.mark.slow
def test_ivf_join_same_on_one_thread_and_on_several():
    x = clustered(n=2000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = knn(x, 10, index="ivf-join", nlist=16, nprobe=3)
        torch.set_num_threads(max(2, threads))
        several = knn(x, 10, index="ivf-join", nlist=16, nprobe=3)
        assert torch.get_num_threads() == max(2, threads)  # restored after the join
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[1], several[1])


@pytest.mark.slow
def test_ivf_join_reads_a_memory_map(tmp_path):
    x = clustered(n=1200).double()
    path = tmp_path / "x.npy"
    np.save(path, x.numpy())
    old = knn_mod.CHUNK_BYTES
    knn_mod.CHUNK_BYTES = 4 * 32 * 100  # 100 rows a chunk: chunk boundaries crossed
    try:
        mapped = knn(np.load(path, mmap_mode="r"), 10, index="ivf-join", nlist=10, nprobe=3)
    finally:
        knn_mod.CHUNK_BYTES = old
    assert torch.equal(mapped[1], knn(x, 10, index="ivf-join", nlist=10, nprobe=3)[1])


def test_auto_is_ivf_join_for_a_self_search_above_the_threshold():
    big = knn_mod.AUTO_EXACT_MAX_ROWS + 1
    for backend in ("faiss", "torch"):
        assert knn_mod.resolve_index("op", "auto", backend, big, self_search=True) == "ivf-join"
        assert knn_mod.resolve_index("op", "auto", backend, big - 1, self_search=True) == "exact"


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"nlist": 10, "nprobe": 11}, ValueError, "nprobe must be <= nlist = 10"),
        ({"nlist": 501}, ValueError, "nlist must be <= N = 500"),
        ({"nlist": 0}, ValueError, "nlist must satisfy 1 <= nlist"),
        ({"nprobe": 0}, ValueError, "nprobe must satisfy 1 <= nprobe"),
        ({"nprobe": 2.0}, TypeError, "nprobe must be an int"),
        ({"ef_search": 8}, ValueError, "ef_search applies to index='hnsw' only"),
        ({"keys": "x"}, ValueError, "index='ivf-join' searches the rows among themselves"),
    ],
)
def test_ivf_join_bad_parameters(kwargs, exc, match):
    x = clustered(n=500)
    if kwargs.get("keys") == "x":
        kwargs["keys"] = x
    with pytest.raises(exc, match=match):
        knn(x, 5, index="ivf-join", op="palfast.knn.knn", **kwargs)


@pytest.mark.parametrize("self_search", [True, False])
def test_exact_torch_search_with_the_keys_split_equals_one_pass(monkeypatch, self_search):
    """Above MAX_BLOCK / MIN_BLOCK_ROWS keys the exact torch search splits the keys too and
    merges each row's top-k block by block (the last key block smaller than k here); it
    finds what one pass over all keys finds, own rows excluded in a self search."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 16, generator=gen)
    keys = None if self_search else torch.randn(250, 16, generator=gen)
    k = 12
    one_pass = knn(x, k, keys=keys, backend="torch")
    monkeypatch.setattr(knn_mod, "MIN_BLOCK_ROWS", 16)
    monkeypatch.setattr(knn_mod, "MAX_BLOCK", 97 * 16)  # 16 query rows x 97 keys per block
    split = knn(x, k, keys=keys, backend="torch")
    torch.testing.assert_close(split[0], one_pass[0], rtol=0, atol=1e-6)
    assert torch.equal(split[1], one_pass[1])
    if self_search:
        assert not (split[1] == torch.arange(300)[:, None]).any()
