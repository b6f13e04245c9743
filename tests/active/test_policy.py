"""Answer-resolution policies (palfast/active/policy.py; docs/active.md, "Answers from
people who make mistakes"): "majority" (its relation and its re-ask candidates) and
"confirm" against brute-force references of their rules, "confirm" also on hand-made
logs, both with retractions, reopen and refresh on both backends (``store_path``), and
:meth:`RelationStore.annotators` on answers whose statistics are counted by hand below."""

import warnings

import pytest
import torch

from palfast.active import RelationStore
from palfast.active.policy import POLICIES, ConfirmRelation, MajorityRelation, make_relation
from palfast.active.relation import Relation
from palfast.active.store import AnnotatorStats, ContradictionWarning

from _store_helpers import closure_reference, random_answers, relation_of

pytestmark = pytest.mark.filterwarnings("ignore::palfast.active.store.ContradictionWarning")


def repeated_answers(n, q, seed, n_pairs=10, n_classes=3):
    """``q`` answers about ``n`` samples drawn from only ``n_pairs`` distinct pairs (so
    pairs repeat, in either orientation), three in ten of them flipped:
    ``(pairs [q] of (i, j), answers [q] of bool)`` as Python lists."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, n_classes, (n,), generator=g)
    a = torch.randint(0, n, (n_pairs,), generator=g)
    b = (a + torch.randint(1, n, (n_pairs,), generator=g)) % n
    pick = torch.randint(0, n_pairs, (q,), generator=g)
    swap = torch.randint(0, 2, (q,), generator=g).bool()
    flip = torch.randint(0, 10, (q,), generator=g) < 3
    i, j = torch.where(swap, b[pick], a[pick]), torch.where(swap, a[pick], b[pick])
    return torch.stack([i, j], 1).tolist(), ((y[i] == y[j]) ^ flip).tolist()


def majority_reference(n, pairs, answers):
    """Brute force of policy "majority", in integers: count each unordered pair's
    answers; its answer is "alike" when more say alike, "different" when fewer, none on
    a tie; hand one answer per pair that has one, pairs in the order of their earliest
    answer, to the first-answer-wins closure. ``[n, n]`` of 1 / 0 / -1."""
    earliest, votes = {}, {}
    for (i, j), a in zip(pairs, answers):
        key = frozenset((i, j))
        earliest.setdefault(key, (i, j))  # dicts keep insertion order
        votes[key] = votes.get(key, 0) + (1 if a else -1)
    resolved = [(p, votes[k] > 0) for k, p in earliest.items() if votes[k] != 0]
    return closure_reference(n, [p for p, _ in resolved], [a for _, a in resolved])


def majority_candidates_reference(pairs, answers):
    """Brute force of MajorityRelation.reask_candidates: the majority answers (as
    majority_reference) applied in order to components kept as Python sets; every
    "alike" that joins two components not known different is a join, with the two sizes
    before it; a candidate when its pair's majority rests on one vote (one more "alike"
    than "different"). Then the tied pairs (as many of each) whose two samples end in two
    components not known different, with the sizes of those, contested.
    ``[(i, j, consequence, single, contested)]``: the joins in their order, then the
    ties in the order of their earliest answer."""
    earliest, votes = {}, {}
    for (i, j), a in zip(pairs, answers):
        key = frozenset((i, j))
        earliest.setdefault(key, (i, j))
        votes[key] = votes.get(key, 0) + (1 if a else -1)
    comp, apart, out = {}, set(), []
    for key, (i, j) in earliest.items():
        if votes[key] == 0:
            continue  # a tie: no answer
        ci, cj = comp.setdefault(i, frozenset([i])), comp.setdefault(j, frozenset([j]))
        if ci == cj or frozenset((ci, cj)) in apart:
            continue
        if votes[key] < 0:
            apart.add(frozenset((ci, cj)))
            continue
        merged = ci | cj
        apart = {frozenset(merged if c in (ci, cj) else c for c in link) for link in apart}
        for m in merged:
            comp[m] = merged
        if votes[key] == 1:
            out.append((i, j, len(ci) * len(cj), min(len(ci), len(cj)) == 1, False))
    for key, (i, j) in earliest.items():
        ci, cj = comp.get(i, frozenset([i])), comp.get(j, frozenset([j]))
        if votes[key] == 0 and ci != cj and frozenset((ci, cj)) not in apart:
            out.append((i, j, len(ci) * len(cj), min(len(ci), len(cj)) == 1, True))
    return out


def disagreeing(matrix, pairs, answers):
    """Positions of the answers the relation ``matrix`` (1 / 0 / -1) knows the opposite of."""
    return [q for q, ((i, j), a) in enumerate(zip(pairs, answers)) if int(matrix[i, j]) == int(not a)]


# ------------------------------------------------------------------- majority
@pytest.mark.parametrize("seed", range(12))
def test_majority_relation_matches_brute_force(seed):
    n = 9
    pairs, answers = repeated_answers(n, 45, seed)
    rel = MajorityRelation()
    g = torch.Generator().manual_seed(100 + seed)
    start = 0
    while start < len(pairs):  # batches of 1..5: new pairs, repeats, flips of the majority
        stop = start + int(torch.randint(1, 6, (1,), generator=g))
        rel.extend(zip(*zip(*pairs[start:stop]), answers[start:stop]))
        expected = majority_reference(n, pairs[:stop], answers[:stop])
        assert torch.equal(relation_of(rel.relation, n), expected), (seed, stop)
        assert rel.contradictions()[0].tolist() == disagreeing(expected, pairs[:stop], answers[:stop])
        c = rel.reask_candidates()  # and its re-ask candidates
        got = [
            (i, j, k, bool(s), bool(t))
            for (i, j), k, s, t in zip(c.pairs.tolist(), c.consequence.tolist(), c.single, c.contested)
        ]
        assert got == majority_candidates_reference(pairs[:stop], answers[:stop]), (seed, stop)
        start = stop
    assert rel.n_queries == len(pairs) and rel.answers()[1].tolist() == answers


def test_majority_without_repeats_is_first_bit_for_bit():
    """No pair answered twice: "majority" feeds the relation exactly what "first" does,
    so even the component ids (union-find roots) agree."""
    n = 30
    g = torch.Generator().manual_seed(4)
    y = torch.randint(0, 4, (n,), generator=g)
    all_pairs = torch.combinations(torch.arange(n))
    pairs = all_pairs[torch.randperm(all_pairs.shape[0], generator=g)[:120]]
    answers = (y[pairs[:, 0]] == y[pairs[:, 1]]) ^ (torch.randint(0, 10, (120,), generator=g) < 2)
    first, majority = Relation(), MajorityRelation()
    for rel in (first, majority):
        rel.extend(zip(*pairs.T.tolist(), answers.tolist()))
    ids = torch.arange(n)
    assert torch.equal(first.components(ids), majority.relation.components(ids))
    assert first.contradictions()[0].tolist() == majority.contradictions()[0].tolist()
    assert first.n_conflicts > 0  # the noise made some


@pytest.mark.parametrize("seed", range(3))
def test_majority_store_matches_brute_force_and_reopens(store_path, seed):
    n = 8
    pairs, answers = repeated_answers(n, 30, seed)
    with RelationStore(store_path, policy="majority") as s:
        start = 0
        for size in (1, 4, 2, 1, 5, 3, 1, 6, 2, 5):  # 30 answers in 10 transactions
            s.record(pairs[start : start + size], answers[start : start + size])
            start += size
            expected = majority_reference(n, pairs[:start], answers[:start])
            assert torch.equal(relation_of(s, n), expected), (seed, start)
        assert s.contradictions()[0].tolist() == disagreeing(expected, pairs, answers)
    with RelationStore(store_path, policy="majority") as s:  # derived from the log
        assert torch.equal(relation_of(s, n), expected)
    with RelationStore(store_path) as s:  # the same log read first-answer-wins
        assert torch.equal(relation_of(s, n), closure_reference(n, pairs, answers))


def test_majority_tie_is_unknown_and_a_third_answer_settles(store_path):
    s = RelationStore(store_path, policy="majority")
    ids = s.record([[0, 1], [1, 2]], [True, True])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ContradictionWarning)
        ids += s.record([[1, 0]], [False])  # a tie: {0, 1} has no answer, none contradicts
    assert s.same(0, 1) is None and s.same(0, 2) is None and s.same(1, 2) is True and s.n_conflicts == 0
    assert s.known_mask([[0, 1], [0, 2], [1, 2]]).tolist() == [False, False, True]
    c = s.reask_candidates()  # the one-vote join {1, 2}, then the tie ({0} and {1, 2} now)
    assert c.pairs.tolist() == [[1, 2], [0, 1]] and c.contested.tolist() == [False, True]
    assert c.consequence.tolist() == [1, 2] and c.single.tolist() == [True, True]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ContradictionWarning)  # the new answer wins: no warning
        ids += s.record([[0, 1]], [False])  # the third answer settles it: different, 2 to 1
    assert s.same(0, 1) is False and s.same(0, 2) is False and s.same(1, 2) is True
    assert s.contradictions()[0].tolist() == [0]  # the first "alike" is now overruled
    assert s.reask_candidates().pairs.tolist() == [[1, 2]]
    with pytest.warns(ContradictionWarning, match="1 of 1 answers contradict.*policy 'majority'"):
        ids += s.record([[2, 0]], [True])  # a new pair, known different already
    s.retract([ids[3]])  # back to a tie on {0, 1}: now {0, 2} joins 0 to {1, 2} ...
    assert s.same(0, 2) is True and s.same(0, 1) is True and s.n_queries == 4
    assert s.contradictions()[0].tolist() == [2]  # ... so the tied pair is known, and its "different" overruled
    assert [0, 1] not in s.reask_candidates().pairs.tolist()  # known: no candidate
    s.retract([ids[0]])  # only "different" is left for {0, 1}, earlier than {0, 2}
    assert s.same(0, 1) is False and s.same(1, 2) is True and s.same(0, 2) is False
    assert s.contradictions()[0].tolist() == [2]  # (2, 0) alike, after {0, 1} different
    with RelationStore(store_path, policy="majority") as again:
        assert torch.equal(relation_of(again, 3), relation_of(s, 3))
    s.close()


def test_majority_tie_then_alike_is_a_one_vote_join_again():
    rel = MajorityRelation()
    rel.extend([(0, 1, True), (1, 2, True), (2, 1, False)])
    assert rel.relation.same(0, 2) is None
    rel.extend([(1, 2, True)])  # 2 to 1: joined again, by one vote
    c = rel.reask_candidates()
    assert rel.relation.same(0, 2) is True and rel.n_conflicts == 1
    assert c.pairs.tolist() == [[0, 1], [1, 2]] and c.contested.tolist() == [False, False]
    assert c.consequence.tolist() == [1, 2]
    rel.extend([(2, 1, True)])  # 3 to 1: settled
    assert rel.reask_candidates().pairs.tolist() == [[0, 1]]


def test_policies_are_how_a_log_is_read_not_the_file(store_path):
    """One writer (policy "first"), readers with each policy on the same log: each
    refresh applies the new rows under the reader's own policy."""
    writer = RelationStore(store_path)
    readers = {p: RelationStore(store_path, policy=p, readonly=True) for p in POLICIES}
    writer.record([[0, 1], [2, 3]], [True, True], source="ann")
    writer.record([[1, 2]], [True], source="bob")  # joins two groups of two
    writer.record([[2, 1], [1, 2]], [False, False], source="cy")  # majority: different
    for r in readers.values():
        assert r.refresh() == 5
    assert writer.same(0, 3) is True and readers["first"].same(0, 3) is True
    assert readers["majority"].same(0, 3) is False and readers["majority"].n_conflicts == 1
    assert readers["confirm"].same(0, 3) is False  # pending, then dropped by "different"
    writer.record([[0, 3]], [True], source="dan")
    for r in readers.values():
        assert r.refresh() == 1
    assert readers["majority"].same(0, 3) is False  # a new pair, known different already
    assert readers["confirm"].same(0, 3) is False and readers["confirm"].unconfirmed()[0].numel() == 0
    for p, r in readers.items():
        with RelationStore(store_path, policy=p, readonly=True) as fresh:
            assert torch.equal(relation_of(fresh, 4), relation_of(r, 4)), p
            assert fresh.contradictions()[0].tolist() == r.contradictions()[0].tolist(), p
        r.close()
    writer.close()


# -------------------------------------------------------------------- confirm
def test_confirm_holds_a_merge_of_two_groups_until_a_second_answer(store_path):
    s = RelationStore(store_path, policy="confirm")
    ids = s.record([[0, 1], [2, 3], [4, 2]], [True, True, True])  # 4 was alone: applied
    assert s.same(0, 1) is True and s.same(3, 4) is True
    ids += s.record([[1, 2]], [True], source="ann")  # {0, 1} and {2, 3, 4}: waits
    assert s.same(0, 3) is None and s.same(1, 2) is None and s.n_conflicts == 0
    assert s.unconfirmed()[0].tolist() == [ids[3]] and s.unconfirmed()[1].tolist() == [[1, 2]]
    with RelationStore(store_path, policy="confirm") as again:  # derived from the log
        assert again.unconfirmed()[0].tolist() == [ids[3]] and again.same(0, 3) is None
    s.record([[4, 0]], [True], source="bob")  # another pair across the same two groups
    assert s.same(0, 3) is True and s.unconfirmed()[0].numel() == 0
    with RelationStore(store_path, policy="confirm") as again:
        assert torch.equal(relation_of(again, 5), relation_of(s, 5)) and again.unconfirmed()[0].numel() == 0
    s.close()


def test_confirm_by_asking_the_same_pair_again(store_path):
    s = RelationStore(store_path, policy="confirm")
    s.record([[0, 1], [2, 3], [1, 2]], [True, True, True])
    assert s.same(0, 3) is None
    s.record([[2, 1]], [True])
    assert s.same(0, 3) is True and s.n_conflicts == 0


def test_confirm_pending_merge_dropped_by_a_different_answer(store_path):
    s = RelationStore(store_path, policy="confirm")
    ids = s.record([[0, 1], [2, 3], [1, 2]], [True, True, True])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ContradictionWarning)  # record warns of its own answers
        s.record([[0, 3]], [False])  # the pending "alike" is now overruled
    assert s.same(1, 2) is False and s.unconfirmed()[0].numel() == 0
    assert s.contradictions()[0].tolist() == [2]
    s.record([[1, 2]], [True])  # known different now: a contradiction, never pending
    assert s.unconfirmed()[0].numel() == 0 and s.contradictions()[0].tolist() == [2, 4]
    with RelationStore(store_path, policy="confirm") as again:
        assert torch.equal(relation_of(again, 4), relation_of(s, 4))
    s.retract([ids[2]])  # undo the first "alike": the later one is still a contradiction
    assert s.contradictions()[0].tolist() == [3] and s.same(1, 2) is False
    s.close()


def test_confirm_retract_of_the_pending_answer_or_its_confirmation(store_path):
    s = RelationStore(store_path, policy="confirm")
    ids = s.record([[0, 1], [2, 3], [1, 2], [0, 3]], [True, True, True, True])
    assert s.same(0, 2) is True
    s.retract([ids[3]])  # the confirmation goes: the merge waits again
    assert s.same(0, 2) is None and s.unconfirmed()[0].tolist() == [ids[2]]
    s.retract([ids[2]])
    assert s.same(0, 2) is None and s.unconfirmed()[0].numel() == 0
    s.close()


def test_confirm_pending_merges_follow_growing_components():
    rel = ConfirmRelation()
    rel.extend([(0, 1, True), (2, 3, True), (1, 2, True)])  # pending {0,1}-{2,3}
    rel.extend([(5, 0, True)])  # a single sample joins {0, 1}: applied at once
    rel.extend([(5, 3, True)])  # across {0, 1, 5} and {2, 3}: confirms
    assert rel.relation.same(0, 2) is True and rel.unconfirmed()[0].numel() == 0
    # Two pending merges that come to join the same two groups are two answers across them.
    rel = ConfirmRelation()
    rel.extend([(0, 1, True), (2, 3, True), (4, 5, True), (6, 7, True)])
    rel.extend([(1, 4, True), (3, 5, True)])  # {0,1}-{4,5} and {2,3}-{4,5}: both wait
    assert rel.unconfirmed()[0].tolist() == [4, 5]
    rel.extend([(0, 2, True), (1, 3, True)])  # {0,1}-{2,3} confirmed: both now join {0..3}-{4,5}
    assert rel.relation.same(0, 5) is True and rel.unconfirmed()[0].numel() == 0
    assert rel.n_conflicts == 0
    # A pending merge whose side becomes known different from the other side is dropped.
    rel = ConfirmRelation()
    rel.extend([(0, 1, True), (2, 3, True), (1, 2, True), (5, 2, False)])
    assert rel.unconfirmed()[1].tolist() == [[1, 2]]
    rel.extend([(0, 5, True)])  # {0, 1, 5} is now known different from {2, 3}
    assert rel.unconfirmed()[0].numel() == 0 and rel.relation.same(1, 2) is False
    assert rel.contradictions()[0].tolist() == [2]


def check_confirm_state(rel, answers, n):
    """Every pending merge of ``rel`` (a ConfirmRelation) is an "alike" answer between
    two groups of two or more samples that are not known alike or different."""
    sizes = torch.bincount(rel.relation.roots(torch.arange(n)), minlength=n)
    for p, (i, j) in zip(*(t.tolist() for t in rel.unconfirmed())):
        assert answers[p] is True and rel.relation.same(i, j) is None
        assert sizes[rel.relation.roots(torch.tensor([i]))] > 1 and sizes[rel.relation.roots(torch.tensor([j]))] > 1


def confirm_reference(n, pairs, answers):
    """Brute force of policy "confirm" from its rule (docs/active.md, "Answers from people
    who make mistakes"), on component labels: an "alike" answer joins two components at
    once when one of them is a single sample, else waits as a pending merge until a
    second "alike" answer across the same two components; a "different" answer across
    them drops it; after every change the pending merges are read again on the new
    components: one inside a component is done, one across components known different is
    dropped, and two across the same two components merge them. Returns the relation as
    an ``[n, n]`` matrix of 1 / 0 / -1 and the positions of the pending answers."""
    comp, negatives, pending = list(range(n)), set(), []  # pending: positions, log order

    def key(a, b):
        return frozenset((a, b))

    def merge(a, b):
        nonlocal negatives
        comp[:] = [a if c == b else c for c in comp]
        negatives = {frozenset(a if c == b else c for c in k) for k in negatives}

    def settle():
        while True:
            across = {}
            for p in list(pending):
                ci, cj = comp[pairs[p][0]], comp[pairs[p][1]]
                if ci == cj or key(ci, cj) in negatives:
                    pending.remove(p)  # joined another way, or dropped
                elif key(ci, cj) in across:  # two answers across the same two groups
                    pending.remove(p)
                    pending.remove(across[key(ci, cj)])
                    merge(ci, cj)
                    break
                else:
                    across[key(ci, cj)] = p
            else:
                return

    for p, ((i, j), alike) in enumerate(zip(pairs, answers)):
        ci, cj = comp[i], comp[j]
        if ci == cj or key(ci, cj) in negatives:
            continue  # a repeat, or a contradiction: the relation does not change
        if not alike:
            negatives.add(key(ci, cj))
        elif comp.count(ci) == 1 or comp.count(cj) == 1:
            merge(ci, cj)
        else:
            pending.append(p)  # settle merges it if another answer waits across the same groups
        settle()
    out = torch.full((n, n), -1)
    for a in range(n):
        for b in range(n):
            out[a, b] = 1 if comp[a] == comp[b] else 0 if key(comp[a], comp[b]) in negatives else -1
    return out, pending


def test_confirm_relation_matches_brute_force():
    """Random logs, with noise, of pairs drawn anew (so that partial groups of one class
    meet) and of few pairs repeated: after every answer, the relation, the pending
    answers and the contradictions of ConfirmRelation are those of the brute force; the
    logs hold merges that wait, are confirmed and are dropped."""
    n, waited, confirmed, dropped = 12, 0, 0, 0
    logs = [random_answers(n, 50, 2 + seed % 3, seed, noise=0.15) for seed in range(12)]
    logs = [(p.tolist(), a.tolist()) for p, a in logs]
    logs += [repeated_answers(n, 50, seed, n_pairs=24, n_classes=3) for seed in range(6)]
    for pairs, answers in logs:
        rel, before = ConfirmRelation(), []
        for stop in range(1, len(pairs) + 1):
            rel.extend([(*pairs[stop - 1], answers[stop - 1])])
            expected, pending = confirm_reference(n, pairs[:stop], answers[:stop])
            assert torch.equal(relation_of(rel.relation, n), expected), (pairs, answers, stop)
            assert rel.unconfirmed()[0].tolist() == pending, (pairs, answers, stop)
            conflicts = disagreeing(expected, pairs[:stop], answers[:stop])
            assert rel.contradictions()[0].tolist() == conflicts
            for p in set(before) - set(pending):
                confirmed += p not in conflicts
                dropped += p in conflicts
            waited += len(set(pending) - set(before))
            before = pending
    assert waited > 0 and confirmed > 0 and dropped > 0, (waited, confirmed, dropped)


def test_confirm_is_derived_from_the_log_whatever_the_batches():
    """Random logs with repeats and noise, fed in batches of 1..5 (what record and
    refresh do): after each batch, the relation, pending merges and contradictions are
    those of the log so far fed at once (what reopen does)."""
    n, pending_seen = 12, 0
    for seed in range(8):
        pairs, answers = repeated_answers(n, 40, seed, n_pairs=25, n_classes=2)
        log = [(i, j, a) for (i, j), a in zip(pairs, answers)]
        batched = ConfirmRelation()
        g = torch.Generator().manual_seed(200 + seed)
        start = 0
        while start < len(log):
            stop = start + int(torch.randint(1, 6, (1,), generator=g))
            batched.extend(log[start:stop])
            whole = ConfirmRelation()
            whole.extend(log[:stop])
            ids = torch.arange(n)
            assert torch.equal(relation_of(whole.relation, n), relation_of(batched.relation, n)), (seed, stop)
            assert torch.equal(whole.relation.components(ids), batched.relation.components(ids))
            assert whole.unconfirmed()[0].tolist() == batched.unconfirmed()[0].tolist(), (seed, stop)
            assert whole.contradictions()[0].tolist() == batched.contradictions()[0].tolist()
            check_confirm_state(whole, answers, n)
            pending_seen += whole.unconfirmed()[0].numel()
            start = stop
    assert pending_seen > 0  # the logs do exercise pending merges


# ---------------------------------------------------------------- annotators
#: (source, i, j, alike) in log order; the 9th and the 12th answers are retracted. Counted by hand:
#: pair {0,1}: F (cy), T (ann), T (bob) -> majority alike; {2,3}: F, F -> different;
#: {4,5}: T (cy), F (dan) -> a tie, no majority; {0,2}: T (ann), F (cy) -> a tie; {7,8}
#: once (eve); {5,6} and {9,10} only in retracted answers.
ANNOTATED = [
    ("cy", 0, 1, False),
    ("ann", 0, 1, True),
    ("bob", 1, 0, True),
    ("ann", 2, 3, False),
    ("bob", 3, 2, False),
    ("cy", 4, 5, True),
    ("ann", 0, 2, True),
    ("cy", 2, 0, False),
    ("bob", 5, 6, True),
    ("dan", 4, 5, False),
    ("eve", 7, 8, True),
    ("zed", 9, 10, True),  # retracted, zed's only answer: zed is not listed
]
#: answers (the retracted one left out), repeated, agreement: the same under every policy.
#: An answer on a tied pair agrees with no majority: counted in answers, not in repeated
#: (cy on {4,5} and {0,2}, ann on {0,2}, dan on {4,5}).
COUNTS = {"cy": (3, 1, 0.0), "ann": (3, 2, 1.0), "bob": (2, 2, 1.0), "dan": (1, 0, None), "eve": (1, 0, None)}
#: contradictions. "first" and "confirm" (no two groups meet): the answers after the
#: first one of a pair that disagree with it (ann and bob on {0,1}, cy on {0,2}, dan on
#: {4,5}); "majority": the answers against their pair's majority (cy on {0,1}); the tied
#: pairs {4,5} and {0,2} are unknown (no other pair implies them), so none of theirs.
CONTRADICTIONS = {
    "first": {"cy": 1, "ann": 1, "bob": 1, "dan": 1, "eve": 0},
    "majority": {"cy": 1, "ann": 0, "bob": 0, "dan": 0, "eve": 0},
    "confirm": {"cy": 1, "ann": 1, "bob": 1, "dan": 1, "eve": 0},
}


@pytest.mark.parametrize("policy", POLICIES)
def test_annotators_counts_answers_agreement_and_contradictions(store_path, policy):
    with RelationStore(store_path, policy=policy) as s:
        assert s.annotators() == {}
        ids = [s.record([[i, j]], [a], source=who)[0] for who, i, j, a in ANNOTATED]
        s.retract([ids[8], ids[11]], source="bob")
        expected = {
            who: AnnotatorStats(*COUNTS[who], CONTRADICTIONS[policy][who]) for who in ("cy", "ann", "bob", "dan", "eve")
        }
        got = s.annotators()
        assert got == expected and list(got) == list(expected)  # in order of first answer
        assert sum(a.contradictions for a in got.values()) == s.n_conflicts
    with RelationStore(store_path, policy=policy, readonly=True) as again:
        assert again.annotators() == expected


def test_annotators_sees_answers_of_other_writers(store_path):
    with RelationStore(store_path) as a, RelationStore(store_path, policy="majority") as b:
        a.record([[0, 1]], [True], source="ann")
        assert b.annotators() == {}
        b.refresh()
        assert b.annotators() == {"ann": AnnotatorStats(1, 0, None, 0)}
        a.record([[1, 0]], [False], source="bob")  # a tie: no majority to agree with
        b.refresh()
        assert b.annotators() == {"ann": AnnotatorStats(1, 0, None, 0), "bob": AnnotatorStats(1, 0, None, 0)}
        a.record([[0, 1]], [False], source="bob")
        b.refresh()
        assert b.annotators() == {"ann": AnnotatorStats(1, 1, 0.0, 1), "bob": AnnotatorStats(2, 2, 1.0, 0)}


# --------------------------------------------------------------------- errors
@pytest.mark.parametrize("policy", ["majority ", "Majority", "vote", None, 1])
def test_unknown_policy_is_refused(policy):
    with pytest.raises(
        ValueError, match=r"RelationStore: policy must be one of 'first', 'majority', 'confirm' .*, got "
    ):
        RelationStore(policy=policy)
    with pytest.raises(ValueError, match=r"Relation: policy must be one of"):
        make_relation(policy)
