"""select_queries: never a known (or implied) pair, no duplicates, budget respected,
deterministic, and each strategy does what its name says."""

import pytest
import torch

from palfast.active import STRATEGIES, CandidateGraph, LabelOracle, RelationStore, select_queries
from palfast.active import strategies as strategies_mod
from palfast.active.strategies import STABLE_SEEDS

from _store_helpers import count_knn_searches

#: The strategies bound by the shared rules (never a known or implied pair, ...):
#: all but "passive", which asks implied pairs on purpose (the paper's baseline).
INFORMED = tuple(s for s in STRATEGIES if s != "passive")


def clustered(n, n_classes, d=8, spread=0.15, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % n_classes
    centers = torch.randn(n_classes, d, generator=g)
    return centers[y] + spread * torch.randn(n, d, generator=g), y


def check_selection(q, store, budget, n=None, ids=None):
    assert q.dtype == torch.long and q.dim() == 2 and q.shape[1] == 2
    assert q.shape[0] <= budget
    assert bool((q[:, 0] < q[:, 1]).all())
    assert not bool(store.known_mask(q).any())  # nothing known or implied
    assert len({tuple(p) for p in q.tolist()}) == q.shape[0]  # no duplicates
    roots = store.roots(q.reshape(-1)).reshape(-1, 2)
    comp_pairs = {tuple(sorted(r)) for r in roots.tolist()}
    assert len(comp_pairs) == q.shape[0]  # no two join the same components
    if ids is not None:
        assert bool(torch.isin(q, ids).all())
    elif n is not None and q.numel():
        assert int(q.max()) < n


@pytest.fixture(params=["exact", "graph"])
def pal_links(request, monkeypatch):
    """Run a test with "pal"'s exact similarities and again with its k-NN-graph ones
    (what pools above PAL_EXACT_WORK get), by moving the switch."""
    if request.param == "graph":
        monkeypatch.setattr(strategies_mod, "PAL_EXACT_WORK", 0)
    return request.param


def n_unknown_component_pairs(store, ids):
    """Brute force: how many pairs of components among ``ids`` are still unknown."""
    roots = store.roots(ids)
    reps = {}
    for i, r in zip(ids.tolist(), roots.tolist()):
        reps.setdefault(r, i)
    reps = torch.tensor(list(reps.values()))
    if reps.numel() < 2:
        return 0
    return int((~store.known_mask(torch.combinations(reps, 2))).sum())


@pytest.mark.parametrize("strategy", INFORMED)
@pytest.mark.parametrize("noise", [0.0, 0.1])
@pytest.mark.slow
def test_rounds_never_reask(strategy, noise, pal_links):
    x, y = clustered(90, 5)
    store, oracle = RelationStore(), LabelOracle(y, noise=noise, seed=1)
    for r in range(6):
        q = select_queries(x, store, 25, strategy, k=5, seed=r)
        check_selection(q, store, 25, n=90)
        # The full budget, unless fewer unknown component pairs are left.
        assert q.shape[0] == min(25, n_unknown_component_pairs(store, torch.arange(90)))
        store.record(q, oracle.ask(q))
    assert store.n_queries <= 150


@pytest.mark.parametrize("strategy", INFORMED)
def test_small_pool_exhausts_cleanly(strategy):
    x, y = clustered(7, 3, seed=2)
    store, oracle = RelationStore(), LabelOracle(y)
    total = 0
    for r in range(30):
        q = select_queries(x, store, 4, strategy, k=2, seed=r)
        check_selection(q, store, 4, n=7)
        if q.shape[0] == 0:
            break
        store.record(q, oracle.ask(q))
        total += q.shape[0]
    # Everything is known at the end: the partition of 7 samples in 3 classes.
    all_pairs = torch.combinations(torch.arange(7), 2)
    assert bool(store.known_mask(all_pairs).all()), strategy
    assert total <= 21


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_deterministic_and_budget_zero(strategy):
    x, _ = clustered(50, 4)
    store = RelationStore()
    store.record(torch.tensor([[0, 4], [1, 2]]), torch.tensor([True, False]))
    a = select_queries(x, store, 12, strategy, seed=3)
    b = select_queries(x, store, 12, strategy, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert select_queries(x, store, 0, strategy).shape == (0, 2)


@pytest.mark.parametrize("strategy", INFORMED)
def test_ids_select_inside_the_pool(strategy):
    x, y = clustered(40, 4)
    ids = torch.randperm(500, generator=torch.Generator().manual_seed(0))[:40]
    store = RelationStore()
    oracle_labels = torch.full((500,), -1)
    oracle_labels[ids] = y
    oracle = LabelOracle(oracle_labels)
    for r in range(3):
        q = select_queries(x, store, 10, strategy, ids=ids, seed=r)
        check_selection(q, store, 10, ids=ids)
        store.record(q, oracle.ask(q))


def test_nearest_takes_the_most_similar_unknown_pairs():
    x, _ = clustered(60, 3, seed=4)
    store = RelationStore()
    q = select_queries(x, store, 10, "nearest", k=4)
    xn = torch.nn.functional.normalize(x, dim=1)
    s = xn @ xn.T
    s.fill_diagonal_(-2)
    best = s.triu(1).flatten().topk(10).values
    got = torch.stack([s[i, j] for i, j in q.tolist()]).sort(descending=True).values
    assert torch.allclose(got, best)


def test_uncertain_targets_the_threshold_region():
    x, y = clustered(80, 4, spread=0.6, seed=5)
    store, oracle = RelationStore(), LabelOracle(y)
    q = select_queries(x, store, 30, "random", seed=0)
    store.record(q, oracle.ask(q))
    unc = select_queries(x, store, 20, "uncertain", k=5)
    near = select_queries(x, store, 20, "nearest", k=5)
    xn = torch.nn.functional.normalize(x, dim=1)
    sim = lambda p: (xn[p[:, 0]] * xn[p[:, 1]]).sum(1)
    # The boundary lies below the nearest pairs' similarities: uncertain asks less similar ones.
    assert float(sim(unc).mean()) < float(sim(near).mean())


@pytest.mark.slow
def test_pal_finds_more_positives_than_random(pal_links):
    x, y = clustered(200, 8, spread=0.3, seed=6)
    rates = {}
    for strategy in ("pal", "random"):
        store, oracle = RelationStore(), LabelOracle(y)
        for r in range(5):
            q = select_queries(x, store, 20, strategy, k=5, seed=r)
            store.record(q, oracle.ask(q))
        _, answers = store.answers()
        rates[strategy] = float(answers.float().mean())
        if strategy == "pal":
            comp = store.components(torch.arange(200))
            sizes = torch.bincount(comp[comp >= 0])
            biggest = int(sizes.max())
    assert rates["pal"] > 0.8
    assert rates["random"] < 0.3
    assert biggest >= 10  # classes grow through transitivity, not just pairs


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"strategy": "greedy"}, ValueError, "strategy must be one of"),
        ({"budget": -1}, ValueError, "budget must satisfy 0 <= budget, got -1"),
        ({"budget": 2.5}, TypeError, "budget must be an int, got 2.5"),
        ({"store": {}}, TypeError, "store must be a palfast.active.RelationStore"),
        ({"k": 0}, ValueError, "k must satisfy 1 <= k, got 0"),
        ({"explore": 1.5}, ValueError, "explore must be a finite number >= 0 and <= 1, got 1.5"),
        ({"order": "nearest"}, ValueError, "order must be one of"),
        ({"mix": "uncertain"}, ValueError, "mix must be one of"),
        ({"state": []}, TypeError, "state must be a dict"),
        ({"generator": 3}, TypeError, "generator must be a torch.Generator"),
        ({"embeddings": torch.randn(1, 3)}, ValueError, "at least 2 rows"),
        ({"embeddings": torch.full((5, 3), float("nan"))}, ValueError, "embeddings must be finite"),
        ({"backend": "hnsw"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_input(kwargs, exc, match):
    args = {"embeddings": torch.randn(10, 3), "store": RelationStore(), "budget": 3, **kwargs}
    with pytest.raises(exc, match=match):
        select_queries(args.pop("embeddings"), args.pop("store"), args.pop("budget"), **args)


def test_passive_asks_implied_pairs_but_never_repeats_one():
    x, y = clustered(12, 2, seed=7)
    store, oracle = RelationStore(), LabelOracle(y)
    implied = 0
    for r in range(12):
        q = select_queries(x, store, 6, "passive", seed=r)
        assert q.shape[0] == min(6, 66 - store.n_queries)  # 66 = C(12, 2) pairs in all
        asked = {tuple(p) for p in store.answers()[0].tolist()}
        drawn = [tuple(p) for p in q.tolist()]
        assert not asked & set(drawn) and len(set(drawn)) == len(drawn)
        assert bool((q[:, 0] < q[:, 1]).all())
        implied += int(store.known_mask(q).sum())
        store.record(q, oracle.ask(q))
    assert store.n_queries == 66 and implied > 0  # every pair once, some of them implied
    assert select_queries(x, store, 6, "passive").shape == (0, 2)


def known_classes_with_free_rows(n_classes=4, per_class=10, known=8, seed=8):
    """clustered data whose first ``known`` samples of each class form a known class."""
    x, y = clustered(n_classes * per_class, n_classes, spread=0.1, seed=seed)
    store = RelationStore()
    for c in range(n_classes):
        members = (y == c).nonzero().flatten()[:known]
        store.record(torch.stack([members[:-1], members[1:]], 1), torch.ones(known - 1, dtype=torch.bool))
    return x, y, store


@pytest.mark.slow
def test_pal_exploration_credit_adds_up_across_calls():
    """explore = 0.1 with one question per call: one seed every ten calls (rounding up
    per call would make every question a seed)."""
    x, y, store = known_classes_with_free_rows(per_class=30)
    oracle, state = LabelOracle(y), {}
    for r in range(20):
        q = select_queries(x, store, 1, "pal", explore=0.1, seed=r, state=state)
        store.record(q, oracle.ask(q))
    assert state["n_seeds"] == 2
    assert state["explore_credit"] == pytest.approx(0.0, abs=1e-6)


def test_pal_stops_exploring_once_the_classes_are_stable():
    x, y, store = known_classes_with_free_rows()
    oracle, state = LabelOracle(y), {}
    q = select_queries(x, store, STABLE_SEEDS, "pal", explore=1.0, state=state)
    assert state["n_seeds"] == STABLE_SEEDS and state["exploring"]
    # Each seed's nearest neighbour is a member of its known class: no new class found.
    assert all(not free for _, _, free in state["pending"])
    store.record(q, oracle.ask(q))
    select_queries(x, store, 4, "pal", explore=1.0, state=state)
    assert state["exploring"] is False and state["misses"] == STABLE_SEEDS
    assert state["n_seeds"] == STABLE_SEEDS  # no new seed once stable


@pytest.mark.slow
def test_pal_gain_order_asks_the_merge_first_and_likely_rows_next():
    x, y = clustered(80, 4, spread=0.4, seed=9)
    store, oracle = RelationStore(), LabelOracle(y)
    zero = (y == 0).nonzero().flatten()
    halves = (zero[:5], zero[5:10])  # one class known as two components
    for h in halves:
        store.record(torch.stack([h[:-1], h[1:]], 1), torch.ones(4, dtype=torch.bool))
    q = select_queries(x, store, 2, "pal", order="gain", explore=0.0)
    joins = [bool(torch.isin(p, halves[0]).any() and torch.isin(p, halves[1]).any()) for p in q]
    assert any(joins)
    # Rows: the gain order asks likelier (more similar) rows than the random order, on
    # overlapping classes (separable ones make P(alike) flat: every order ties).
    sims = {"gain": 0.0, "random": 0.0}
    for data_seed in (9, 10, 11):
        x, y = clustered(80, 4, spread=1.2, seed=data_seed)
        oracle = LabelOracle(y)
        xn = torch.nn.functional.normalize(x, dim=1)
        for order in sims:
            s = RelationStore()
            for c in range(4):
                m = (y == c).nonzero().flatten()[:3]
                s.record(torch.stack([m[:-1], m[1:]], 1), torch.ones(2, dtype=torch.bool))
            known = select_queries(x, s, 30, "random", seed=0)  # answers of both kinds
            s.record(known, oracle.ask(known))
            start = s.n_queries
            for r in range(3):
                q = select_queries(x, s, 8, "pal", order=order, explore=0.0, seed=r)
                s.record(q, oracle.ask(q))
            pairs = s.answers()[0][start:]
            sims[order] += float((xn[pairs[:, 0]] * xn[pairs[:, 1]]).sum(1).mean()) / 3
    assert sims["gain"] > sims["random"] + 0.02


@pytest.mark.parametrize("strategy", INFORMED)
def test_index_arguments_reach_the_search(strategy):
    pytest.importorskip("faiss")
    x, _ = clustered(600, 12)
    store = RelationStore()
    q = select_queries(x, store, 20, strategy, k=5, index="ivf", nlist=8, nprobe=8)
    check_selection(q, store, 20, n=600)
    # nprobe = nlist scans every list: the IVF search is exact, so are the queries
    assert torch.equal(q, select_queries(x, store, 20, strategy, k=5, index="exact"))
    with pytest.raises(ValueError, match="nprobe must be <= nlist = 8"):
        select_queries(x, store, 20, strategy, index="ivf", nlist=8, nprobe=9)
    with pytest.raises(ValueError, match="index must be one of"):
        select_queries(x, store, 20, strategy, index="flat")


# ---- a CandidateGraph reused across calls (docs/active.md, "Query strategies")


@pytest.fixture
def knn_calls(monkeypatch):
    """The k of each search select_queries runs (the real palfast.knn.knn, counted)."""
    return count_knn_searches(monkeypatch)


@pytest.mark.parametrize("strategy", INFORMED)
@pytest.mark.slow
def test_a_graph_passed_to_every_round_is_searched_once_and_changes_nothing(strategy, knn_calls, pal_links):
    x, y = clustered(120, 6)
    oracle = LabelOracle(y, noise=0.1, seed=1)
    stores = {"per call": RelationStore(), "reused": RelationStore()}
    graph = CandidateGraph(x, k=5)
    for r in range(5):
        per_call = select_queries(x, stores["per call"], 20, strategy, k=5, seed=r)
        searches = len(knn_calls)
        reused = select_queries(x, stores["reused"], 20, strategy, k=5, seed=r, graph=graph)
        assert torch.equal(reused, per_call)  # the same graph: the same questions
        check_selection(reused, stores["reused"], 20, n=120)
        answers = oracle.ask(reused)
        for store in stores.values():
            store.record(reused, answers)
        reused_searches = knn_calls[searches:]
        del knn_calls[searches:]
        if r:
            assert reused_searches == []  # never searched again once searched
    graph_k = 0 if graph.nbrs is None else graph.nbrs.shape[1]
    assert (graph_k == 0) == (strategy == "random" or strategy == "pal" and pal_links == "exact")


def test_candidate_graph_prepare_searches_what_the_first_call_needs(knn_calls):
    x, _ = clustered(60, 3)
    for strategy, k in (("nearest", 5), ("uncertain", 3 * 5), ("pal", 5)):
        graph = CandidateGraph(x, k=5).prepare(strategy)
        assert knn_calls == [k]
        select_queries(x, RelationStore(), 10, strategy, k=5, graph=graph)
        assert knn_calls == [k]  # nothing more searched
        knn_calls.clear()
    CandidateGraph(x).prepare("random")
    assert knn_calls == []


def test_candidate_graph_refuses_other_embeddings_and_index_arguments():
    x, _ = clustered(30, 3)
    graph = CandidateGraph(x, k=4)
    store = RelationStore()
    for other in (x.clone(), x[:20], x.double()):  # equal values are not enough: same array
        with pytest.raises(
            ValueError,
            match=r"select_queries: graph must be built on these "
            r"embeddings .* build CandidateGraph\(embeddings\)",
        ):
            select_queries(other, store, 3, "nearest", graph=graph)
    with pytest.raises(
        ValueError, match="select_queries: index, nprobe must be left at the default when graph is given"
    ):
        select_queries(x, store, 3, "nearest", graph=graph, index="exact", nprobe=2)
    with pytest.raises(TypeError, match="graph must be a palfast.active.CandidateGraph or None"):
        select_queries(x, store, 3, "nearest", graph=x)
    with pytest.raises(ValueError, match="palfast.active.CandidateGraph: embeddings must be finite"):
        CandidateGraph(torch.full((5, 3), float("nan")))
    with pytest.raises(ValueError, match="palfast.active.CandidateGraph: nlist and nprobe apply"):
        CandidateGraph(x, index="exact", nlist=3)
    with pytest.raises(ValueError, match="CandidateGraph.prepare: strategy must be one of"):
        graph.prepare("greedy")
    # a NumPy array (a memory map the same way) is one array across calls: accepted
    a = x.numpy()
    assert select_queries(a, store, 3, "nearest", graph=CandidateGraph(a, k=4)).shape == (3, 2)


@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_pal_adaptive_mix_keeps_every_rule(noise, pal_links):
    """mix="adaptive" adds random pairs to "pal"'s: still no known or implied pair, no two
    pairs joining the same components, the budget filled."""
    x, y = clustered(90, 5)
    store, oracle, state = RelationStore(), LabelOracle(y, noise=noise, seed=1), {}
    for r in range(6):
        q = select_queries(x, store, 25, "pal", k=5, seed=r, mix="adaptive", state=state)
        check_selection(q, store, 25, n=90)
        assert q.shape[0] == min(25, n_unknown_component_pairs(store, torch.arange(90)))
        store.record(q, oracle.ask(q))
    assert 0.0 <= state["guided_share"] <= 1.0


def adaptive_share_after_rounds(labels_follow_similarity: bool) -> float:
    x, y = clustered(120, 4, spread=0.3, seed=3)
    if not labels_follow_similarity:  # answers independent of the embeddings
        y = y[torch.randperm(120, generator=torch.Generator().manual_seed(4))]
    store, oracle, state = RelationStore(), LabelOracle(y), {}
    for r in range(4):
        q = select_queries(x, store, 30, "pal", seed=r, mix="adaptive", state=state)
        store.record(q, oracle.ask(q))
    select_queries(x, store, 30, "pal", seed=9, mix="adaptive", state=state)
    return state["guided_share"]


def test_pal_adaptive_share_follows_how_well_similarity_predicted_the_answers():
    assert adaptive_share_after_rounds(True) > 0.8
    assert adaptive_share_after_rounds(False) < 0.4


def test_pal_adaptive_mix_is_random_at_share_0_and_guided_at_share_1():
    x, y, store = known_classes_with_free_rows()
    stable = {"exploring": False}  # no seeds: the whole budget is split
    random_pairs = select_queries(x, store, 10, "random", seed=5)
    q = select_queries(x, store, 10, "pal", seed=5, mix="adaptive", state={**stable, "guided_share": 0.0})
    assert torch.equal(q, random_pairs)
    guided = select_queries(x, store, 10, "pal", seed=5, state=dict(stable))
    q = select_queries(x, store, 10, "pal", seed=5, mix="adaptive", state={**stable, "guided_share": 1.0})
    assert torch.equal(q, guided)


def test_ranking_auc_counts_pairs_and_half_ties():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 5, (40,), generator=g).float()  # many ties
    y = torch.rand(40, generator=g) < 0.4
    pos, neg = s[y], s[~y]
    brute = ((pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()).mean()
    assert strategies_mod._ranking_auc(s, y) == pytest.approx(float(brute))


def _unit(rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float), dim=1)


def _asks_merge(q, side_a, side_b):
    return any(({i, j} & side_a) and ({i, j} & side_b) for i, j in q.tolist())


def test_pal_merge_candidate_of_a_fragment_whose_votes_split(pal_links):
    # A, B, C (two rows each, along the three axes) and F (six rows near the diagonal, two
    # tilted towards each axis): F's members vote A, B and C a third each, no majority.
    # Each of them is F's most voted class (a plurality), so each asks the merge with F (a
    # "yes" joins six samples) before any row; free rows on the far side of the sphere.
    x = _unit(
        [[1, 0, 0], [1, 0.1, 0], [0, 1, 0], [0, 1, 0.1], [0, 0, 1], [0.1, 0, 1]]
        + [[1.3, 1, 1], [1.35, 1, 1], [1, 1.3, 1], [1, 1.35, 1], [1, 1, 1.3], [1, 1, 1.35]]
        + [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [-1, -1, -1], [-1, -0.5, 0]]
    )
    store = RelationStore()
    chains = [(0, 1), (2, 3), (4, 5), (6, 7), (7, 8), (8, 9), (9, 10), (10, 11)]
    store.record(torch.tensor(chains), torch.ones(len(chains), dtype=torch.bool))
    q = select_queries(x, store, 3, "pal", explore=0.0)
    check_selection(q, store, 3, n=x.shape[0])
    fragment = set(range(6, 12))
    for side in ({0, 1}, {2, 3}, {4, 5}):
        assert _asks_merge(q, side, fragment)


def _three_arcs():
    """Unit vectors at these angles (degrees): rows 0–1 at 0°, 2–3 at 30°, 4–5 at 70° (three
    classes once each pair is answered "alike"), and six rows elsewhere on the circle."""
    angles = torch.deg2rad(torch.tensor([0.0, 2.0, 30.0, 32.0, 70.0, 72.0, 150.0, 180.0, 200.0, 230.0, 260.0, 300.0]))
    return torch.stack([torch.cos(angles), torch.sin(angles)], 1)


def test_pal_merge_votes_skip_the_classes_known_different(pal_links):
    # Classes A (0°), B (30°) and C (70°) of _three_arcs, A and B known different. A's
    # most similar other class is B, so A's votes go to C, the class not known to differ,
    # and C asks the merge A–C: without skipping B, A voted for B and was never offered
    # again.
    x = _three_arcs()
    store = RelationStore()
    store.record(torch.tensor([[0, 1], [2, 3], [4, 5], [0, 2]]), torch.tensor([True, True, True, False]))
    q = select_queries(x, store, 3, "pal", explore=0.0)
    check_selection(q, store, 3, n=12)
    assert _asks_merge(q, {0, 1}, {4, 5})


def test_pal_class_known_different_from_every_other_casts_no_vote(pal_links, monkeypatch):
    # Classes A (0°), B (30°) and Z (70°) of _three_arcs, Z known different from A and
    # from B, so its members have no class to vote for: Z is no class's merge candidate.
    # A vote of Z's would not change the pairs asked (a Z–A pair is known, skipped when
    # reached), so the test reads the candidates pal builds (``merges``).
    offered = []

    def recording(merges):
        def wrapper(self, c):
            others, share = merges(self, c)
            offered.extend((c, int(o)) for o in others)
            return others, share

        return wrapper

    for links in (strategies_mod._DenseLinks, strategies_mod._GraphLinks):
        monkeypatch.setattr(links, "merges", recording(links.merges))
    x = _three_arcs()
    store = RelationStore()
    store.record(torch.tensor([[0, 1], [2, 3], [4, 5], [0, 4], [2, 4]]), torch.tensor([True, True, True, False, False]))
    q = select_queries(x, store, 3, "pal", explore=0.0)
    check_selection(q, store, 3, n=12)
    assert _asks_merge(q, {0, 1}, {2, 3})  # A and B still vote for each other
    roots = store.roots(torch.tensor([0, 2, 4]))  # pal numbers the classes in root order
    z = int((roots < roots[2]).sum())
    assert offered and not [m for m in offered if z in m]
