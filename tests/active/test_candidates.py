"""candidate_pairs / knn: equal to brute-force exact k-NN, faiss and torch agree,
store filtering, bad input rejected before FAISS runs."""

import pytest
import torch

from palfast import knn as knn_mod
from palfast.active import RelationStore, candidate_pairs, knn

try:
    import faiss  # noqa: F401

    BACKENDS = ["torch", "faiss"]
except ImportError:  # pragma: no cover
    BACKENDS = ["torch"]

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def brute_force_pairs(x, k):
    """Every {i, j} with j among i's k most similar rows (cosine, i excluded) or the
    reverse, as a dict (i, j) -> cosine, i < j. Written from the definition in float64."""
    x = x.double()
    xn = x / x.norm(dim=1, keepdim=True)
    s = xn @ xn.T
    n = x.shape[0]
    out = {}
    for i in range(n):
        others = [j for j in range(n) if j != i]
        others.sort(key=lambda j: -float(s[i, j]))
        for j in others[:k]:
            out[(min(i, j), max(i, j))] = float(s[i, j])
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, d, k", [(2, 3, 1), (41, 3, 4), (257, 127, 10), (57, 5, 56)])
@pytest.mark.slow
def test_equals_brute_force(backend, device, n, d, k):
    x = torch.randn(n, d, device=device)
    pairs, sims = candidate_pairs(x, k, backend=backend)
    expected = brute_force_pairs(x.cpu(), k)
    got = {tuple(p): float(s) for p, s in zip(pairs.tolist(), sims)}
    assert set(got) == set(expected)
    for key, s in expected.items():
        assert abs(got[key] - s) < 1e-5
    assert pairs.dtype == torch.long and sims.dtype == torch.float32
    assert bool((pairs[:, 0] < pairs[:, 1]).all())
    assert bool((sims[:-1] >= sims[1:]).all())  # most similar first


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_rows_sorted_and_self_free(backend):
    x = torch.randn(100, 8)
    x[7] = x[3]  # a duplicate row: its twin is its nearest neighbour, never itself
    sims, nbrs = knn(x, 5, backend=backend)
    assert bool((nbrs != torch.arange(100)[:, None]).all())
    assert int(nbrs[7, 0]) == 3 and int(nbrs[3, 0]) == 7
    assert bool((sims[:, :-1] >= sims[:, 1:] - 1e-6).all())


def test_faiss_and_torch_agree():
    if "faiss" not in BACKENDS:
        pytest.skip("faiss not installed")
    x = torch.randn(600, 16)
    pf, sf = candidate_pairs(x, 7, backend="faiss")
    pt, st = candidate_pairs(x, 7, backend="torch")
    # Same pairs, same similarities up to float rounding (which may swap near-ties).
    got = {tuple(p): float(s) for p, s in zip(pf.tolist(), sf)}
    ref = {tuple(p): float(s) for p, s in zip(pt.tolist(), st)}
    assert set(got) == set(ref)
    assert max(abs(got[key] - ref[key]) for key in ref) < 1e-5


def test_torch_backend_in_small_blocks(monkeypatch):
    x = torch.randn(97, 6)
    expected = candidate_pairs(x, 3, backend="torch")
    monkeypatch.setattr(knn_mod, "MAX_BLOCK", 97 * 5)  # 5 rows per block
    got = candidate_pairs(x, 3, backend="torch")
    assert torch.equal(got[0], expected[0]) and torch.allclose(got[1], expected[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_filters_known_and_implied_pairs(backend):
    x = torch.randn(60, 4)
    all_pairs, _ = candidate_pairs(x, 5, backend=backend)
    store = RelationStore()
    store.record(all_pairs[:6], torch.tensor([True, False, True, True, False, True]))
    pairs, _ = candidate_pairs(x, 5, store=store, backend=backend)
    assert not bool(store.known_mask(pairs).any())
    kept = {tuple(p) for p in pairs.tolist()}
    expected = {tuple(p) for p, known in zip(all_pairs.tolist(), store.known_mask(all_pairs)) if not known}
    assert kept == expected and len(kept) < all_pairs.shape[0] - 5  # implied ones dropped too


def test_ids_map_rows_to_samples():
    x = torch.randn(30, 5)
    ids = torch.randperm(1000)[:30]
    pairs, sims = candidate_pairs(x, 3, ids=ids)
    ref, ref_sims = candidate_pairs(x, 3)
    mapped = torch.stack([ids[ref].min(1).values, ids[ref].max(1).values], 1)
    assert {tuple(p) for p in pairs.tolist()} == {tuple(p) for p in mapped.tolist()}
    assert torch.allclose(sims.sort().values, ref_sims.sort().values)


def test_zero_rows_are_allowed():
    x = torch.randn(10, 3)
    x[4] = 0
    _, sims = candidate_pairs(x, 2)
    assert torch.isfinite(sims).all()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"embeddings": [[1.0, 2.0]]}, TypeError, "embeddings must be a torch.Tensor"),
        ({"embeddings": torch.randn(10)}, ValueError, "embeddings must be a 2-D"),
        ({"embeddings": torch.randint(0, 3, (10, 2))}, TypeError, "embeddings must be floating"),
        ({"embeddings": torch.randn(10, 0)}, ValueError, "D >= 1"),
        (
            {"embeddings": torch.tensor([[1.0, float("nan")], [0.0, 1.0], [1.0, 1.0]])},
            ValueError,
            "embeddings must be finite",
        ),
        (
            {"embeddings": torch.tensor([[1.0, float("inf")], [0.0, 1.0], [1.0, 1.0]])},
            ValueError,
            "embeddings must be finite",
        ),
        ({"k": 0}, ValueError, "k must satisfy 1 <= k < N = 10"),
        ({"k": 10}, ValueError, "k must satisfy 1 <= k < N = 10"),
        ({"k": 2.0}, TypeError, "k must be an int"),
        ({"k": True}, TypeError, "k must be an int"),
        ({"backend": "annoy"}, ValueError, "backend must be one of"),
        ({"ids": torch.arange(9)}, ValueError, "ids must be a \\[N\\]"),
        ({"ids": torch.zeros(10, dtype=torch.long)}, ValueError, "ids must be distinct"),
        ({"ids": -torch.arange(1, 11)}, ValueError, "ids must be >= 0"),
        ({"store": "x"}, TypeError, "store must be a palfast.active.RelationStore or None, got str"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(kwargs, exc, match, backend):
    args = {"embeddings": torch.randn(10, 3), "k": 3, "backend": backend, **kwargs}
    with pytest.raises(exc, match=match):
        candidate_pairs(args.pop("embeddings"), args.pop("k"), **args)


def test_single_row_has_no_valid_k():
    with pytest.raises(ValueError, match="k must satisfy 1 <= k < N = 1"):
        candidate_pairs(torch.randn(1, 3), 1)


def test_ids_are_checked_before_the_search():
    """A bad ids argument is reported before the search reads the embeddings (whose
    NaN the search would report first)."""
    x = torch.randn(10, 3)
    x[4, 1] = float("nan")
    with pytest.raises(ValueError, match="ids must be distinct"):
        candidate_pairs(x, 3, ids=torch.zeros(10, dtype=torch.long))
