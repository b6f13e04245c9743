"""ActiveLearner: any loss, any strategy, the stopping rule, per-round hooks, one
contradiction warning per run, the graph built in one place, argument checks."""

import copy
import functools
import warnings

import pytest
import torch

import palfast
from palfast.active import ActiveLearner, ContradictionWarning, LabelOracle, RelationStore, select_queries


def toy(n=40, n_classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % n_classes
    return torch.randn(n_classes, 8, generator=g)[y] + 0.3 * torch.randn(n, 8, generator=g), y


def learner(data, y, store=None, **kw):
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    kw = {
        "epochs_per_round": 1,
        "batch_size": 16,
        "progress": False,
        "augment": lambda x, g: x + 0.1 * torch.randn(x.shape, generator=g),
        **kw,
    }
    return ActiveLearner(enc, data, LabelOracle(y), store, **kw)


@pytest.mark.slow
def test_any_loss_callable_is_trained():
    data, y = toy()
    seen = []

    def loss(z, graph):
        seen.append((tuple(z.shape), graph.num_nodes))
        return palfast.vic2(z, graph, n_views=2, pool_size=40)

    history = learner(data, y, loss=loss).run(budget=8, queries_per_round=4)
    assert seen and all(shape == (nodes, 8) for shape, nodes in seen)
    assert all(shape[0] % 2 == 0 for shape, _ in seen)  # two views of each batch row
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)


@pytest.mark.slow
def test_strategy_callable_matches_the_named_strategy():
    data, y = toy()
    answers = {}
    for name, strategy in (("named", "nearest"), ("callable", functools.partial(select_queries, strategy="nearest"))):
        store = RelationStore()
        learner(data, y, store, strategy=strategy).run(budget=12, queries_per_round=6)
        answers[name] = store.answers()[0]
    assert answers["named"].shape == (12, 2) and torch.equal(answers["named"], answers["callable"])


@pytest.mark.slow
def test_strategy_callable_must_respect_the_budget():
    data, y = toy()
    too_many = lambda emb, store, budget, **kw: torch.tensor([[0, 1], [0, 2], [0, 3]])
    with pytest.raises(ValueError, match="returned 3 pairs for a budget of 2"):
        learner(data, y, strategy=too_many).run(budget=2, queries_per_round=2)
    bad = lambda emb, store, budget, **kw: torch.tensor([0, 1])
    with pytest.raises(ValueError, match="the pairs that strategy '<lambda>' returned must be"):
        learner(data, y, strategy=bad).run(budget=2, queries_per_round=2)


@pytest.mark.parametrize("strategy", ["pal", "random", "passive"])
@pytest.mark.slow
def test_stopping_rule_is_visible(strategy):
    data, y = toy(6, 2)
    history = learner(data, y, strategy=strategy).run(budget=100, queries_per_round=4)
    assert history[-1]["stop"] == "exhausted" and all(h["stop"] is None for h in history[:-1])
    # Exhausted: nothing left to ask (every pair known; for "passive", every pair asked).
    assert history[-1]["n_queries"] <= 15  # C(6, 2) pairs
    history = learner(data, y, strategy=strategy).run(budget=4, queries_per_round=4)
    assert history[-1]["stop"] == "budget" and history[-1]["n_queries"] == 4


@pytest.mark.slow
def test_on_round_hook_sees_each_round_and_adds_entries():
    data, y = toy()
    calls = []

    def hook(lrn, record):
        calls.append((lrn, dict(record)))
        return {"custom": record["n_queries"] * 2}

    lrn = learner(data, y)
    history = lrn.run(budget=10, queries_per_round=5, on_round=hook)
    assert [c[1]["n_queries"] for c in calls] == [0, 5, 10] and all(c[0] is lrn for c in calls)
    assert [h["custom"] for h in history] == [0, 10, 20]
    assert {"round", "n_queries", "n_positive", "n_conflicts", "loss", "n_seeds", "stop"} <= set(history[0])


@pytest.mark.slow
def test_noisy_oracle_warns_once_per_run_and_counts_in_the_log():
    data, y = toy()
    lrn = learner(data, y, strategy="random")
    lrn.oracle = LabelOracle(y, noise=0.4, seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = lrn.run(budget=60, queries_per_round=10)
    contradictions = [w for w in caught if issubclass(w.category, ContradictionWarning)]
    conflicts = [h["n_conflicts"] for h in history]
    assert conflicts[-1] > 0 and conflicts == sorted(conflicts)
    assert len(contradictions) == 1 and f"{conflicts[-1]} of this run" in str(contradictions[0].message)


def test_graph_is_built_in_one_place_with_the_learner_options(monkeypatch):
    data, y = toy()
    store = RelationStore()
    lrn = learner(data, y, store, label_weight=0.5, view_weight=2.0)
    calls = []
    real = store.graph
    monkeypatch.setattr(store, "graph", lambda idx, **kw: calls.append(kw) or real(idx, **kw))
    lrn.graph_options["label_weight"] = 0.25
    lrn.train(1)
    assert calls and all(
        kw == {"n_views": 2, "label_weight": 0.25, "view_weight": 2.0, "negatives": False, "device": lrn.device}
        for kw in calls
    )


@pytest.mark.slow
def test_unknown_weight_trains_on_the_known_negatives():
    """unknown_weight < 1 turns on negatives=True, and the batches' graphs carry the
    "different" answers to palfast.info_nce."""
    data, y = toy(16, 2)
    store = RelationStore()
    store.record(torch.tensor([[0, 2], [0, 1]]), torch.tensor([True, False]))
    lrn = learner(data, y, store, unknown_weight=0.5)
    assert lrn.graph_options["negatives"] is True
    assert learner(data, y, store).graph_options["negatives"] is False
    g = lrn.batch_graph(torch.tensor([0, 1, 2, 3]))
    neg = g.negatives.to_dense()
    # 0≁1 answered and 2≁1 implied (2~0), every view of one with every view of the other.
    for a, b in [(0, 1), (2, 1)]:
        for v in range(2):
            for w in range(2):
                assert neg[a + 4 * v, b + 4 * w] > 0
    assert neg[0, 2] == 0 and neg[:, 3].sum() == 0
    z = torch.randn(8, 8, dtype=torch.float64)
    torch.testing.assert_close(lrn.loss(z, g), palfast.info_nce(z, g, temperature=0.1, unknown_weight=0.5))
    lrn.train(1)


def test_transitive_false_trains_on_the_answered_pairs_only():
    data, y = toy(8, 2)
    store = RelationStore()
    store.record(torch.tensor([[0, 2], [2, 4]]), torch.tensor([True, True]))  # 0~4 implied
    idx = torch.tensor([0, 2, 4, 1])
    closed = learner(data, y, store).batch_graph(idx).to_dense()
    lrn = learner(data, y, store, strategy="passive")
    assert lrn.transitive is False
    lrn.train(0)  # reads the answers
    direct = lrn.batch_graph(idx).to_dense()
    # Rows: view v of batch row r is r + 4v. 0~2 and 2~4 answered, 0~4 only implied.
    for v in range(2):
        for w in range(2):
            assert direct[0 + 4 * v, 1 + 4 * w] == 1 and direct[1 + 4 * v, 2 + 4 * w] == 1
            assert direct[0 + 4 * v, 2 + 4 * w] == 0 and closed[0 + 4 * v, 2 + 4 * w] == 1
    assert direct[3, 7] == 1 and direct[3, :3].sum() == 0  # row 3 (sample 1): its view only


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"encoder": "mlp"}, TypeError, "encoder must be a torch.nn.Module, got str"),
        ({"data": torch.zeros(1, 8)}, ValueError, "data must be a tensor \\[N, ...\\] with N >= 2"),
        ({"oracle": lambda p: p}, TypeError, "oracle must be a palfast.active.Oracle"),
        ({"store": "answers.sqlite"}, TypeError, "store must be a palfast.active.RelationStore"),
        ({"strategy": "greedy"}, ValueError, "strategy must be one of"),
        ({"loss": 3}, TypeError, "loss must be a callable loss\\(z, graph\\) -> scalar, got int"),
        ({"n_views": 0}, ValueError, "n_views must satisfy 1 <= n_views, got 0"),
        ({"batch_size": 2.0}, TypeError, "batch_size must be an int"),
        ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
        ({"order": "nearest"}, ValueError, "order must be one of"),
        ({"transitive": "no"}, TypeError, "transitive must be True or False"),
        ({"negatives": "yes"}, TypeError, "negatives must be True or False"),
        ({"unknown_weight": 1.5}, ValueError, "unknown_weight must be a finite number >= 0"),
        ({"unknown_weight": 0.5, "loss": palfast.info_nce}, ValueError, "unknown_weight sets the default loss"),
        ({"progress": 1}, TypeError, "progress must be True or False"),
    ],
)
def test_bad_arguments_name_the_learner_and_the_argument(kwargs, exc, match):
    data, y = toy()
    args = {"encoder": torch.nn.Linear(8, 4), "data": data, "oracle": LabelOracle(y), **kwargs}
    with pytest.raises(exc, match="palfast.active.ActiveLearner: " + match):
        ActiveLearner(args.pop("encoder"), args.pop("data"), args.pop("oracle"), **args)


def test_run_bad_arguments():
    data, y = toy()
    lrn = learner(data, y)
    with pytest.raises(ValueError, match="ActiveLearner.run: budget must satisfy 0 <= budget"):
        lrn.run(-1)
    with pytest.raises(TypeError, match="ActiveLearner.run: queries_per_round must be an int"):
        lrn.run(5, queries_per_round=2.5)
    with pytest.raises(TypeError, match="ActiveLearner.run: on_round must be a callable"):
        lrn.run(5, on_round="print")


def test_pal_learner_resumed_from_the_store_continues_its_exploration(store_path):
    """ "pal"'s exploration state is saved with each round's answers: a new learner on the
    reopened store starts from the state the stopped one had, and ends where a run that
    was never stopped ends (no training, so that the selections depend on the store, the
    state and the seed only)."""
    data, y = toy()
    kw = {"strategy": "pal", "epochs_per_round": 0, "explore": 0.3}
    straight = learner(data, y, RelationStore(), **kw)
    seen = []  # the state at the start of each round, by answers so far
    straight.run(
        budget=30, queries_per_round=6, on_round=lambda lrn, rec: seen.append(copy.deepcopy(lrn.strategy_state))
    )

    with RelationStore(store_path) as store:
        first = learner(data, y, store, **kw)
        first.run(budget=12, queries_per_round=6)
        stopped = copy.deepcopy(first.strategy_state)
    assert stopped == seen[2] and stopped["n_seeds"] > 0 and stopped["pending"]
    with RelationStore(store_path) as store:
        resumed = learner(data, y, store, **kw)
        assert resumed.strategy_state == stopped
        pending = resumed.strategy_state["pending"]
        assert all(type(p) is list and type(p[0]) is int and type(p[2]) is bool for p in pending)
        history = resumed.run(budget=30, queries_per_round=6)
        assert resumed.strategy_state == straight.strategy_state
        assert torch.equal(store.answers()[0], straight.store.answers()[0])
        assert history[-1]["n_seeds"] == straight.strategy_state["n_seeds"]
