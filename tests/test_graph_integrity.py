"""A PairGraph cannot reach a loss in a state it was not validated in (docs/api.md,
"PairGraph", "What is checked"): derived fields are computed at construction, and
every loss compares the graph's tensors with the copy taken when it was built, in
eager mode, under torch.compile and under torch.inference_mode."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import shutil

import pytest
import torch

import palfast
from palfast import PairGraph, reference
from palfast.active import RelationStore
from palfast.testing import LOSSES

CHANGED = r"graph must not be changed after it is built, got changes to graph\."


def _graph():
    """Directed edges (two CSR sides) plus a label set, over 8 rows."""
    e = PairGraph.from_edges([0, 1, 2, 5], [1, 2, 0, 6], [1.0, 2.0, 0.5, 1.0], num_nodes=8, symmetric=False)
    return e + PairGraph.from_labels(torch.arange(8) % 3)


def _neg_graph():
    return PairGraph.from_views(4, 2).with_negatives(PairGraph.from_edges([0, 1], [2, 3], num_nodes=8))


# ---------------------------------------------------------------------- inference mode
def _every_kind_of_graph():
    g = _graph()
    return [
        PairGraph.from_views(4, 2),
        PairGraph.from_labels(torch.tensor([0, 0, 1, -1] * 2)),
        g,
        0.5 * g,
        g.to("cpu"),
        _neg_graph(),
        PairGraph.from_dense(g.to_dense()),
    ]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.slow
def test_graphs_build_and_losses_run_under_inference_mode(loss):
    z = torch.randn(8, 5, dtype=torch.float64)
    want = [LOSSES[loss](z, g) for g in _every_kind_of_graph()]
    with torch.inference_mode():
        got = [LOSSES[loss](z, g) for g in _every_kind_of_graph()]
        # a graph built under inference mode is refused when changed, like any other
        g = _graph()
        g.weights.mul_(2)
        with pytest.raises(ValueError, match=CHANGED + "weights"):
            LOSSES[loss](z, g)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_inference_mode_graph_is_usable_for_training_outside_it():
    with torch.inference_mode():
        g = _graph()
    z = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    palfast.info_nce(z, g).backward()
    assert torch.isfinite(z.grad).all()


def test_relation_store_graph_under_inference_mode(tmp_path):
    for store in (RelationStore(), RelationStore(tmp_path / "answers.db")):
        store.record(torch.tensor([[0, 1], [1, 2], [2, 3]]), torch.tensor([True, True, False]))
        ids = torch.tensor([0, 2, 3, 4])
        want = store.graph(ids, n_views=2, negatives=True)
        with torch.inference_mode():
            g = store.graph(ids, n_views=2, negatives=True)
            loss = palfast.info_nce(torch.randn(8, 3), g, unknown_weight=0.5)
        assert torch.equal(g.to_dense(), want.to_dense())
        assert torch.equal(g.negatives.to_dense(), want.negatives.to_dense())
        assert torch.isfinite(loss)
        store.close()


# ------------------------------------------------------ derived fields cannot go stale
def test_replace_rederives_instead_of_trusting_derived_fields():
    g = PairGraph.from_edges([0, 1], [4, 5], num_nodes=8)
    z = torch.randn(8, 5, dtype=torch.float64)
    h = dataclasses.replace(g, weights=2 * g.weights)
    for loss in LOSSES.values():
        torch.testing.assert_close(loss(z, h), loss(z, 2 * g), rtol=0, atol=0)
    assert h.total_weight == 8 and h.num_anchors == 4
    torch.testing.assert_close(h.degree(), (2 * g).degree())
    for field in ("t_weights", "num_anchors", "pos_weight", "total_weight", "symmetric"):
        with pytest.raises(ValueError, match=f"field {field} is declared with init=False"):
            dataclasses.replace(g, **{field: getattr(g, field)})


def test_replaced_directed_graph_gets_its_transpose():
    g = _graph()
    h = dataclasses.replace(g, weights=torch.tensor([3.0, 1.0, 2.0, 4.0]))
    rows = torch.repeat_interleave(torch.arange(8), h.t_indptr.diff())
    Wt = torch.zeros(8, 8)
    Wt[rows, h.t_indices] = h.t_weights
    lab = PairGraph.from_labels(torch.arange(8) % 3).to_dense()
    torch.testing.assert_close(Wt, (h.to_dense() - lab).T)
    z = torch.randn(8, 5, dtype=torch.float64)
    want = reference.info_nce(z, h)
    torch.testing.assert_close(palfast.info_nce(z, h), want)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda g: dict(indices=g.indices + 100), r"PairGraph: indices must be in \[0, num_nodes = 8\)"),
        (lambda g: dict(indices=g.indices.flip(0)), "PairGraph: indices must be increasing within each row"),
        (lambda g: dict(weights=-g.weights), "PairGraph: weights must be >= 0"),
        (lambda g: dict(weights=g.weights.double()), "PairGraph: weights must be float32"),
        (lambda g: dict(weights=g.weights[:2]), r"PairGraph: weights must have shape \(4,\)"),
        (lambda g: dict(indptr=g.indptr.flip(0)), "PairGraph: indptr must start at 0"),
        (
            lambda g: dict(label_classes=(2,)),
            r"PairGraph: labels\[0\] must hold class ids in "
            r"\[-1, label_classes\[0\] = 2\)",
        ),
        (lambda g: dict(label_weights=(1.0, 2.0)), "PairGraph: label_weights must have one weight"),
        (lambda g: dict(label_weights=(-1.0,)), r"PairGraph: label_weights\[0\] must be a finite"),
        (lambda g: dict(labels=g.labels[:, :4]), r"PairGraph: labels must have shape \[L, 8\]"),
        (lambda g: dict(num_nodes=7), r"PairGraph: indptr must have shape \[num_nodes \+ 1\]"),
        (lambda g: dict(weights=g.weights.clone().requires_grad_()), "PairGraph: weights must not require grad"),
        (
            lambda g: dict(negatives=PairGraph.from_edges([0], [3], num_nodes=8)),
            "negatives must not contain a positive pair",
        ),
    ],
)
def test_replace_with_bad_fields_is_refused_at_once(change, match):
    g = _graph()
    with pytest.raises((ValueError, TypeError), match=match):
        dataclasses.replace(g, **change(g))


def _through_data(g):
    g.weights.data.mul_(2)


def _through_numpy(g):
    g.weights.numpy()[0] = 7.0


def _setattr_tensor(g):
    object.__setattr__(g, "weights", 2 * g.weights)


def _setattr_pos_weight(g):
    object.__setattr__(g, "pos_weight", 2 * g.pos_weight)


@pytest.mark.parametrize(
    "change,field",
    [
        (_through_data, "weights"),
        (_through_numpy, "weights"),
        (_setattr_tensor, "weights"),
        (_setattr_pos_weight, "pos_weight"),
        (lambda g: g.t_indices.data.fill_(0), "t_indices"),
        (lambda g: g.labels.numpy().__setitem__((0, 0), 1), "labels"),
    ],
)
@pytest.mark.parametrize("loss", LOSSES)
def test_changes_that_bypass_version_counters_are_refused(change, field, loss):
    g = _graph()
    change(g)
    with pytest.raises(ValueError, match=rf"palfast.{loss}: {CHANGED}{field}"):
        LOSSES[loss](torch.randn(8, 4), g)


@pytest.mark.parametrize(
    "name,value",
    [("num_anchors", 0), ("total_weight", 1.0), ("label_weights", (3.0,)), ("symmetric", True), ("num_nodes", 8)],
)
def test_scalar_fields_set_behind_the_graphs_back_are_refused(name, value):
    g = _graph()
    object.__setattr__(g, name, value if name != "num_nodes" else g.num_nodes)
    z = torch.randn(8, 4)
    if name == "num_nodes":  # unchanged value: still the graph it was built as
        palfast.info_nce(z, g)
        return
    with pytest.raises(
        ValueError,
        match=rf"palfast.info_nce: graph must not be changed after "
        rf"it is built, got changes to graph.{name}",
    ):
        palfast.info_nce(z, g)


def test_negatives_changed_behind_the_graphs_back_are_refused():
    g = _neg_graph()
    g.negatives.indices.data[0] = 2**40
    with pytest.raises(
        ValueError,
        match=r"palfast.info_nce: graph.negatives must not be changed "
        r"after it is built, got changes to "
        r"graph.negatives.indices",
    ):
        palfast.info_nce(torch.randn(8, 4), g, unknown_weight=0.5)
    g = _neg_graph()
    object.__setattr__(g, "negatives", PairGraph.from_edges([0], [4], num_nodes=8))
    with pytest.raises(ValueError, match="got changes to graph.negatives"):
        palfast.spectral_contrastive(torch.randn(8, 4), g)


def test_copies_and_pickles_are_not_taken_for_changed_graphs():
    g = _graph()
    g.indices.add_(0)  # an in-place op that changes nothing
    z = torch.randn(8, 4)
    want = palfast.info_nce(z, g)
    for h in (
        copy.deepcopy(g),
        copy.copy(g),
        pickle.loads(pickle.dumps(g)),
        g.to("cpu"),
        pickle.loads(pickle.dumps(_neg_graph())),
    ):
        palfast.info_nce(z, h)
    torch.testing.assert_close(palfast.info_nce(z, pickle.loads(pickle.dumps(g))), want)


# ------------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize(
    "change", [lambda g: g.pos_weight.mul_(2), _through_data, _through_numpy, lambda g: g.labels.fill_(0)]
)
@pytest.mark.slow
def test_compiled_losses_refuse_a_changed_graph(change):
    torch._dynamo.reset()
    g = _graph()
    z = torch.randn(8, 4)
    f = torch.compile(lambda z, g: palfast.info_nce(z, g), fullgraph=True, backend="aot_eager")
    f(z, g)
    change(g)
    with pytest.raises(ValueError, match=r"palfast.info_nce: " + CHANGED):
        f(z, g)


# Inductor compiles the graph it generates with the host C++ compiler; CI's wheel job
# runs the tests where no compiler exists (.ci/run, job 3).
@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
    reason="torch.compile's inductor backend needs a C++ compiler",
)
@pytest.mark.slow
def test_compiled_losses_refuse_a_changed_graph_with_inductor():
    torch._dynamo.reset()
    g = _graph()
    z = torch.randn(8, 4)
    f = torch.compile(lambda z, g: palfast.vicreg(z, g), fullgraph=True)
    want = palfast.vicreg(z, g)
    torch.testing.assert_close(f(z, g), want)
    g.pos_weight.mul_(2)
    with pytest.raises(ValueError, match=r"palfast.vicreg: " + CHANGED + "pos_weight"):
        f(z, g)
