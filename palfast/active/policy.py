"""How a store resolves answers that disagree: the answer-resolution policies of
:class:`palfast.active.RelationStore` (docs/active.md, "Answers from people who make
mistakes").

A store reads its log (every answer not retracted, in log order) through a policy; the
policy is how the log is *read*, not part of the file, so two processes may read one log
with different policies. The policies:

* ``"first"`` (:class:`~palfast.active.relation.Relation` itself): every answer is
  applied in log order; one that contradicts what the answers before it imply is
  ignored, so the first answer wins.
* ``"majority"`` (:class:`MajorityRelation`): each unordered pair {i, j} gets at most
  one answer, its *majority answer*: "alike" if more of its answers say alike than not,
  "different" if fewer, and none on a tie (as many of each: the pair is unknown unless
  other pairs imply it). The relation is that of ``"first"`` fed one answer per pair
  with a majority, the pairs in the order of their earliest answer (so an answer
  implied through other pairs still wins over a later pair's majority by
  transitivity). One "different" answer against one "alike" thus undoes the join, and
  a third answer settles the pair.
* ``"confirm"`` (:class:`ConfirmRelation`): as ``"first"``, except that an "alike"
  answer joining two components that both have more than one sample is held as a
  *pending merge* until a second "alike" answer across the same two components arrives
  (any pair across them, from anyone, or the same pair again); a "different" answer
  across them drops it (and is applied). See :class:`ConfirmRelation` for the details.

A *re-ask* asks the oracle again about an answer a second one could overturn
(:func:`palfast.active.select_queries`' ``reask``): :meth:`ConfirmRelation.reask_candidates`
(the pending merges) and :meth:`MajorityRelation.reask_candidates` (every "alike" that
joined two components by one vote, a single sample joined to a class too, and the tied
pairs the relation does not know) list them as :class:`ReaskCandidates`, with the number
of sample pairs a wrong answer joins, whether one side was a single sample and whether
the pair is *contested* (a tie: no answer applied, the next one settles it);
:func:`palfast.active.strategies.reask_order` orders them. Under ``"first"`` a repeat
changes nothing (:func:`check_reask`).

Under ``"confirm"`` an "alike" answer touching a component of one sample is applied at
once, never pending, so it is no re-ask candidate: a later "different" about the pair is
a contradiction that first-answer-wins ignores. For a person who errs, ``"majority"``
with re-asks is the policy that can overturn a wrong single-sample join (one "different"
answer against one "alike" makes a tie, which undoes it). ``"confirm"`` is left so on
purpose: holding single joins
back would hold back most of a run's growth (a class grows one sample at a time), and
holding only those the embedding finds unlikely would make the relation depend on the
embeddings, where every policy is a reading of the log alone (docs/active.md).

Under every policy a *contradiction* is an answer (not retracted) whose pair the
relation knows with the opposite answer: :meth:`Relation.contradictions`. Under
``"first"`` these are exactly the answers that contradicted what the answers before
them implied (that relation only grows); under ``"majority"`` they are the answers the
majority (or transitivity) overruled, and none of a tied pair's answers unless other
pairs imply it; under ``"confirm"`` a pending answer is not one
until a "different" answer drops its merge.

Example::

    >>> from palfast.active.policy import make_relation
    >>> log = [(0, 1, True), (2, 3, True), (1, 2, True), (1, 2, False), (1, 2, False)]
    >>> for policy in ("first", "majority", "confirm"):
    ...     rel = make_relation(policy)
    ...     _ = rel.extend(log)
    ...     print(policy, rel.relation.same(0, 3), rel.n_conflicts)
    first True 2
    majority False 1
    confirm False 1

Under ``"majority"`` the first four answers alone tie on {1, 2}: the pair is unknown, and
none of its answers is a contradiction; it is the one re-ask candidate left (contested)::

    >>> rel = make_relation("majority")
    >>> _ = rel.extend(log[:4])
    >>> rel.relation.same(1, 2), rel.relation.same(0, 1), rel.n_conflicts
    (None, True, 0)
    >>> c = rel.reask_candidates()
    >>> c.pairs.tolist(), c.consequence.tolist(), c.contested.tolist()
    ([[0, 1], [2, 3], [1, 2]], [1, 1, 4], [False, False, True])
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .._checks import check_number
from .relation import Relation

__all__ = [
    "POLICIES",
    "ConfirmRelation",
    "MajorityRelation",
    "ReaskCandidates",
    "check_policy",
    "check_policy_options",
    "check_reask",
    "make_relation",
]

#: The answer-resolution policies, the default first.
POLICIES = ("first", "majority", "confirm")


def check_policy(op: str, policy) -> str:
    """``policy`` if it names one of :data:`POLICIES`, else a ``ValueError`` naming ``op``."""
    if not isinstance(policy, str) or policy not in POLICIES:
        raise ValueError(
            f"{op}: policy must be one of {', '.join(repr(p) for p in POLICIES)} "
            f"(how disagreeing answers are resolved; docs/active.md), got {policy!r}"
        )
    return policy


def check_reask(op: str, reask, policy: str, readonly: bool) -> float:
    """``reask`` (:func:`palfast.active.select_queries`' share of the budget spent on
    re-asks) as a float in [0, 1], or a clear error naming ``op``: a share above 0 needs a
    store that can record the new answers (not ``readonly``) and a ``policy`` under which
    a repeated answer can change the relation (``"confirm"`` or ``"majority"``)."""
    reask = check_number(op, "reask", reask, 0.0, maximum=1.0)
    if reask > 0:
        check_reask_store(op, f"reask={reask:g} asks", policy, readonly, ", or pass reask=0")
    return reask


def check_reask_store(op: str, what: str, policy: str, readonly: bool, otherwise: str = "") -> None:
    """A clear error naming ``op`` unless a store of ``policy`` opened with ``readonly``
    can take re-asks (:func:`check_reask`'s rules). ``what`` is the subject of the
    message (``"reask=0.2 asks"``), ``otherwise`` ends each remedy (``", or pass
    reask=0"``)."""
    if readonly:
        raise ValueError(
            f"{op}: {what} answers again, but the store was opened with readonly=True, so "
            f"the new answers could not be recorded; open it without readonly{otherwise}"
        )
    if policy == "first":
        raise ValueError(
            f"{op}: {what} answers again, which cannot change anything under policy "
            f"'first' (the first answer wins); open the store with policy='confirm' or "
            f"policy='majority' (docs/active.md, \"Answers from people who make "
            f'mistakes"){otherwise}'
        )


def check_policy_options(op: str, policy, reask) -> tuple[str, float]:
    """``(policy, reask)`` given as the command-line options ``--policy`` and ``--reask``
    of ``palfast demo`` and ``palfast annotate``, checked before any
    work, the errors naming the options and how to fix them (:func:`check_reask` says the
    same to Python callers, naming the arguments). ``op`` leads each message unless
    empty (a caller that adds its own prefix)."""
    op = f"{op}: " if op else ""
    if policy not in POLICIES:
        raise ValueError(f"{op}--policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if not isinstance(reask, int | float) or not 0 <= reask <= 1:  # also refuses nan
        raise ValueError(f"{op}--reask must be a share in [0, 1] of the questions, got {reask}")
    if reask > 0 and policy == "first":
        raise ValueError(
            f"{op}--reask {reask:g} asks answers again, which changes nothing under "
            f"--policy first (the first answer wins); add --policy confirm or --policy "
            f"majority, or leave --reask at 0"
        )
    return policy, float(reask)


def make_relation(policy: str = "first", name: str = "Relation"):
    """The relation a log implies under ``policy`` (see the module docstring): a
    :class:`Relation` for ``"first"``, else a :class:`MajorityRelation` or
    :class:`ConfirmRelation`. Each has ``extend``, ``clear``, ``answers``,
    ``answer_at``, ``n_queries``, ``n_conflicts``, ``contradictions`` and ``relation``
    (the :class:`Relation` that answers ``same``, ``components``, ``graph``, ...)."""
    policy = check_policy(name, policy)
    if policy == "first":
        return Relation(name)
    return (MajorityRelation if policy == "majority" else ConfirmRelation)(name)


class ReaskCandidates(NamedTuple):
    """The answers a repeat could overturn, one row per pair (``reask_candidates`` of the
    policies and of :class:`palfast.active.RelationStore`), in the order the policy lists
    them: ``pairs`` LongTensor [P, 2] (sample ids, the pair to ask again),
    ``consequence`` LongTensor [P] (|C_i|·|C_j|, the sample pairs the answer joins or
    would join), ``single`` BoolTensor [P] (one of the two components was one sample)
    and ``contested`` BoolTensor [P] (under ``"majority"``, the pair's answers tie: it has
    no answer, and the next one settles it; never under ``"confirm"``).
    :func:`palfast.active.select_queries` orders them by :func:`reask_order
    <palfast.active.strategies.reask_order>`."""

    pairs: torch.Tensor
    consequence: torch.Tensor
    single: torch.Tensor
    contested: torch.Tensor

    @classmethod
    def of(cls, rows) -> ReaskCandidates:
        """From rows ``(i, j, consequence, single, contested)``."""
        out = torch.tensor(rows, dtype=torch.long).reshape(-1, 5)
        return cls(out[:, :2], out[:, 2], out[:, 3].bool(), out[:, 4].bool())


def _key(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a < b else (b, a)


class _Resolved:
    """A log read through a policy: every answer is kept (:meth:`answers`,
    :attr:`n_queries`) and :attr:`relation`, a :class:`Relation`, is fed what the
    policy makes of them (a subclass's ``_resolve``). The contradictions are the
    answers :attr:`relation` disagrees with, computed when asked."""

    def __init__(self, name: str = "Relation"):
        self.relation = Relation(name)
        self.clear()

    def clear(self) -> None:
        """Forget every answer (a store replays its log after a retraction)."""
        self.relation.clear()
        self._log_i: list[int] = []  # every answer, in order
        self._log_j: list[int] = []
        self._log_a: list[bool] = []
        self._conflict_cache: list[int] | None = None

    # The log's queries are Relation's: they read _log_i, _log_j, _log_a and _conflicts.
    answers = Relation.answers
    answer_at = Relation.answer_at
    n_queries = Relation.n_queries
    n_conflicts = Relation.n_conflicts
    contradictions = Relation.contradictions

    @property
    def _conflicts(self) -> list[int]:
        if self._conflict_cache is None:
            self._conflict_cache = self._disagreeing(0)
        return self._conflict_cache

    def _disagreeing(self, start: int) -> list[int]:
        """Positions ≥ ``start`` of the answers :attr:`relation` knows the opposite of."""
        verdict = self.relation.verdicts(
            np.asarray(self._log_i[start:], dtype=np.int64), np.asarray(self._log_j[start:], dtype=np.int64)
        )
        alike = np.asarray(self._log_a[start:], dtype=np.int8)
        return (np.flatnonzero((verdict >= 0) & (verdict != alike)) + start).tolist()

    def extend(self, answers) -> list[int]:
        """Apply ``answers``, an iterable of ``(i, j, alike)``, after those already
        applied; returns the positions (in :meth:`answers`) of those among them that are
        contradictions once they are applied."""
        start = len(self._log_a)
        self._resolve(answers)
        self._conflict_cache = None
        return self._disagreeing(start)

    def _log(self, i: int, j: int, alike: bool) -> None:
        self._log_i.append(i)
        self._log_j.append(j)
        self._log_a.append(alike)

    def _resolve(self, answers) -> None:
        raise NotImplementedError


class MajorityRelation(_Resolved):
    """Policy ``"majority"`` (module docstring): one answer per unordered pair, its
    majority answer, fed to :attr:`relation` in the order of each pair's earliest answer;
    a pair whose answers tie (as many "alike" as "different") feeds nothing, so the
    relation knows it only if other pairs imply it.

    A new pair is applied at once (it comes last in that order); a repeated answer that
    changes its pair's majority (a tie included) replays every pair (O(pairs), a
    union-find cannot undo a merge), one that does not change it leaves the relation as
    it is.
    """

    def clear(self) -> None:
        super().clear()
        # {i, j} as (min, max) -> [i, j of its earliest answer, alike count, different
        # count, rank], in order of the earliest answer (rank: the position in that order).
        self._pairs: dict[tuple[int, int], list] = {}
        # {i, j} -> (|C_i|, |C_j|) when its majority answer "alike" joined two
        # components (recorded as the relation applies it), in the order it did.
        self._joined: dict[tuple[int, int], tuple[int, int]] = {}
        self._tied: dict[tuple[int, int], int] = {}  # the tied pairs -> their rank

    def reask_candidates(self) -> ReaskCandidates:
        """The answers one more answer about the same pair could overturn or settle: a
        :class:`ReaskCandidates`, ``consequence`` being |C_i|·|C_j|, ``single`` whether
        one of the two components is one sample (a sample joined to a class, or two
        samples). First, in the order the relation applied them, the pairs whose majority
        answer "alike" joined two components by one vote (one more "alike" than
        "different": 1 to 0, 2 to 1, ...), with the sizes of the two components when it
        joined them, not ``contested``; then, in the order of their earliest answer, the
        tied pairs the relation does not know (no answer applied, none implied), with the
        sizes of their two components now, ``contested``.

        Asking a one-vote join again adds a vote: "different" makes a tie, which gives the
        pair no answer, so the join is undone (the pair is now a contested candidate);
        "alike" settles it (2 to 0, 3 to 1). Asking a tied pair again settles it either
        way: "different" keeps the two components apart (2 to 1, no longer a candidate),
        "alike" joins them, by one vote (2 to 1: a one-vote join, a candidate again, with
        the same odds of being wrong as a single "alike"). A tied pair the relation
        knows through other pairs is no candidate: one more answer about it is outvoted
        by those pairs (or, earlier in the order, overrules them) like any other answer,
        and the strategies never ask a known pair."""
        rows = []
        for key, (size_i, size_j) in self._joined.items():
            i, j, n_alike, n_different, _ = self._pairs[key]
            if n_alike - n_different == 1:
                rows.append((i, j, size_i * size_j, min(size_i, size_j) == 1, False))
        if self._tied:
            rel = self.relation
            tied = [self._pairs[key] for key in sorted(self._tied, key=self._tied.__getitem__)]
            i = np.asarray([e[0] for e in tied], dtype=np.int64)
            j = np.asarray([e[1] for e in tied], dtype=np.int64)
            for a, b, verdict in zip(i.tolist(), j.tolist(), rel.verdicts(i, j).tolist()):
                if verdict < 0:
                    size_a, size_b = self._size(a), self._size(b)
                    rows.append((a, b, size_a * size_b, min(size_a, size_b) == 1, True))
        return ReaskCandidates.of(rows)

    def _size(self, i: int) -> int:
        """The size of the component of sample ``i`` now (1: a sample the relation never saw)."""
        rel = self.relation
        d = rel._dense.get(i)
        return 1 if d is None else rel._size[rel._find(d)]

    def _apply(self, answers) -> None:
        """Feed ``(i, j, majority)`` to the relation, recording the joins it makes."""
        rel, joined = self.relation, []
        rel.extend(answers, joined)
        for position, size_i, size_j in joined:
            self._joined[_key(rel._log_i[position], rel._log_j[position])] = (size_i, size_j)

    @staticmethod
    def _majority(entry: list) -> bool | None:
        """A pair's majority answer: True ("alike"), False ("different"), None on a tie."""
        _, _, n_alike, n_different, _ = entry
        return None if n_alike == n_different else n_alike > n_different

    def _resolve(self, answers) -> None:
        pairs, majority, tied = self._pairs, self._majority, self._tied
        fresh = []  # pairs first answered here, in order: they extend the relation
        replay = False
        for i, j, alike in answers:
            self._log(i, j, alike)
            key = _key(i, j)
            entry = pairs.get(key)
            if entry is None:
                pairs[key] = [i, j, int(alike), int(not alike), len(pairs)]
                fresh.append((i, j, alike))
                continue
            before = majority(entry)
            entry[2 if alike else 3] += 1
            after = majority(entry)
            if after is None:
                tied[key] = entry[4]
            else:
                tied.pop(key, None)
            replay |= after != before
        if replay:
            self.relation.clear()
            self._joined = {}
            resolved = ((e[0], e[1], majority(e)) for e in pairs.values())
            self._apply((i, j, alike) for i, j, alike in resolved if alike is not None)
        elif fresh:
            self._apply(fresh)


class ConfirmRelation(_Resolved):
    """Policy ``"confirm"`` (module docstring). Answers are applied in log order as
    under ``"first"``, except:

    * an "alike" answer between two components that both have more than one sample,
      not known different, is not applied: it waits as a *pending merge* of the two
      components (:meth:`unconfirmed`);
    * the next "alike" answer across the same two components (any pair, the same pair
      again, from anyone) confirms it: the components merge;
    * a "different" answer across them drops it (the "different" answer is applied; the
      pending answer becomes a contradiction);
    * when a component grows, its pending merges follow it: one that now joins
      components known different is dropped, and two that now join the same two
      components are two "alike" answers across them, so they merge.

    An "alike" answer touching a component of one sample is applied at once.
    """

    def clear(self) -> None:
        super().clear()
        # (root, root) of the two components, dense roots of relation, smaller first
        # -> positions (in answers()) of the "alike" answers waiting on that merge.
        self._pending: dict[tuple[int, int], list[int]] = {}
        self._partners: dict[int, set[int]] = {}  # dense root -> roots it has a pending merge with

    def unconfirmed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The answers whose merge waits for confirmation, in log order: ``(positions
        LongTensor [P], pairs LongTensor [P, 2])``, positions into :meth:`answers`."""
        pos = sorted(p for waiting in self._pending.values() for p in waiting)
        pairs = [[self._log_i[p], self._log_j[p]] for p in pos]
        return torch.tensor(pos, dtype=torch.long), torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)

    def reask_candidates(self) -> ReaskCandidates:
        """One pair per pending merge, the pair of its earliest waiting answer, in the
        order of those answers: a :class:`ReaskCandidates`, ``consequence`` being
        |C_i|·|C_j| with the sizes of the two components now (the sample pairs the merge
        would join); never ``single`` (a merge waits only between two components of two
        samples or more) nor ``contested`` (a "different" answer drops the merge). Asking
        the pair again confirms the merge ("alike") or drops it ("different")."""
        rel = self.relation
        rows = sorted((positions[0], rel._size[a] * rel._size[b]) for (a, b), positions in self._pending.items())
        return ReaskCandidates.of([(self._log_i[p], self._log_j[p], product, False, False) for p, product in rows])

    def _resolve(self, answers) -> None:
        rel = self.relation
        for i, j, alike in answers:
            position = len(self._log_a)
            self._log(i, j, alike)
            ri, rj = rel._find(rel._node(i)), rel._find(rel._node(j))
            if ri == rj or rj in rel._cannot.get(ri, ()):
                rel.extend([(i, j, alike)])  # a repeat or a contradiction: as "first"
                continue
            key = _key(ri, rj)
            if not alike:
                self._unpend(key)
                rel.extend([(i, j, False)])
            elif key in self._pending:  # the second "alike" answer across them
                self._unpend(key)
                self._join(i, j)
            elif rel._size[ri] > 1 and rel._size[rj] > 1:
                self._pend(key, [position])
            else:
                self._join(i, j)
        rel._cache = None  # nodes may have been created without an extend

    def _pend(self, key: tuple[int, int], positions: list[int]) -> None:
        self._pending[key] = positions
        a, b = key
        self._partners.setdefault(a, set()).add(b)
        self._partners.setdefault(b, set()).add(a)

    def _unpend(self, key: tuple[int, int]) -> list[int]:
        """Drop the pending merge ``key`` if there is one; returns its positions."""
        positions = self._pending.pop(key, [])
        if positions:
            for r, other in (key, key[::-1]):
                partners = self._partners[r]
                partners.discard(other)
                if not partners:
                    del self._partners[r]
        return positions

    def _join(self, i: int, j: int) -> None:
        """Apply "alike" (i, j), then move the pending merges of the two old components
        to the merged one (dropped, or merged in turn; see the class docstring)."""
        rel = self.relation
        todo = [(i, j)]
        while todo:
            i, j = todo.pop()
            old = {rel._find(rel._node(i)), rel._find(rel._node(j))}
            rel.extend([(i, j, True)])
            root = rel._find(rel._dense[i])
            if len(old) == 1 or rel._find(rel._dense[j]) != root:
                continue  # no merge: a repeat, or known different
            moved = [self._unpend(_key(r, q)) for r in old for q in list(self._partners.get(r, ()))]
            for positions in sorted(moved):  # in order of their earliest answer
                p = positions[0]
                ra, rb = rel._find(rel._dense[self._log_i[p]]), rel._find(rel._dense[self._log_j[p]])
                if ra == rb or rb in rel._cannot.get(ra, ()):
                    continue  # joined meanwhile, or now known different: dropped
                key = _key(ra, rb)
                if key in self._pending:  # two "alike" answers across the same components
                    self._unpend(key)
                    todo.append((self._log_i[p], self._log_j[p]))
                else:
                    self._pend(key, positions)
