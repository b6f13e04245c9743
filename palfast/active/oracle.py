"""Oracles answer "are samples i and j alike?" (docs/active.md).

Two ways to ask:

* :meth:`Oracle.ask` takes independent pairs ``[Q, 2]``: Q interactions, Q pairs.
* :meth:`Oracle.ask_batch` shows one anchor and K candidates at once, "à la
  captcha" (PAL, Fig. 1: "select the images alike this one"): one interaction,
  K pairs answered.

Every oracle counts ``n_pairs`` (pairs answered) and ``n_interactions`` (questions
put to it); ``n_queries`` is ``n_pairs``.

Example::

    >>> import torch
    >>> from palfast.active import LabelOracle
    >>> oracle = LabelOracle(torch.tensor([0, 0, 1, 1]))
    >>> oracle.ask(torch.tensor([[0, 1], [1, 2]])).tolist()
    [True, False]
    >>> oracle.ask_batch(3, torch.tensor([0, 2])).tolist(), oracle.n_pairs, oracle.n_interactions
    ([False, True], 4, 3)
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch

from .._checks import check_callable, check_int
from .relation import as_pairs

__all__ = ["MAX_NOISE", "CallbackOracle", "LabelOracle", "Oracle", "check_noise"]

#: The largest flip probability of :class:`LabelOracle`. At 0.5 every answer is a coin
#: toss; above it the annotator is wrong more often than right, which is not noise but
#: an oracle answering the opposite question (flip its answers instead).
MAX_NOISE = 0.5


def check_noise(op: str, name: str, value) -> float:
    """``value`` as a flip probability in [0, :data:`MAX_NOISE`], or a clear error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not 0.0 <= value <= MAX_NOISE:  # also refuses nan
        raise ValueError(
            f"{op}: {name} must be a probability in [0, {MAX_NOISE:g}] (the chance "
            f"that an answer is flipped; above {MAX_NOISE:g} the annotator is wrong "
            f"more often than right), got {value}"
        )
    return value


class Oracle:
    """Base class. Subclasses implement :meth:`_answer` (pairs ``[Q, 2]`` on CPU →
    BoolTensor ``[Q]``); this class validates the question and counts."""

    def __init__(self):
        self.n_pairs = 0
        self.n_interactions = 0

    @property
    def n_queries(self) -> int:
        """Pairs answered so far (same as ``n_pairs``)."""
        return self.n_pairs

    def ask(self, pairs) -> torch.Tensor:
        """Answer ``pairs [Q, 2]`` (sample ids): BoolTensor ``[Q]``, True = alike.
        Counts Q pairs and Q interactions."""
        p = as_pairs(pairs)
        out = self._checked(p)
        self.n_pairs += p.shape[0]
        self.n_interactions += p.shape[0]
        return out

    def ask_batch(self, anchor, candidates) -> torch.Tensor:
        """Which of ``candidates [K]`` are alike ``anchor``? BoolTensor ``[K]``.
        Counts K pairs and one interaction."""
        c = torch.as_tensor(candidates)
        if c.dim() != 1:
            raise ValueError(
                f"Oracle.ask_batch: candidates must be a 1-D tensor of sample ids, got shape {tuple(c.shape)}"
            )
        a = torch.as_tensor(anchor)
        if a.numel() != 1:
            raise ValueError(f"Oracle.ask_batch: anchor must be one sample id, got shape {tuple(a.shape)}")
        p = as_pairs(
            torch.stack([a.reshape(()).expand(c.shape[0]), c.to(a.device)], 1)
            if c.numel()
            else torch.zeros(0, 2, dtype=torch.long),
            "anchor/candidates",
        )
        out = self._checked(p, batch=True)
        self.n_pairs += p.shape[0]
        self.n_interactions += 1
        return out

    def _checked(self, p: torch.Tensor, batch: bool = False) -> torch.Tensor:
        if p.shape[0] == 0:
            return torch.zeros(0, dtype=torch.bool)
        out = self._answer_batch(p) if batch else self._answer(p)
        out = torch.as_tensor(out)
        if out.shape != (p.shape[0],):
            raise ValueError(
                f"{type(self).__name__}: the oracle must return one answer per pair "
                f"([{p.shape[0]}]), got shape {tuple(out.shape)}"
            )
        if out.dtype != torch.bool:
            if out.dtype.is_floating_point or not bool(((out == 0) | (out == 1)).all()):
                raise TypeError(f"{type(self).__name__}: the oracle must return bools, got {out.dtype}")
            out = out.bool()
        return out.cpu()

    def _answer(self, pairs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _answer_batch(self, pairs: torch.Tensor) -> torch.Tensor:
        """One anchor (``pairs[:, 0]`` all equal), many candidates; default: pairwise."""
        return self._answer(pairs)


class LabelOracle(Oracle):
    """Simulated oracle: i and j are alike iff ``labels[i] == labels[j]``.

    Args:
        labels: ``[N]`` integer class of each sample id.
        noise: probability in [0, :data:`MAX_NOISE`] that an answer is flipped (a
            careless annotator).
        seed: seeds the flips (reproducible noise).
    """

    def __init__(self, labels, noise: float = 0.0, seed: int | None = 0):
        super().__init__()
        y = torch.as_tensor(labels)
        if y.dim() != 1 or y.numel() == 0:
            raise ValueError(f"LabelOracle: labels must be a non-empty 1-D tensor, got shape {tuple(y.shape)}")
        if y.dtype.is_floating_point or y.dtype.is_complex:
            raise TypeError(f"LabelOracle: labels must be integers, got {y.dtype}")
        self.noise = check_noise("LabelOracle", "noise", noise)
        self.labels = y.to(device="cpu", dtype=torch.long)
        seed = 0 if seed is None else check_int("LabelOracle", "seed", seed)
        self._gen = torch.Generator().manual_seed(seed)

    def _answer(self, pairs: torch.Tensor) -> torch.Tensor:
        n = self.labels.numel()
        if int(pairs.max()) >= n:
            raise ValueError(f"LabelOracle: sample ids must be < {n} (number of labels), got {int(pairs.max())}")
        out = self.labels[pairs[:, 0]] == self.labels[pairs[:, 1]]
        if self.noise > 0:
            out ^= torch.rand(out.shape[0], generator=self._gen) < self.noise
        return out


class CallbackOracle(Oracle):
    """Oracle backed by a function, e.g. a person at a terminal or a web service.

    Args:
        fn: ``fn(pairs LongTensor [Q, 2]) -> [Q]`` bools (any sequence or tensor).
        batch_fn: optional ``batch_fn(anchor: int, candidates LongTensor [K]) -> [K]``
            bools for :meth:`ask_batch` (a captcha-style screen); without it,
            ``ask_batch`` calls ``fn`` on the K pairs (still counted as one interaction).
    """

    def __init__(self, fn: Callable, batch_fn: Callable | None = None):
        super().__init__()
        self.fn = check_callable("CallbackOracle", "fn", fn, "fn(pairs [Q, 2]) -> [Q] bools")
        self.batch_fn = (
            None
            if batch_fn is None
            else check_callable("CallbackOracle", "batch_fn", batch_fn, "batch_fn(anchor, candidates [K]) -> [K] bools")
        )

    def _answer(self, pairs: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.fn(pairs.clone()))

    def _answer_batch(self, pairs: torch.Tensor) -> torch.Tensor:
        if self.batch_fn is None:
            return self._answer(pairs)
        return torch.as_tensor(self.batch_fn(int(pairs[0, 0]), pairs[:, 1].clone()))
