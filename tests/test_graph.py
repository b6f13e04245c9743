"""PairGraph constructors, algebra and validation (docs/api.md, "PairGraph")."""

from __future__ import annotations

import pytest
import torch

from palfast import PairGraph


def _dense_views(n, v):
    idx = torch.arange(n * v) % n
    W = (idx[:, None] == idx[None, :]).float()
    return W.fill_diagonal_(0)


def test_from_views_matches_definition():
    g = PairGraph.from_views(5, 3)
    torch.testing.assert_close(g.to_dense(), _dense_views(5, 3))
    assert g.num_nodes == 15 and g.num_edges == 15 * 2
    torch.testing.assert_close(g.degree(), torch.full((15,), 2.0, dtype=torch.float64))
    assert g.total_weight == 30 and g.num_anchors == 15


def test_from_labels_with_unknowns():
    y = torch.tensor([3, 7, -1, 3, 7, 3, -1])
    g = PairGraph.from_labels(y)
    want = ((y[:, None] == y[None, :]) & (y[:, None] >= 0)).float().fill_diagonal_(0)
    torch.testing.assert_close(g.to_dense(), want)
    assert g.num_anchors == 5  # the two unknowns have no positives
    assert g.indices.numel() == 0  # never expanded into edges
    assert g.label_classes == (2,)


def test_from_edges_symmetric_and_directed():
    g = PairGraph.from_edges([0, 1, 2, 2], [1, 2, 2, 0], [1.0, 2.0, 5.0, 0.5], num_nodes=4)
    W = torch.zeros(4, 4)
    for s, d, w in [(0, 1, 1.0), (1, 2, 2.0), (2, 0, 0.5)]:
        W[s, d] += w
        W[d, s] += w
    torch.testing.assert_close(g.to_dense(), W)  # self-loop (2, 2) dropped
    d = PairGraph.from_edges([0, 1], [1, 3], [1.0, 2.0], num_nodes=4, symmetric=False)
    Wd = torch.zeros(4, 4)
    Wd[0, 1], Wd[1, 3] = 1.0, 2.0
    torch.testing.assert_close(d.to_dense(), Wd)
    assert not d.symmetric
    # the transpose CSR really is Gᵀ
    rows = torch.repeat_interleave(torch.arange(4), d.t_indptr.diff())
    Wt = torch.zeros(4, 4)
    Wt[rows, d.t_indices] = d.t_weights
    torch.testing.assert_close(Wt, Wd.T)


def test_from_dense_roundtrip():
    torch.manual_seed(0)
    W = torch.rand(9, 9) * (torch.rand(9, 9) < 0.4)
    g = PairGraph.from_dense(W)
    torch.testing.assert_close(g.to_dense(), W.clone().fill_diagonal_(0))


def test_union_and_scaling_is_pal_semi_supervised_mix():
    y = torch.tensor([0, 1, -1, 0, 0, 1, -1, 0])
    gv, gl = PairGraph.from_views(4, 2), PairGraph.from_labels(y)
    alpha = 0.25
    g = (1 - alpha) * gv + alpha * gl
    torch.testing.assert_close(g.to_dense(), (1 - alpha) * gv.to_dense() + alpha * gl.to_dense())
    torch.testing.assert_close(g.degree(), g.to_dense(torch.float64).sum(1))
    assert g.total_weight == pytest.approx(float(g.to_dense(torch.float64).sum()))
    e = PairGraph.from_edges([0], [5], [3.0], num_nodes=8)
    torch.testing.assert_close((g + e).to_dense(), g.to_dense() + e.to_dense())


def test_to_device_keeps_everything():
    g = 2 * PairGraph.from_labels(torch.tensor([0, 0, 1]))
    h = g.to("cpu")
    assert h.label_weights == (2.0,) and torch.equal(h.to_dense(), g.to_dense())


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: PairGraph.from_views(0, 2), "n must satisfy 1 <= n"),
        (lambda: PairGraph.from_views(3, 0), "n_views must satisfy 1 <= n_views"),
        (lambda: PairGraph.from_labels(torch.tensor([0, -2])), "labels must be >= -1"),
        (lambda: PairGraph.from_labels(torch.zeros(2, 2, dtype=torch.long)), "labels must be a 1-D"),
        (lambda: PairGraph.from_labels(torch.rand(3)), "labels must hold integers"),
        (lambda: PairGraph.from_edges([0], [4], num_nodes=4), r"dst must be in \[0, num_nodes=4\)"),
        (lambda: PairGraph.from_edges([-1], [0], num_nodes=4), "src must be in"),
        (lambda: PairGraph.from_edges([0, 1], [1], num_nodes=4), "same length"),
        (lambda: PairGraph.from_edges([0], [1], [-1.0], num_nodes=4), "weights must be >= 0"),
        (lambda: PairGraph.from_edges([0], [1], [float("inf")], num_nodes=4), "weights must be finite"),
        (lambda: PairGraph.from_edges([0], [1], [1.0, 2.0], num_nodes=4), "weights must have shape"),
        (lambda: PairGraph.from_dense(torch.ones(2, 3)), "W must be a square"),
        (lambda: PairGraph.from_dense(torch.tensor([[0, float("nan")], [0, 0]])), "W must be finite"),
        (lambda: -1 * PairGraph.from_views(2, 2), "scale must be a finite number >= 0"),
        (lambda: PairGraph.from_views(2, 2) + PairGraph.from_views(3, 2), "cannot add graphs"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# ------------------------------------------------------------------ known pairs
def _known_pairs_brute_force(g: PairGraph, anchor: torch.Tensor) -> list[tuple[int, int]]:
    """Every ordered pair (i, k), i ≠ k, i an anchor, with a positive or a negative
    weight, read off the dense matrices one pair at a time."""
    known = g.to_dense(torch.float64) > 0
    if g.negatives is not None:
        known |= g.negatives.to_dense(torch.float64) > 0
    n = g.num_nodes
    return [(i, k) for i in range(n) for k in range(n) if i != k and bool(anchor[i]) and bool(known[i, k])]


def _with_negative_edges(g: PairGraph, seed: int) -> PairGraph:
    """g with random known negatives on pairs that are not positives of g."""
    gen = torch.Generator().manual_seed(seed)
    w = g.to_dense()
    pick = (torch.rand(g.num_nodes, g.num_nodes, generator=gen) < 0.2) & (w == 0) & (w.T == 0)
    pick.fill_diagonal_(False)
    src, dst = pick.nonzero(as_tuple=True)
    return g.with_negatives(PairGraph.from_edges(src, dst, num_nodes=g.num_nodes, symmetric=bool(seed % 2)))


@pytest.mark.parametrize("kind", ["views", "labels", "edges", "dense", "semi"])
@pytest.mark.parametrize("n", [1, 2, 9, 30])
@pytest.mark.parametrize("negatives", [False, True])
def test_known_pairs_match_brute_force(graph_factory, kind, n, negatives):
    g = graph_factory(kind, n, seed=n)
    if negatives:
        g = _with_negative_edges(g, seed=n)
    gen = torch.Generator().manual_seed(n + 1)
    for anchor in (
        torch.ones(n, dtype=torch.bool),
        torch.zeros(n, dtype=torch.bool),
        torch.rand(n, generator=gen) < 0.5,
    ):
        rows, cols = g.known_pairs(anchor)
        assert rows.dtype == cols.dtype == torch.long
        assert list(zip(rows.tolist(), cols.tolist())) == _known_pairs_brute_force(g, anchor)
    rows, cols = g.known_pairs()  # default: every row is an anchor
    assert list(zip(rows.tolist(), cols.tolist())) == _known_pairs_brute_force(g, torch.ones(n, dtype=torch.bool))


def test_known_pairs_of_label_sets_and_label_negatives():
    """A label set of weight 0 knows no pair; negatives given as a label set count."""
    y = torch.tensor([0, 1, 0, 1, 2, -1, 2, 0])
    g = PairGraph.from_views(4, 2) + PairGraph.from_labels(y, weight=0.0)
    g = g.with_negatives(PairGraph.from_labels(torch.tensor([0, 1, 1, -1, -1, 0, -1, -1])))
    anchor = torch.tensor([True, True, False, True, True, True, False, True])
    rows, cols = g.known_pairs(anchor)
    assert list(zip(rows.tolist(), cols.tolist())) == _known_pairs_brute_force(g, anchor)
    assert (0, 2) not in zip(rows.tolist(), cols.tolist())  # shared class, but weight 0


@pytest.mark.parametrize(
    "anchor,match",
    [
        (torch.ones(3, dtype=torch.bool), r"anchor must be a bool tensor of shape \[4\]"),
        (torch.ones(4), "anchor must be a bool tensor of shape .* got torch.float32"),
        ([True] * 4, "anchor must be a bool tensor .* got list"),
    ],
)
def test_known_pairs_refuses_a_bad_anchor(anchor, match):
    with pytest.raises(TypeError, match=f"PairGraph.known_pairs: {match}"):
        PairGraph.from_views(2, 2).known_pairs(anchor)
