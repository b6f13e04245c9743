"""palfast.metrics: RankMe against its formula on known spectra, k-NN against a brute-force
vote, linear probe sanity, bad input."""

import math

import pytest
import torch

from palfast.metrics import knn_accuracy, linear_probe_accuracy, rankme


def with_spectrum(sigma, n, d, seed=0):
    """A random [n, d] matrix whose singular values are exactly ``sigma``."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, len(sigma), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, len(sigma), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ v.T


def rankme_formula(sigma, eps=1e-7):
    total = sum(sigma)
    p = [s / total + eps for s in sigma]
    return math.exp(-sum(q * math.log(q) for q in p))


@pytest.mark.parametrize("sigma", [[3.0, 2.0, 1.0, 0.5], [1.0], [5.0, 1e-3, 1e-3], [float(k) for k in range(1, 20)]])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rankme_matches_formula(sigma, dtype):
    z = with_spectrum(sigma, 41, 23).to(dtype)
    # Zero singular values beyond len(sigma) add eps·log(eps) terms: include them.
    full = sigma + [0.0] * (min(41, 23) - len(sigma))
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert rankme(z) == pytest.approx(rankme_formula(full), rel=tol)
    assert rankme(z, eps=0.0) == pytest.approx(rankme_formula(sigma, eps=0.0), rel=tol)


@pytest.mark.parametrize("r", [1, 2, 7, 16])
def test_rankme_of_equal_singular_values_is_the_rank(r):
    z = with_spectrum([2.5] * r, 57, 16, seed=r)
    assert rankme(z, eps=0.0) == pytest.approx(r, rel=1e-9)


def test_rankme_edge_cases():
    assert rankme(torch.zeros(5, 3)) == 1.0
    assert rankme(torch.ones(1, 1)) == pytest.approx(1.0, rel=1e-6)


def knn_reference(train_z, train_y, test_z, k):
    """Majority vote of the k most similar (cosine) training rows; ties go to the class of
    the best-ranked neighbour among the tied classes. Written from the docstring."""
    a = train_z.double() / train_z.double().norm(dim=1, keepdim=True)
    b = test_z.double() / test_z.double().norm(dim=1, keepdim=True)
    preds = []
    for row in b @ a.T:
        order = torch.argsort(row, descending=True)[:k].tolist()
        votes = {}
        for rank, j in enumerate(order):
            c = int(train_y[j])
            count, first = votes.get(c, (0, rank))
            votes[c] = (count + 1, first)
        preds.append(max(votes, key=lambda c: (votes[c][0], -votes[c][1])))
    return torch.tensor(preds)


@pytest.mark.parametrize("k", [1, 4, 20])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_knn_matches_brute_force_vote(k, backend):
    g = torch.Generator().manual_seed(k)
    train_z, test_z = torch.randn(120, 6, generator=g), torch.randn(57, 6, generator=g)
    train_y = torch.randint(0, 4, (120,), generator=g)
    test_y = torch.randint(0, 4, (57,), generator=g)
    expected = float((knn_reference(train_z, train_y, test_z, k) == test_y).float().mean())
    assert knn_accuracy(train_z, train_y, test_z, test_y, k=k, backend=backend) == pytest.approx(expected)


def separable(n, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centers = 5 * torch.eye(d)[:3]
    return centers[y] + 0.3 * torch.randn(n, d, generator=g), y


def test_probes_on_separable_data():
    train_z, train_y = separable(90)
    test_z, test_y = separable(45, seed=1)
    assert knn_accuracy(train_z, train_y, test_z, test_y) == 1.0
    assert linear_probe_accuracy(train_z, train_y, test_z, test_y) == 1.0
    # Shuffled labels carry no information: far from perfect.
    perm = torch.randperm(90, generator=torch.Generator().manual_seed(0))
    assert knn_accuracy(train_z, train_y[perm], test_z, test_y) < 0.7
    assert linear_probe_accuracy(train_z, train_y[perm], test_z, test_y) < 0.7


def test_linear_probe_is_deterministic_and_dtype_agnostic():
    train_z, train_y = separable(60, seed=2)
    test_z, test_y = separable(60, seed=3)
    train_z = train_z + 2.0 * torch.randn(60, 5, generator=torch.Generator().manual_seed(4))
    a = linear_probe_accuracy(train_z, train_y, test_z, test_y)
    assert a == linear_probe_accuracy(train_z, train_y, test_z, test_y)
    assert a == linear_probe_accuracy(train_z.double(), train_y, test_z.double(), test_y)


@pytest.mark.parametrize("fn", [knn_accuracy, linear_probe_accuracy])
def test_bad_input(fn):
    z, y = separable(12)
    with pytest.raises(TypeError, match="train_z must be a torch.Tensor"):
        fn(z.tolist(), y, z, y)
    with pytest.raises(ValueError, match="test_z must be a 2-D tensor"):
        fn(z, y, z[0], y)
    with pytest.raises(ValueError, match="same width D"):
        fn(z, y, z[:, :3], y)
    with pytest.raises(ValueError, match="train_y must be a \\[N\\] = \\[12\\]"):
        fn(z, y[:5], z, y)
    with pytest.raises(TypeError, match="test_y must hold integer"):
        fn(z, y, z, y.float())
    with pytest.raises(ValueError, match="train_z must be finite"):
        fn(torch.full_like(z, float("nan")), y, z, y)


def test_bad_options():
    z, y = separable(12)
    with pytest.raises(ValueError, match="k must satisfy 1 <= k, got 0"):
        knn_accuracy(z, y, z, y, k=0)
    with pytest.raises(ValueError, match="backend must be"):
        knn_accuracy(z, y, z, y, backend="hnsw")
    with pytest.raises(ValueError, match="c must be a finite number > 0"):
        linear_probe_accuracy(z, y, z, y, c=0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        linear_probe_accuracy(z, torch.zeros(12, dtype=torch.long), z, y)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        rankme(z, eps=-1.0)
    with pytest.raises(TypeError, match="z must be floating point"):
        rankme(torch.ones(3, 3, dtype=torch.long))
