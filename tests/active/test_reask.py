"""Re-asks (select_queries' ``reask``; docs/active.md, "Answers from people who make
mistakes"): the pending merges of "confirm" and the one-vote joins and ties of "majority"
asked again first in reask_order (contested, then multi joins by consequence, then single
joins least similar first), each once; the errors; select_reasks (the re-asks alone);
ActiveLearner's rounds (new questions, then their re-asks)."""

import math
import warnings

import pytest
import torch
from torch import nn

from palfast.active import ActiveLearner, CallbackOracle, LabelOracle, RelationStore, select_queries, select_reasks
from palfast.active.strategies import STRATEGIES
from palfast.metrics import merged_classes

pytestmark = pytest.mark.filterwarnings("ignore::palfast.active.store.ContradictionWarning")

N = 20
X = torch.randn(N, 4, generator=torch.Generator().manual_seed(0))
ALIKE = True


def confirm_store():
    """Classes A={0,1}, B={2,3}, C={4,5,6}, D={7,8,9}, then three "alike" answers across
    them that wait: (1,2) A-B (2·2 = 4 sample pairs), (0,4) A-C (2·3 = 6), (6,7) C-D (9)."""
    store = RelationStore(policy="confirm")
    store.record([[0, 1], [2, 3], [4, 5], [5, 6], [7, 8], [8, 9]], [ALIKE] * 6)
    store.record([[1, 2], [0, 4], [6, 7]], [ALIKE] * 3)
    assert store.unconfirmed()[1].tolist() == [[1, 2], [0, 4], [6, 7]]
    return store


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_confirm_reasks_pending_merges_first_by_consequence(strategy):
    store = confirm_store()
    q = select_queries(X, store, 5, strategy, reask=0.6, seed=1)  # int(0.6 · 5) = 3 re-asks
    assert q[:3].tolist() == [[6, 7], [0, 4], [1, 2]]
    assert len({tuple(p) for p in q.tolist()}) == q.shape[0] == 5  # no pair twice
    # The rest are new questions: unknown, and none across a re-asked merge.
    assert not bool(store.known_mask(q[3:]).any())
    roots = store.roots(q[3:].reshape(-1)).reshape(-1, 2).sort(1).values.tolist()
    re_asked = store.roots(q[:3].reshape(-1)).reshape(-1, 2).sort(1).values.tolist()
    if strategy != "passive":  # passive rejects only asked pairs (module docstring)
        assert not any(r in re_asked for r in roots)


def test_confirm_reask_share_and_rows():
    store = confirm_store()
    assert select_queries(X, store, 5, "nearest", reask=0.4)[:2].tolist() == [[6, 7], [0, 4]]
    assert [6, 7] not in select_queries(X, store, 5, "nearest", reask=0.4)[2:].tolist()
    # A pending pair with a sample outside the rows cannot be asked: the next one is.
    ids = torch.tensor([i for i in range(N) if i != 7])
    q = select_queries(X[: N - 1], store, 5, "nearest", reask=0.4, ids=ids)
    assert q[:2].tolist() == [[0, 4], [1, 2]]
    # Every pending merge asked once, the rest of the budget as without reask.
    q = select_queries(X, store, 8, "nearest", reask=1.0)
    assert q[:3].tolist() == [[6, 7], [0, 4], [1, 2]] and q.shape[0] == 8
    assert [tuple(p) for p in q[3:].tolist()] == [tuple(p) for p in select_queries(X, store, 8, "nearest")[:5].tolist()]
    # reask=0 changes nothing.
    assert torch.equal(select_queries(X, store, 5, "pal", reask=0.0), select_queries(X, store, 5, "pal"))


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_pal_adaptive_mix_keeps_the_reasks_first_and_judges_only_new_pairs(share):
    """pal's mix="adaptive" with reask: the re-asks lead, as without the mix; the pairs
    kept for judging the mix at the next call are the new ones only (a re-asked pair's
    answer is known already, it would not tell how well similarity predicts)."""
    store, state = confirm_store(), {"exploring": False, "guided_share": share}
    q = select_queries(X, store, 8, "pal", reask=0.5, seed=2, mix="adaptive", state=state)
    assert q[:3].tolist() == [[6, 7], [0, 4], [1, 2]] and q.shape[0] == 8
    assert [p[:2] for p in state["asked"]] == q[3:].tolist()


def test_confirm_reask_resolves_the_merge():
    store = confirm_store()
    q = select_queries(X, store, 2, "nearest", reask=1.0)
    assert q.tolist() == [[6, 7], [0, 4]]
    store.record(q, [ALIKE, not ALIKE])  # C-D confirmed, A-C dropped
    assert store.same(4, 9) and store.same(0, 4) is False
    pairs, consequence = store.reask_candidates()[:2]
    assert pairs.tolist() == [[1, 2]] and consequence.tolist() == [4]


def majority_store():
    """A={0,1}, B={2,3}, C={4,5}, D={6,7,8} joined one sample at a time (single joins,
    consequence 1·1 and, for 8, 2·1), then (1,2) joins A and B (2·2 = 4 sample pairs),
    (5,6) joins C and D (2·3 = 6), (8,9) joins the single sample 9 to C+D (5·1), and
    (3,4) joins A+B with C+D (4·6 = 24) but has a second "alike" answer (not a candidate)."""
    store = RelationStore(policy="majority")
    store.record([[0, 1], [2, 3], [4, 5], [6, 7], [7, 8]], [ALIKE] * 5)
    store.record([[1, 2], [5, 6], [8, 9], [3, 4], [4, 3]], [ALIKE] * 5)
    return store


def test_majority_lists_single_and_multi_one_vote_joins():
    c = majority_store().reask_candidates()
    assert c.pairs.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7], [7, 8], [1, 2], [5, 6], [8, 9]]
    assert c.consequence.tolist() == [1, 1, 1, 1, 2, 4, 6, 5]
    assert c.single.tolist() == [True] * 5 + [False, False, True]
    assert not bool(c.contested.any())


def test_majority_reasks_multi_joins_first():
    store = majority_store()
    q = select_queries(X, store, 4, "pal", reask=0.5)
    assert q[:2].tolist() == [[5, 6], [1, 2]]  # known pairs: the exception
    assert len({tuple(p) for p in q.tolist()}) == q.shape[0]
    assert not bool(store.known_mask(q[2:]).any())
    # Every candidate once when the share allows: the multi joins first, then the rest.
    q = select_queries(X, store, 12, "pal", reask=1.0)
    assert q[:2].tolist() == [[5, 6], [1, 2]] and q.shape[0] == 12
    assert sorted(q[2:8].tolist()) == [[0, 1], [2, 3], [4, 5], [6, 7], [7, 8], [8, 9]]


def test_majority_undoes_a_multi_join_with_one_vote():
    store = majority_store()
    # One "different" vote: a tie, which gives the pair no answer: C and D apart again,
    # and the pair, unknown now, a contested candidate with the components now:
    # A+B+C (joined by the settled (3, 4)) and D+{9}, 6·4.
    store.record([[5, 6]], [not ALIKE])
    c = store.reask_candidates()
    assert store.same(4, 7) is None and store.same(5, 6) is None and store.same(6, 9)
    assert c.pairs.tolist()[-1] == [5, 6] and c.contested.tolist() == [False] * (len(c.pairs) - 1) + [True]
    assert int(c.consequence[-1]) == 24
    store.record([[6, 5]], [not ALIKE])  # settled: C and D apart, no longer a candidate
    assert store.same(4, 7) is False and [5, 6] not in store.reask_candidates().pairs.tolist()
    store.record([[1, 2]], [ALIKE])  # two votes ahead: settled
    assert [1, 2] not in store.reask_candidates().pairs.tolist()


def test_majority_undoes_a_single_join_with_one_vote():
    """A sample joined to a class by one "alike": one "different" re-ask makes a tie,
    which undoes the join (the pair unknown, contested, its consequence that of the
    components now); a third answer settles it."""
    store = majority_store()
    store.record([[8, 9]], [not ALIKE])
    c = store.reask_candidates()
    row = c.pairs.tolist().index([8, 9])
    assert store.same(8, 9) is None and store.same(4, 8) and not bool(store.known_mask([[8, 9]]))
    assert bool(c.single[row]) and bool(c.contested[row]) and int(c.consequence[row]) == 9  # A+B+C+D · {9}
    assert select_queries(X, store, 4, "pal", reask=0.25)[0].tolist() == [8, 9]  # the tie first
    store.record([[9, 8]], [not ALIKE])
    assert store.same(8, 9) is False and store.same(4, 8)
    assert [8, 9] not in store.reask_candidates().pairs.tolist()
    assert store.n_queries == 12  # every answer kept


def test_a_tied_pair_is_asked_once_and_nothing_across_it():
    """A tie is unknown: the re-asks ask it, and then the strategy asks no other pair
    across its two components in the same call; without re-asks the strategy may ask it."""
    emb, store = planted_wrong_join()
    store.record([[15, 2]], [not ALIKE])  # the wrong join undone by one re-ask
    assert store.same(2, 15) is None
    tie = tuple(store.roots(torch.tensor([2, 15])).sort().values.tolist())
    for reask in (0.0, 0.1, 0.5):
        q = select_queries(emb, store, 10, "pal", reask=reask)
        n = int(reask * 10)  # the re-asks, the tie first; then the strategy's pairs
        assert q.shape[0] > n and (n == 0 or q[0].tolist() == [2, 15])
        rest = q[n:]
        assert not bool(store.known_mask(rest).any())
        across = {tuple(r) for r in store.roots(rest.flatten()).reshape(-1, 2).sort(1).values.tolist()}
        assert len(across) == rest.shape[0] and (n == 0 or tie not in across)


def test_first_has_no_candidates():
    store = RelationStore()
    store.record([[0, 1], [2, 3], [1, 2]], [ALIKE] * 3)
    assert store.reask_candidates()[0].shape == (0, 2)


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan, math.inf])
def test_reask_out_of_range(bad):
    with pytest.raises(ValueError, match="select_queries: reask must be"):
        select_queries(X, confirm_store(), 4, reask=bad)


def test_reask_needs_a_policy_that_can_change():
    with pytest.raises(ValueError, match=r"reask=0\.1 .*policy 'first'.*policy='confirm' or policy='majority'"):
        select_queries(X, RelationStore(), 4, reask=0.1)
    select_queries(X, RelationStore(), 4, reask=0.0)  # no re-ask: every policy


def test_reask_needs_a_writable_store(tmp_path):
    path = tmp_path / "s.sqlite"
    RelationStore(path).close()
    with RelationStore(path, policy="confirm", readonly=True) as store:
        with pytest.raises(ValueError, match=r"reask=0\.5 .*readonly=True.*could not be recorded"):
            select_queries(X, store, 4, reask=0.5)
        assert select_queries(X, store, 4).shape == (4, 2)


@pytest.mark.parametrize("make", [confirm_store, majority_store])
def test_select_reasks_are_the_reasks_select_queries_starts_with(make):
    store = make()
    every = select_reasks(X, store, 100)
    n = store.unconfirmed()[1].shape[0] if store.policy == "confirm" else store.reask_candidates().pairs.shape[0]
    assert every.shape == (n, 2)
    assert select_queries(X, store, 100, "random", reask=1.0)[:n].tolist() == every.tolist()
    for budget in (0, 1, 2, n - 1):
        assert select_reasks(X, store, budget).tolist() == every[:budget].tolist()
    ids = torch.arange(N) + 100  # rows named by other ids: no candidate among them
    assert select_reasks(X, store, 100, ids=ids).shape == (0, 2)


def test_select_reasks_errors(tmp_path):
    op = "palfast.active.select_reasks"
    with pytest.raises(ValueError, match=rf"{op}: it asks answers again, which cannot change .* policy 'first'"):
        select_reasks(X, RelationStore(), 4)
    path = tmp_path / "s.sqlite"
    RelationStore(path).close()
    with RelationStore(path, policy="majority", readonly=True) as store:
        with pytest.raises(ValueError, match=rf"{op}: it asks .*readonly=True.*could not be recorded"):
            select_reasks(X, store, 4)
    with pytest.raises(TypeError, match=f"{op}: store must be"):
        select_reasks(X, None, 4)
    with pytest.raises(ValueError, match=f"{op}: budget"):
        select_reasks(X, majority_store(), -1)
    with pytest.raises(ValueError, match=f"{op}: embeddings"):
        select_reasks(torch.full((N, 4), math.nan), majority_store(), 4)


def test_learner_reask_errors():
    y = torch.arange(N) % 2
    with pytest.raises(ValueError, match="ActiveLearner: reask=0.2 .*policy 'first'"):
        ActiveLearner(nn.Linear(4, 4), X, LabelOracle(y), reask=0.2)
    with pytest.raises(ValueError, match="ActiveLearner: reask must be"):
        ActiveLearner(nn.Linear(4, 4), X, LabelOracle(y), RelationStore(policy="confirm"), reask=2)
    with pytest.raises(ValueError, match="ActiveLearner: reask is passed to select_queries"):
        ActiveLearner(
            nn.Linear(4, 4), X, LabelOracle(y), RelationStore(policy="confirm"), strategy=lambda *a, **k: 0, reask=0.2
        )


def blobs(n_classes=8, per=15, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_classes).repeat_interleave(per)
    return 4 * torch.randn(n_classes, dim, generator=g)[y] + torch.randn(y.numel(), dim, generator=g), y


def learner(x, y, store, oracle, reask, seed=0):
    """No training (epochs 0): the selection runs on a fixed random projection, fast."""
    torch.manual_seed(seed)
    return ActiveLearner(
        nn.Linear(x.shape[1], x.shape[1]), x, oracle, store, epochs_per_round=0, progress=False, seed=seed, reask=reask
    )


def test_learner_wrong_merge_is_reasked_and_undone():
    """A person's mistake, "alike" across two known classes, then a truthful oracle: with
    re-asks the run asks it again in its first round and the classes stay apart; under
    "first" they are merged."""
    x, y = blobs()
    (a0, a1), (b0, b1) = (y == 0).nonzero()[:2].flatten().tolist(), (y == 1).nonzero()[:2].flatten().tolist()
    prior = ([[a0, a1], [b0, b1], [a1, b0]], [ALIKE] * 3)  # the last one is wrong
    ends = {}
    for policy, reask in (("first", 0.0), ("confirm", 0.2)):
        store = RelationStore(policy=policy)
        store.record(*prior, source="person")
        oracle = CallbackOracle(lambda p: y[p[:, 0]] == y[p[:, 1]])
        learner(x, y, store, oracle, reask).run(60, 15)
        ends[(policy, reask)] = (merged_classes(store.components(torch.arange(y.numel())), y), store.unconfirmed()[1])
        if reask:
            asked = store.answers()[0][3:18]  # the first round's questions
            assert [a1, b0] in asked.tolist()
    assert ends[("confirm", 0.2)][0] == 0 and ends[("confirm", 0.2)][1].shape[0] == 0
    assert ends[("first", 0.0)][0] >= 1


@pytest.mark.parametrize("seed", range(3))
def test_learner_noisy_leaves_no_pending_merge_it_could_reask(seed):
    """A noisy oracle (a fresh flip per question): with a re-ask share larger than the
    pending merges a round makes, no merge is left pending at the end, the last round's
    included (its re-asks come after its new questions)."""
    x, y = blobs(seed=seed)
    store = RelationStore(policy="confirm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner(x, y, store, LabelOracle(y, noise=0.2, seed=seed), 0.5, seed).run(150, 15)
    assert store.n_queries == 150
    assert store.unconfirmed()[0].shape[0] == 0


@pytest.mark.parametrize("policy", ["confirm", "majority"])
def test_learner_reasks_its_round_s_own_answers(policy):
    """One round on an empty store: nothing can be re-asked before its questions, so the
    re-asks must come after them, within the round (one selection each time), and the
    budget is spent exactly."""
    x, y = blobs()
    store = RelationStore(policy=policy)
    history = learner(x, y, store, CallbackOracle(lambda p: y[p[:, 0]] == y[p[:, 1]]), 0.5).run(20, 20)
    assert store.n_queries == 20 and len(history) == 2
    asked = [tuple(p) for p in store.answers()[0].tolist()]
    again = [i for i, p in enumerate(asked) if p in asked[:i]]
    assert again and min(again) >= 10  # the first 20 − int(0.5 · 20) are new questions
    if policy == "majority":  # every "alike" of the round asked twice (a truthful oracle)
        assert store.reask_candidates().pairs.shape[0] == 0


def test_apps_refuse_bad_policy_options_before_any_work():
    import dataclasses

    from palfast.active.policy import check_policy_options
    from palfast.benchmarks.bench_strategies import QUICK, check_settings, main

    with pytest.raises(ValueError, match="palfast demo: --reask 0.1 .*--policy confirm or --policy majority"):
        check_policy_options("palfast demo", "first", 0.1)
    with pytest.raises(ValueError, match=r"--reask must be a share in \[0, 1\]"):
        check_policy_options("palfast demo", "confirm", -1.0)
    assert check_policy_options("palfast demo", "majority", 0.2) == ("majority", 0.2)
    with pytest.raises(ValueError, match="^--policy must be one of"):  # no op: the caller prefixes
        check_policy_options("", "vote", 0.0)
    with pytest.raises(ValueError, match="strategies: reask=0.2 .*policy 'first'"):
        check_settings(dataclasses.replace(QUICK, reask=0.2))
    with pytest.raises(ValueError, match="policy must be one of"):
        check_settings(dataclasses.replace(QUICK, policy="best"))
    assert main(["--quick", "--reask", "2", "--policy", "confirm"]) == 2


def planted_wrong_join(policy="majority"):
    """Three tight classes on the unit circle (samples 0–5 at angle 0, 6–11 at 2π/3,
    12–17 at 4π/3), each built by single "alike" joins, and one wrong "alike" among them:
    sample 15 (of the third class) joined to sample 2 of the first, a single join too."""
    angle = torch.tensor([0.0] * 6 + [2.1] * 6 + [4.2] * 6) + 0.05 * torch.arange(18) % 0.3
    emb = torch.stack([angle.cos(), angle.sin()], 1)
    store = RelationStore(policy=policy)
    chains = [[c + k, c + k + 1] for c in (0, 6, 12) for k in range(5) if c + k + 1 != 15]
    store.record(chains[:7], [ALIKE] * 7)
    store.record([[2, 15]], [ALIKE])  # the wrong one, in the middle of the log
    store.record(chains[7:], [ALIKE] * (len(chains) - 7))
    return emb, store


def test_suspicion_asks_the_planted_wrong_join_first():
    emb, store = planted_wrong_join()
    c = store.reask_candidates()
    assert bool(c.single.all()) and [2, 15] in c.pairs.tolist()
    assert select_queries(emb, store, 10, "pal", reask=0.1)[0].tolist() == [2, 15]
    # By consequence alone (the order before) it would not be first: the class joins of
    # later answers are larger.
    assert int(c.consequence[c.pairs.tolist().index([2, 15])]) < int(c.consequence.max())
    # A join of two classes still comes before it.
    store.record([[6, 13]], [ALIKE])  # joins 6-11 with 12-14 (6·3)
    assert select_queries(emb, store, 10, "pal", reask=0.2)[:2].tolist() == [[6, 13], [2, 15]]


def test_suspicion_asks_a_contested_join_first():
    """A tie (one more answer settles it) comes before everything, a join of two classes
    too; among contested candidates the most consequential first."""
    emb, store = planted_wrong_join()
    store.record([[0, 1]], [not ALIKE])  # a tie on a pair the embedding finds likely
    assert select_queries(emb, store, 10, "pal", reask=0.2)[:2].tolist() == [[0, 1], [2, 15]]
    store.record([[6, 13]], [ALIKE])  # joins 6-11 with 12-14 (6·3)
    assert select_queries(emb, store, 10, "pal", reask=0.3)[:3].tolist() == [[0, 1], [6, 13], [2, 15]]
    store.record([[3, 4]], [not ALIKE])  # a tie on a join of consequence 3·1 > 1·1
    assert select_queries(emb, store, 10, "pal", reask=0.3)[:3].tolist() == [[3, 4], [0, 1], [6, 13]]


def reask_order_reference(candidates, similarity):
    """Brute force of reask_order's rule: sort the indices by (tier, key, index), tier 0
    for the contested candidates and 1 for the other multi joins (key: −consequence), 2
    for the other single joins (key: similarity)."""

    def key(k):
        if candidates.contested[k] or not candidates.single[k]:
            return (0 if candidates.contested[k] else 1, -int(candidates.consequence[k]), k)
        return (2, float(similarity[k]), k)

    return sorted(range(candidates.pairs.shape[0]), key=key)


@pytest.mark.parametrize("seed", range(20))
def test_reask_order_matches_brute_force(seed):
    from palfast.active.policy import ReaskCandidates
    from palfast.active.strategies import reask_order

    g = torch.Generator().manual_seed(seed)
    p = int(torch.randint(0, 30, (1,), generator=g))
    rows = [
        (2 * k, 2 * k + 1, int(torch.randint(1, 8, (1,), generator=g)), bool(b), bool(c))
        for k, (b, c) in enumerate(torch.randint(0, 2, (p, 2), generator=g).tolist())
    ]
    candidates = ReaskCandidates.of(rows)
    similarity = torch.randint(-4, 5, (p,), generator=g).float() / 4  # ties on purpose
    assert reask_order(candidates, similarity).tolist() == reask_order_reference(candidates, similarity)


def test_learner_at_reask_1_still_spends_its_budget():
    """At reask 1 a round's share leaves no new question; when no re-ask is due either,
    the rest of the round goes to new questions instead of ending the run."""
    x, y = blobs()
    store = RelationStore(policy="majority")
    history = learner(x, y, store, CallbackOracle(lambda p: y[p[:, 0]] == y[p[:, 1]]), 1.0).run(40, 10)
    assert store.n_queries == 40 and history[-1]["stop"] == "budget" and len(history) == 5
