"""Relation (palfast/active/relation.py): transitive closure, cannot-link propagation,
graphs. No database: the relation is fed the answers directly, as RelationStore feeds it
its log."""

import pytest
import torch

import palfast
from palfast.active.relation import Relation, as_pairs

from _store_helpers import closure_reference, random_answers, relation_of


def add(rel, pairs, answers):
    """Feed ``rel`` the answers ``(pairs [Q, 2], answers [Q])`` in order."""
    rel.extend(zip(*as_pairs(pairs).T.tolist(), torch.as_tensor(answers).tolist()))


# ----------------------------------------------------------------- relation
def test_transitivity():
    s = Relation()
    add(s, torch.tensor([[0, 1], [1, 2], [5, 4]]), torch.tensor([True, True, True]))
    assert s.same(0, 2) is True and s.is_known(2, 0)
    assert s.same(0, 4) is None and not s.is_known(0, 4)
    assert s.same(3, 3) is True
    comp = s.components(torch.tensor([0, 1, 2, 3, 4, 5, 9]))
    assert comp[0] == comp[1] == comp[2] and comp[4] == comp[5] and comp[0] != comp[4]
    assert comp[3] == -1 and comp[6] == -1  # no known positive; id 9 never seen
    assert s.n_queries == 3


def test_cannot_link_propagates_through_components_and_merges():
    s = Relation()
    add(s, torch.tensor([[0, 1], [1, 2]]), torch.tensor([True, False]))  # A~B, B≁C
    assert s.same(0, 2) is False  # ⇒ A≁C
    add(s, torch.tensor([[2, 3]]), torch.tensor([True]))  # C~D
    assert s.same(0, 3) is False and s.same(1, 3) is False
    add(s, torch.tensor([[4, 0], [5, 3]]), torch.tensor([True, True]))  # grow both sides
    assert s.same(4, 5) is False
    assert s.known_mask(torch.tensor([[4, 5], [4, 1], [4, 6]])).tolist() == [True, True, False]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("noise", [0.0, 0.2])
def test_relation_matches_brute_force_closure(seed, noise):
    n = 23
    pairs, ans = random_answers(n, 40, 4, seed, noise)
    s = Relation()
    for chunk in range(0, 40, 7):  # several transactions
        add(s, pairs[chunk : chunk + 7], ans[chunk : chunk + 7])
    expected = closure_reference(n, pairs.tolist(), ans.tolist())
    assert torch.equal(relation_of(s, n), expected)
    all_pairs = torch.cartesian_prod(torch.arange(n), torch.arange(n))
    assert torch.equal(s.known_mask(all_pairs), (expected >= 0).reshape(-1))


def test_graph_is_the_label_graph_of_components():
    pairs, ans = random_answers(30, 60, 3, seed=5)
    s = Relation()
    add(s, pairs, ans)
    idx = torch.tensor([3, 17, 0, 29, 8, 12, 3 + 1, 21, 44])  # 44: never seen
    g = s.graph(idx)
    expected = torch.tensor([[float(s.same(int(a), int(b)) is True) for b in idx] for a in idx])
    expected.fill_diagonal_(0)
    assert torch.equal(g.to_dense(), expected)
    assert g.labels.shape == (1, idx.numel())  # class ids, not Σ n_c² edges
    assert g.indices.numel() == 0


def test_graph_with_views_is_views_plus_labels_repeated():
    s = Relation()
    add(s, torch.tensor([[0, 2], [2, 5]]), torch.tensor([True, True]))
    idx = torch.tensor([0, 1, 2, 5])
    g = s.graph(idx, n_views=3, label_weight=0.7, view_weight=0.3)
    b = idx.numel()
    expected = torch.zeros(3 * b, 3 * b)
    for r in range(3 * b):
        for c in range(3 * b):
            u, w = int(idx[r % b]), int(idx[c % b])
            known_class = u != 1 and w != 1 and s.same(u, w)  # sample 1 has no positive
            expected[r, c] = 0.7 * known_class + 0.3 * (r % b == c % b)
    expected.fill_diagonal_(0)
    assert torch.allclose(g.to_dense(), expected)


def test_graph_trains_info_nce():
    s = Relation()
    add(s, torch.tensor([[0, 1]]), torch.tensor([True]))
    z = torch.randn(8, 5, requires_grad=True)
    loss = palfast.info_nce(z, s.graph(torch.tensor([0, 1, 2, 3]), n_views=2))
    loss.backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize(
    "kw,error,message",
    [
        ({"label_weight": "1"}, TypeError, "Relation.graph: label_weight must be a number"),
        ({"view_weight": "0.5", "n_views": 2}, TypeError, "Relation.graph: view_weight must be a number"),
        ({"label_weight": -1.0}, ValueError, "Relation.graph: label_weight must be a finite"),
        ({"device": "bogus"}, ValueError, "Relation.graph: device must be a torch.device"),
    ],
)
def test_graph_arguments_are_checked(kw, error, message):
    s = Relation()
    add(s, [[0, 1]], [True])
    with pytest.raises(error, match=message):
        s.graph(torch.tensor([0, 1]), **kw)
