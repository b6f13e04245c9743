"""Known negatives ("different" answers): PairGraph.negatives, the losses that use them
(info_nce's unknown_weight, spectral_contrastive's signed graph), the losses that ignore
them, and RelationStore.graph(negatives=True)."""

from __future__ import annotations

import dataclasses
import pickle
import random
import warnings

import pytest
import torch

import palfast
from palfast import PairGraph, reference
from palfast.active import RelationStore
from palfast.active.store import ContradictionWarning
from palfast.testing import (
    KINDS,
    assert_matches_float64,
    assert_rows_match_float64,
    assert_within_rounding_error,
    info_nce_cond,
)

# float tolerances: CI runs these again under a second CPU capability (.ci/run)
pytestmark = pytest.mark.numeric


def with_random_negatives(g: PairGraph, *, seed: int, density: float = 0.15) -> PairGraph:
    """g with random weighted negatives on pairs that are not positives of g (some rows
    get none), symmetric or not depending on the seed."""
    gen = torch.Generator().manual_seed(seed)
    n = g.num_nodes
    w = g.to_dense()
    pick = (torch.rand(n, n, generator=gen) < density) & (w == 0) & (w.T == 0)
    pick.fill_diagonal_(False)
    pick[: max(1, n // 7)] = False  # rows without known negatives
    src, dst = pick.nonzero(as_tuple=True)
    w = 0.5 + torch.rand(src.numel(), generator=gen)
    return g.with_negatives(PairGraph.from_edges(src, dst, w, num_nodes=n, symmetric=bool(seed % 2)))


# ------------------------------------------------------------------ PairGraph
def test_with_negatives_is_kept_by_to_add_scale_replace_and_pickle():
    g = PairGraph.from_views(3, 2)
    neg = PairGraph.from_edges([0, 1], [1, 5], [2.0, 3.0], num_nodes=6)
    h = g.with_negatives(neg)
    assert g.negatives is None and h.negatives is neg
    torch.testing.assert_close(h.to_dense(), g.to_dense())  # positives unchanged
    assert h.total_weight == g.total_weight and h.num_anchors == g.num_anchors
    assert torch.equal(h.to("cpu").negatives.to_dense(), neg.to_dense())
    torch.testing.assert_close((0.5 * h).negatives.to_dense(), 0.5 * neg.to_dense())
    other = PairGraph.from_labels(torch.tensor([0, 1, 2, 0, 1, 2])).with_negatives(
        PairGraph.from_edges([2], [4], num_nodes=6)
    )
    both = h + other
    torch.testing.assert_close(both.negatives.to_dense(), neg.to_dense() + other.negatives.to_dense())
    assert (h + g).negatives.to_dense().equal(neg.to_dense())
    assert (g + h).negatives.to_dense().equal(neg.to_dense())
    assert (g + g).negatives is None
    assert pickle.loads(pickle.dumps(h)).negatives.to_dense().equal(neg.to_dense())
    assert h.with_negatives(None).negatives is None
    assert "negative_edges=4" in repr(h)


@pytest.mark.parametrize(
    "pos,neg,match",
    [
        (
            PairGraph.from_edges([0], [1], num_nodes=4),
            PairGraph.from_edges([1], [0], num_nodes=4),
            r"rows \(0, 1\) both alike and different",
        ),
        (
            PairGraph.from_labels(torch.tensor([0, 1, 0, 1])),
            PairGraph.from_edges([3], [1], num_nodes=4, symmetric=False),
            r"rows \(3, 1\)",
        ),
        (
            PairGraph.from_edges([2], [3], num_nodes=4, symmetric=False),
            PairGraph.from_labels(torch.tensor([-1, 0, 1, 1])),
            r"rows \(2, 3\)",
        ),
        (PairGraph.from_views(2, 2), PairGraph.from_labels(torch.tensor([5, -1, 5, 7])), r"rows \(0, 2\)"),
    ],
)
def test_a_pair_both_positive_and_negative_is_refused(pos, neg, match):
    with pytest.raises(ValueError, match="negatives must not contain a positive pair.*" + match):
        pos.with_negatives(neg)


def test_label_sets_that_share_no_pair_are_accepted():
    pos = PairGraph.from_labels(torch.tensor([0, 0, 1, 1, -1]))
    neg = PairGraph.from_labels(torch.tensor([3, 4, 3, 4, 3]))  # each pair crosses classes
    assert pos.with_negatives(neg).negatives is neg
    assert (
        pos.with_negatives(0 * PairGraph.from_labels(torch.tensor([0, 0, 1, 1, 1]))).negatives.total_weight == 0
    )  # zero weight: no pair, so nothing is shared


def test_adding_graphs_that_contradict_is_refused():
    g = PairGraph.from_views(2, 2).with_negatives(PairGraph.from_edges([0], [1], num_nodes=4))
    with pytest.raises(ValueError, match="both alike and different"):
        g + PairGraph.from_edges([0], [1], num_nodes=4)


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda g: g.with_negatives(torch.zeros(4, 4)), TypeError, "negatives must be a PairGraph or None, got Tensor"),
        (
            lambda g: g.with_negatives(PairGraph.from_views(3, 2)),
            ValueError,
            "negatives must be over the graph's 4 rows, got a graph over 6",
        ),
        (
            lambda g: g.with_negatives(
                PairGraph.from_edges([0], [1], num_nodes=4).with_negatives(PairGraph.from_edges([0], [2], num_nodes=4))
            ),
            ValueError,
            "negatives must not carry negatives of its own",
        ),
        (
            lambda g: dataclasses.replace(g, negatives=PairGraph.from_views(3, 2)),
            ValueError,
            "negatives must be over the graph's 4 rows, got a graph over 6",
        ),
        (lambda g: dataclasses.replace(g, negatives="x"), TypeError, "negatives must be a PairGraph"),
    ],
)
def test_bad_negatives(make, exc, match):
    with pytest.raises(exc, match=match):
        make(PairGraph.from_labels(torch.tensor([0, -1, -1, 0])))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices")
def test_negatives_on_another_device_are_refused():
    g = PairGraph.from_views(2, 2)
    with pytest.raises(ValueError, match="negatives must be on the graph's device"):
        g.with_negatives(PairGraph.from_edges([0], [1], num_nodes=4).to("cuda"))
    moved = g.with_negatives(PairGraph.from_edges([0], [1], num_nodes=4)).to("cuda")
    assert moved.negatives.device.type == "cuda"


@pytest.mark.parametrize("loss", [palfast.info_nce, palfast.spectral_contrastive])
def test_negatives_changed_in_place_are_refused(loss):
    neg = PairGraph.from_edges([0], [1], num_nodes=4)
    g = PairGraph.from_views(2, 2).with_negatives(neg)
    neg.weights.mul_(2)
    with pytest.raises(
        ValueError,
        match=r"graph.negatives must not be changed.*graph\.negatives"
        r"\.weights",
    ):
        loss(torch.randn(4, 3), g)


# ------------------------------------------------------------------ info_nce
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,d", [(1, 3), (2, 3), (41, 17), (257, 5)])
@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_info_nce_unknown_weight_matches_reference_float64(device, graph_factory, kind, n, d, lam):
    torch.manual_seed(n * 100 + d + int(10 * lam))
    z = torch.randn(n, d, dtype=torch.float64, device=device)
    g = with_random_negatives(graph_factory(kind, n, seed=n + d), seed=n).to(device)
    assert_rows_match_float64(
        palfast.info_nce, reference.info_nce, z, g, temperature=0.3, reduction="none", unknown_weight=lam
    )


@pytest.mark.parametrize("lam,normalize", [(0.0, True), (0.6, False)])
@pytest.mark.slow
def test_info_nce_unknown_weight_gradcheck(device, graph_factory, lam, normalize):
    torch.manual_seed(5)
    z = torch.randn(9, 3, dtype=torch.float64, device=device, requires_grad=True)
    for kind in KINDS:
        g = with_random_negatives(graph_factory(kind, 9, seed=2), seed=3).to(device)
        assert torch.autograd.gradcheck(
            lambda x, g=g: palfast.info_nce(
                x, g, temperature=0.5, normalize=normalize, unknown_weight=lam, reduction="none"
            ),
            (z,),
        )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_info_nce_unknown_weight_reductions_unnormalised(device, graph_factory, reduction):
    torch.manual_seed(9)
    n, d = 41, 6
    z = torch.randn(n, d, dtype=torch.float64, device=device) / d**0.5
    g = with_random_negatives(graph_factory("semi", n, seed=4), seed=6).to(device)
    assert_matches_float64(
        palfast.info_nce,
        reference.info_nce,
        z,
        g,
        temperature=0.2,
        normalize=False,
        reduction=reduction,
        unknown_weight=0.25,
    )


def test_info_nce_unknown_weight_float32_close_to_float64(device, graph_factory):
    torch.manual_seed(1)
    n, d = 300, 32
    z = torch.randn(n, d, device=device)
    g = with_random_negatives(graph_factory("labels", n, seed=3), seed=8, density=0.02).to(device)
    z1, z2 = z.clone().requires_grad_(), z.double().requires_grad_()
    got = palfast.info_nce(z1, g, temperature=0.1, unknown_weight=0.1)
    want = reference.info_nce(z2, g, temperature=0.1, unknown_weight=0.1)
    got.backward()
    want.backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(z1.grad.double(), z2.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_info_nce_unknown_weight_low_precision_within_rounding_error(device, graph_factory, dtype):
    torch.manual_seed(11)
    z64 = torch.randn(257, 64, dtype=torch.float64, device=device)
    g = with_random_negatives(graph_factory("semi", 257, seed=5), seed=7, density=0.05)
    assert_within_rounding_error(
        palfast.info_nce,
        reference.info_nce,
        z64,
        g.to(device),
        dtype,
        cond=info_nce_cond(z64, 0.2),
        temperature=0.2,
        reduction="none",
        unknown_weight=0.3,
    )


@pytest.mark.parametrize("kind", KINDS)
def test_info_nce_default_is_bit_identical_with_or_without_negatives(device, graph_factory, kind):
    torch.manual_seed(2)
    z = torch.randn(41, 8, device=device)
    g = graph_factory(kind, 41, seed=1)
    signed = with_random_negatives(g, seed=2).to(device)
    out = []
    for graph, kw in ((g.to(device), {}), (signed, {}), (signed, {"unknown_weight": 1.0})):
        x = z.clone().requires_grad_()
        loss = palfast.info_nce(x, graph, **kw)
        loss.backward()
        out.append((loss, x.grad))
    for loss, grad in out[1:]:
        assert torch.equal(loss, out[0][0]) and torch.equal(grad, out[0][1])


def test_info_nce_only_known_pairs_with_a_single_positive_is_zero():
    """λ = 0 with views only: each anchor's one known pair is its positive, ℓ_i = 0."""
    z = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    loss = palfast.info_nce(z, PairGraph.from_views(5, 2), unknown_weight=0.0, reduction="none")
    torch.testing.assert_close(loss, torch.zeros(10, dtype=torch.float64))


def test_info_nce_unknown_weight_stops_pushing_unknown_pairs_apart():
    """Two pieces of one class not joined yet: with λ = 1 row 0's loss pushes it away
    from the other piece, with λ = 0 (the other class known different) it does not
    depend on the other piece at all."""
    torch.manual_seed(0)
    z = torch.randn(8, 4, dtype=torch.float64)
    # rows 0-1 and 2-3 are two pieces of class A (not joined); 4-7 are class B
    pos = PairGraph.from_labels(torch.tensor([0, 0, 1, 1, 2, 2, 2, 2]))
    a, b = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7])
    neg = PairGraph.from_edges(a.repeat_interleave(4), b.repeat(4), num_nodes=8)
    g = pos.with_negatives(neg)
    for lam, pushed in ((1.0, True), (0.0, False)):
        x = z.clone().requires_grad_()
        palfast.info_nce(x, g, unknown_weight=lam, reduction="none")[0].backward()
        assert bool(x.grad[2:4].abs().max() > 1e-3) == pushed, (lam, x.grad)
        assert x.grad[4:].abs().max() > 1e-3  # class B is pushed away either way


@pytest.mark.parametrize(
    "bad,exc,match",
    [
        (-0.1, ValueError, r"unknown_weight must be a finite number >= 0 and <= 1"),
        (1.5, ValueError, "unknown_weight must be"),
        (float("nan"), ValueError, "unknown_weight must be"),
        ("0.5", TypeError, "unknown_weight must be a number"),
    ],
)
def test_info_nce_bad_unknown_weight(bad, exc, match):
    with pytest.raises(exc, match="palfast.info_nce: " + match):
        palfast.info_nce(torch.randn(4, 3), PairGraph.from_views(2, 2), unknown_weight=bad)


def test_info_nce_module_passes_unknown_weight():
    torch.manual_seed(4)
    z = torch.randn(12, 5, dtype=torch.float64)
    g = with_random_negatives(PairGraph.from_views(6, 2), seed=1)
    got = palfast.nn.InfoNCELoss(temperature=0.2, unknown_weight=0.5)(z, g)
    torch.testing.assert_close(got, reference.info_nce(z, g, temperature=0.2, unknown_weight=0.5))
    assert "unknown_weight=0.5" in repr(palfast.nn.InfoNCELoss(unknown_weight=0.5))


# ------------------------------------------------------------ spectral_contrastive
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,d", [(2, 3), (41, 17), (257, 5)])  # N = 1: tests/losses/test_spectral_contrastive.py
@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0])
def test_spectral_signed_graph_matches_reference_float64(device, graph_factory, kind, n, d, beta):
    torch.manual_seed(n + d)
    z = torch.randn(n, d, dtype=torch.float64, device=device)
    g = with_random_negatives(graph_factory(kind, n, seed=d), seed=n + 1).to(device)
    assert_matches_float64(palfast.spectral_contrastive, reference.spectral_contrastive, z, g, negative_weight=beta)


@pytest.mark.slow
def test_spectral_signed_graph_gradcheck(device, graph_factory):
    torch.manual_seed(3)
    z = torch.randn(11, 4, dtype=torch.float64, device=device, requires_grad=True)
    for kind in KINDS:
        g = with_random_negatives(graph_factory(kind, 11, seed=5), seed=2).to(device)
        assert torch.autograd.gradcheck(lambda x, g=g: palfast.spectral_contrastive(x, g, negative_weight=0.7), (z,))


def test_spectral_negatives_only_and_defaults():
    """No positives: the graph term is the negatives' alone; β = 0 or no negatives is
    bit-identical to the positive-only loss; the module passes β."""
    torch.manual_seed(6)
    z = torch.randn(9, 3, dtype=torch.float64)
    only_neg = PairGraph.from_views(9, 1).with_negatives(PairGraph.from_edges([0, 1], [2, 3], num_nodes=9))
    torch.testing.assert_close(palfast.spectral_contrastive(z, only_neg), reference.spectral_contrastive(z, only_neg))
    g = PairGraph.from_labels(torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2]))
    signed = with_random_negatives(g, seed=4)
    assert torch.equal(palfast.spectral_contrastive(z, signed, negative_weight=0.0), palfast.spectral_contrastive(z, g))
    assert not torch.equal(palfast.spectral_contrastive(z, signed), palfast.spectral_contrastive(z, g))
    torch.testing.assert_close(
        palfast.nn.SpectralContrastiveLoss(negative_weight=3.0)(z, signed),
        reference.spectral_contrastive(z, signed, negative_weight=3.0),
    )
    with pytest.raises(ValueError, match="negative_weight must be a finite number >= 0"):
        palfast.spectral_contrastive(z, signed, negative_weight=-1.0)


@pytest.mark.parametrize("loss", [palfast.vicreg, palfast.barlow_twins])
def test_covariance_losses_ignore_negatives(device, graph_factory, loss):
    torch.manual_seed(8)
    z = torch.randn(41, 6, device=device)
    g = graph_factory("semi", 41, seed=2)
    got = loss(z, with_random_negatives(g, seed=3).to(device))
    assert torch.equal(got, loss(z, g.to(device)))


# ------------------------------------------------------------ RelationStore.graph
def random_store(n_ids: int, n_answers: int, seed: int, id_offset: int = 0):
    rng = random.Random(seed)
    labels = [rng.randrange(4) for _ in range(n_ids)]
    pairs = []
    while len(pairs) < n_answers:
        i, j = rng.randrange(n_ids), rng.randrange(n_ids)
        if i != j:
            pairs.append((i, j))
    store = RelationStore()
    ans = torch.tensor([labels[i] == labels[j] for i, j in pairs])
    store.record(torch.tensor(pairs) + id_offset, ans)
    return store


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n_views", [1, 3])
@pytest.mark.parametrize("id_offset", [0, 2**40])
def test_store_negatives_are_every_known_different_pair(seed, n_views, id_offset):
    """graph(negatives=True).negatives[b, b'] = 1 exactly when store.same says False
    (answered or by transitivity), for every view; the positives are those of
    negatives=False. The batch has repeats and ids never recorded."""
    store = random_store(30, 40, seed, id_offset)
    rng = random.Random(seed)
    batch = [rng.randrange(36) + id_offset for _ in range(20)] + [id_offset + 3] * 2
    g = store.graph(torch.tensor(batch), n_views=n_views, negatives=True)
    same = torch.tensor([[store.same(a, b) is False for b in batch] for a in batch])
    want = same.repeat(n_views, n_views).float()
    assert torch.equal(g.negatives.to_dense(), want)
    assert torch.equal(g.to_dense(), store.graph(torch.tensor(batch), n_views=n_views).to_dense())
    assert want.sum() > 0  # the seeds give some negatives


def test_store_transitive_negatives_by_hand():
    store = RelationStore()
    big = 2**40
    # components {0, 1, 2} and {5, 6}; 2 ≁ 6 makes every member of one differ from the other
    store.record(
        torch.tensor([[0, 1], [1, 2], [5, 6], [2, 6], [7, big]]), torch.tensor([True, True, True, False, False])
    )
    g = store.graph(torch.tensor([0, 5, 9, 1, big, 7]), negatives=True)
    pairs = set(map(tuple, g.negatives.to_dense().nonzero().tolist()))
    assert pairs == {(0, 1), (1, 0), (3, 1), (1, 3), (4, 5), (5, 4)}
    assert store.graph(torch.tensor([0, 5])).negatives is None
    empty = store.graph(torch.tensor([0, 1, 9]), negatives=True).negatives
    assert empty.num_nodes == 3 and empty.total_weight == 0


def test_store_negatives_with_contradictions_follow_the_first_answer():
    store = RelationStore()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ContradictionWarning)
        store.record(
            torch.tensor([[0, 1], [1, 2], [0, 2], [3, 4], [3, 4]]), torch.tensor([True, False, True, False, True])
        )
    g = store.graph(torch.tensor([0, 1, 2, 3, 4]), n_views=2, negatives=True)
    dense = g.negatives.to_dense()[:5, :5]
    assert dense[0, 2] == 1 and dense[1, 2] == 1 and dense[3, 4] == 1 and dense[0, 1] == 0
    assert store.n_conflicts == 2


def test_store_negatives_bad_argument():
    with pytest.raises(TypeError, match="RelationStore.graph: negatives must be True or False"):
        RelationStore().graph(torch.tensor([0, 1]), negatives="yes")


def test_store_graph_trains_info_nce_and_spectral_with_negatives():
    store = random_store(40, 80, seed=1)
    batch = torch.arange(40)
    g = store.graph(batch, n_views=2, negatives=True)
    z = torch.randn(80, 8, dtype=torch.float64, requires_grad=True)
    for loss in (palfast.info_nce(z, g, unknown_weight=0.2), palfast.spectral_contrastive(z, g)):
        loss.backward()
    assert torch.isfinite(z.grad).all()
    torch.testing.assert_close(palfast.info_nce(z, g, unknown_weight=0.2), reference.info_nce(z, g, unknown_weight=0.2))


@pytest.mark.slow
def test_info_nce_unknown_weight_under_compile():
    """fullgraph=True names the limit; without it the call runs eagerly and matches."""
    torch.manual_seed(3)
    z = torch.randn(8, 4)
    g = PairGraph.from_views(4, 2).with_negatives(PairGraph.from_edges([0], [1], num_nodes=8))

    def step(x):
        return palfast.info_nce(x, g, unknown_weight=0.5)

    with pytest.raises(Exception, match="unknown_weight < 1 cannot run under torch.compile"):
        torch.compile(step, fullgraph=True, backend="aot_eager")(z)
    torch.testing.assert_close(torch.compile(step, backend="aot_eager")(z), step(z))
