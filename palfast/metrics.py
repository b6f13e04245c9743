"""Evaluation of representations (README.md): RankMe, k-NN accuracy, linear probe;
and the summaries of a learning curve (accuracy against queries) that ``palfast demo``
and ``palfast bench --only strategies`` print.

The three evaluations take embeddings as tensors (any float dtype, any device; they are
evaluated in float64/float32 on the CPU, outside autograd) and return Python floats.

Example::

    >>> import torch
    >>> from palfast.metrics import rankme, knn_accuracy
    >>> round(rankme(torch.eye(4)), 4)      # 4 equal singular values: rank 4
    4.0
    >>> z = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    >>> y = torch.tensor([0, 0, 1, 1])
    >>> knn_accuracy(z, y, z, y, k=1)
    1.0
"""

from __future__ import annotations

import torch

from ._checks import as_long_vector, check_id_vector, check_int, check_number, check_tensor
from .knn import knn

__all__ = [
    "area_under_curve",
    "knn_accuracy",
    "linear_probe_accuracy",
    "merged_classes",
    "queries_to_reach",
    "rankme",
]


def _check_z(op: str, name: str, z) -> torch.Tensor:
    return check_tensor(op, name, z, min_rows=1, finite=True).detach()


def _check_y(op: str, name: str, y, n: int) -> torch.Tensor:
    return check_id_vector(op, name, y, n, "class id")


def _check_pair(op, train_z, train_y, test_z, test_y):
    train_z = _check_z(op, "train_z", train_z)
    test_z = _check_z(op, "test_z", test_z)
    if train_z.shape[1] != test_z.shape[1]:
        raise ValueError(
            f"{op}: train_z and test_z must have the same width D, got {train_z.shape[1]} and {test_z.shape[1]}"
        )
    return (
        train_z,
        _check_y(op, "train_y", train_y, train_z.shape[0]),
        test_z,
        _check_y(op, "test_y", test_y, test_z.shape[0]),
    )


def rankme(z: torch.Tensor, eps: float = 1e-7) -> float:
    r"""RankMe (Garrido et al., 2023), a smooth effective rank of the embeddings.

    .. math::
        \mathrm{RankMe}(z) = \exp\Big(-\sum_k p_k \log p_k\Big),\qquad
        p_k = \frac{\sigma_k(z)}{\lVert\sigma(z)\rVert_1} + \varepsilon

    with σ(z) the singular values of ``z [N, D]`` (not centred), computed in float64.
    Between ~1 (collapse) and min(N, D) (all directions equally used)."""
    op = "palfast.metrics.rankme"
    z = _check_z(op, "z", z)
    eps = check_number(op, "eps", eps, 0.0)
    s = torch.linalg.svdvals(z.cpu().double())
    total = s.sum()
    if float(total) == 0.0:
        return 1.0  # all-zero embeddings: fully collapsed
    p = s / total + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def knn_accuracy(
    train_z: torch.Tensor, train_y, test_z: torch.Tensor, test_y, k: int = 20, *, backend: str = "auto"
) -> float:
    """Accuracy of a k-nearest-neighbour classifier by cosine similarity.

    Each test row takes the majority class among its k most similar training rows
    (FAISS ``IndexFlatIP`` on L2-normalised float32 rows, or an exact torch search);
    a tie goes to the tied class whose best neighbour ranks first. ``k`` is clamped
    to the number of training rows. Returns the fraction of test rows classified
    correctly."""
    op = "palfast.metrics.knn_accuracy"
    train_z, train_y, test_z, test_y = _check_pair(op, train_z, train_y, test_z, test_y)
    k = min(check_int(op, "k", k, 1), train_z.shape[0])
    _, nbrs = knn(test_z, k, keys=train_z, backend=backend, op=op, finite=False)
    nbrs = nbrs.cpu()
    # Class ids may be any int64 (10**9, say): vote over dense indices of the
    # classes present, so memory follows the number of classes, not the largest id.
    classes, dense_y = torch.unique(train_y, return_inverse=True)
    votes = dense_y[nbrs]  # [M, k], best neighbour first
    n_cls = classes.numel()
    counts = torch.zeros(votes.shape[0], n_cls).scatter_add_(1, votes, torch.ones(votes.shape))
    # Tie-break: among classes with the most votes, the one with the best-ranked neighbour.
    first = torch.full((votes.shape[0], n_cls), float(k))
    first.scatter_reduce_(1, votes, torch.arange(k).float().expand_as(votes).contiguous(), "amin")
    pred = classes[(counts * (k + 1) - first).argmax(1)]
    return float((pred == test_y).float().mean())


def linear_probe_accuracy(
    train_z: torch.Tensor, train_y, test_z: torch.Tensor, test_y, *, c: float = 1.0, max_iter: int = 1000
) -> float:
    """Test accuracy of a linear classifier trained on frozen features.

    Features are standardised with the training mean and standard deviation, then a
    multinomial logistic regression with L2 penalty (scikit-learn
    ``LogisticRegression(C=c, solver="lbfgs")``, deterministic) is fitted on the
    training rows. Returns the fraction of test rows classified correctly."""
    op = "palfast.metrics.linear_probe_accuracy"
    train_z, train_y, test_z, test_y = _check_pair(op, train_z, train_y, test_z, test_y)
    c = check_number(op, "c", c, 0.0, strict=True)
    max_iter = check_int(op, "max_iter", max_iter, 1)
    if torch.unique(train_y).numel() < 2:
        raise ValueError(f"{op}: train_y must contain at least 2 classes, got {torch.unique(train_y).tolist()}")
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    a = train_z.cpu().double()
    b = test_z.cpu().double()
    mean, std = a.mean(0), a.std(0, unbiased=False).clamp_min(1e-12)
    a, b = ((a - mean) / std).numpy(), ((b - mean) / std).numpy()
    clf = LogisticRegression(C=c, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(a, train_y.numpy())
    return float((torch.from_numpy(clf.predict(b)) == test_y).float().mean())


# --------------------------------------------------- learning curves (accuracy vs queries)
def area_under_curve(queries: list[int], acc: list[float]) -> float:
    """Mean accuracy over the query range (trapezoids, divided by the range): 1.0 means
    perfect from the first query on; a single point is its own value."""
    if len(queries) < 2 or queries[-1] == queries[0]:
        return acc[-1]
    area = sum((q1 - q0) * (a0 + a1) / 2 for q0, q1, a0, a1 in zip(queries, queries[1:], acc, acc[1:]))
    return area / (queries[-1] - queries[0])


def queries_to_reach(queries: list[int], acc: list[float], target: float) -> int | None:
    """The first checkpoint (queries) whose accuracy is ≥ target; None if never."""
    return next((q for q, a in zip(queries, acc) if a >= target), None)


def merged_classes(components, labels) -> int:
    """How many known classes hold samples of two true classes or more: ``components [N]``
    the component of each sample (``RelationStore.components``: −1 for a sample with no
    known positive), ``labels [N]`` its true class. 0 when the answers never joined two
    classes (a wrong "alike" answer, or a noisy oracle's, that the store followed).

        >>> merged_classes(torch.tensor([5, 5, 5, -1, 7]), torch.tensor([0, 0, 1, 1, 2]))
        1
    """
    op = "palfast.metrics.merged_classes"
    comp = as_long_vector(op, "components", components).cpu()
    y = check_id_vector(op, "labels", labels, comp.numel(), "class id")
    known = comp >= 0
    # Distinct (component, class) pairs, then the components that have more than one.
    pairs = torch.unique(torch.stack([comp[known], y[known]], 1), dim=0)
    _, per_component = torch.unique_consecutive(pairs[:, 0], return_counts=True)
    return int((per_component > 1).sum())
