"""The tasks of the strategy suite (``bench_strategies.py``): data, views and encoder size.

Every task is a fixed, stratified split of one data set into a *pool* (2/3, the samples
the oracle is asked about) and a *test* set (1/3), the same for every seed and strategy,
plus the views the encoder trains on. No download: scikit-learn's bundled sets and
generators written here, seeded.

* ``digits-views``: scikit-learn's digits (8×8 images, 10 classes) with the demo's views
  (±1 pixel shift + Gaussian noise, ``palfast.demo.augment``): the views alone teach most
  of the classes (docs/active.md, "The demo").
* ``digits-noviews``: the same images, no views: the loss sees only the answers.
* ``rings``, ``spirals``, ``blobs``: 2-D manifolds (3 concentric rings; 3 interleaved
  spiral arms; 4 Gaussian blobs that overlap) placed in :data:`SYNTH_DIM` dimensions with
  :data:`SYNTH_NUISANCE` extra Gaussian dimensions of the same spread, mixed by a random
  rotation. The views add Gaussian noise to every dimension alike, so they cannot tell
  the class-bearing plane from the nuisance dimensions: the views do not separate the
  classes, the answers must.
* ``iris``, ``wine``, ``breast-cancer``: scikit-learn's bundled tabular sets,
  standardised with the pool's mean and spread, Gaussian-noise views.

Every task has a :attr:`Task.noise`-free form; the suite runs each one again with a
noisy oracle (``LabelOracle(noise=...)``) at the levels it is given.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["TASKS", "Task", "load_task", "resolve_tasks"]

#: Fixed seed of every split and generated data set: the data are the same in every run;
#: the run's seed changes the initial weights, the views, the oracle's flips and the
#: strategies' randomness.
DATA_SEED = 0
#: Share of each data set kept as the test set (the rest is the pool), as the demo.
TEST_SHARE = 1 / 3
#: Samples generated per synthetic task: a pool of 600 keeps a run to about a second on
#: one CPU thread while 300 queries still cover only part of it.
SYNTH_SAMPLES = 900
#: Dimensions of the synthetic tasks: the 2-D manifold plus SYNTH_NUISANCE dimensions of
#: pure noise (as much spread as the manifold's coordinates), mixed by a rotation. With 4
#: nuisance dimensions an MLP classifier fitted on 300 labelled pool samples reaches about
#: 90 % on rings and spirals (with 6, spirals stayed near 70 %: too hard to tell strategies
#: apart at these budgets).
SYNTH_DIM = 6
SYNTH_NUISANCE = SYNTH_DIM - 2
#: Standard deviation of a Gaussian-noise view on standardised features (digits' noise
#: view uses the same 0.1 on pixels in [0, 1]).
VIEW_NOISE = 0.1


def noise_view(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One view of standardised rows ``[B, D]``: N(0, VIEW_NOISE²) added to every feature."""
    return x + VIEW_NOISE * torch.randn(x.shape, generator=gen)


@dataclasses.dataclass(frozen=True)
class Task:
    """One benchmark task. ``load() -> (x_pool, y_pool, x_test, y_test)`` (float32 rows,
    int64 classes); ``views`` makes one view of a batch (None: no views); ``hidden`` and
    ``dim`` size the MLP encoder in → hidden → hidden → dim; ``views_teach`` says whether
    the views alone already teach the classes (the suite's report separates those tasks)."""

    name: str
    load: Callable[[], tuple]
    views: Callable | None
    description: str
    views_teach: bool = False
    hidden: int = 64
    dim: int = 16

    def encoder(self, in_features: int) -> nn.Module:
        """A fresh MLP encoder (the caller seeds torch first)."""
        return nn.Sequential(
            nn.Linear(in_features, self.hidden),
            nn.ReLU(),
            nn.Linear(self.hidden, self.hidden),
            nn.ReLU(),
            nn.Linear(self.hidden, self.dim),
        )


# ------------------------------------------------------------------------- data
def _split(x, y):
    """Stratified pool/test split (fixed DATA_SEED) as float32/int64 tensors."""
    from sklearn.model_selection import train_test_split

    xp, xt, yp, yt = train_test_split(x, y, test_size=TEST_SHARE, stratify=y, random_state=DATA_SEED)
    as_x = lambda a: torch.as_tensor(a, dtype=torch.float32)
    as_y = lambda a: torch.as_tensor(a, dtype=torch.long)
    return as_x(xp), as_y(yp), as_x(xt), as_y(yt)


def _standardised(x, y):
    """Split, then standardise both parts with the pool's mean and spread."""
    xp, yp, xt, yt = _split(x, y)
    mean, std = xp.mean(0), xp.std(0).clamp_min(1e-6)
    return (xp - mean) / std, yp, (xt - mean) / std, yt


def _embed_plane(plane: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Standardised 2-D points ``[N, 2]`` → ``[N, SYNTH_DIM]``: the plane, then
    SYNTH_NUISANCE dimensions of N(0, 1) noise, mixed by a random rotation."""
    plane = (plane - plane.mean(0)) / plane.std(0)
    nuisance = torch.randn(plane.shape[0], SYNTH_NUISANCE, generator=gen)
    rotation, _ = torch.linalg.qr(torch.randn(SYNTH_DIM, SYNTH_DIM, generator=gen))
    return torch.cat([plane, nuisance], 1) @ rotation


def rings(n: int = SYNTH_SAMPLES, seed: int = DATA_SEED):
    """3 concentric rings (radii 1, 2, 3; radial noise σ = 0.25): ``(x [n, D], y [n])``."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    angle = 2 * math.pi * torch.rand(n, generator=gen)
    radius = (y + 1).float() + 0.25 * torch.randn(n, generator=gen)
    plane = torch.stack([radius * angle.cos(), radius * angle.sin()], 1)
    return _embed_plane(plane, gen), y


def spirals(n: int = SYNTH_SAMPLES, seed: int = DATA_SEED):
    """3 interleaved spiral arms (radius t from 0.5 to 3 at angle 2π·t/3, five sixths of a
    turn; Gaussian noise σ = 0.15 around the arm): ``(x [n, D], y [n])``."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    t = 0.5 + 2.5 * torch.rand(n, generator=gen)  # radius grows with the angle
    angle = 2 * math.pi * t / 3.0 + 2 * math.pi * y / 3
    plane = torch.stack([t * angle.cos(), t * angle.sin()], 1)
    plane = plane + 0.15 * torch.randn(n, 2, generator=gen)
    return _embed_plane(plane, gen), y


def blobs(n: int = SYNTH_SAMPLES, seed: int = DATA_SEED):
    """4 Gaussian blobs (σ = 1) with centres on a square of side 2.5, so that neighbours
    overlap (the best possible accuracy is about 90 %): ``(x [n, D], y [n])``."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    centres = 2.5 * torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    plane = centres[y] + torch.randn(n, 2, generator=gen)
    return _embed_plane(plane, gen), y


def _digits():
    from ..datasets import load_digits_split

    return load_digits_split(DATA_SEED)


def _sklearn(name: str):
    def load():
        import sklearn.datasets

        x, y = getattr(sklearn.datasets, f"load_{name}")(return_X_y=True)
        return _standardised(x, y)

    return load


def _synthetic(make):
    def load():
        return _split(*make())

    return load


def digits_view(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The demo's view of digits (``palfast.datasets.augment``: ±1 pixel shift + noise)."""
    from ..datasets import augment

    return augment(x, gen)


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            "digits-views",
            _digits,
            digits_view,
            "digits, ±1 px shift + noise views (views teach)",
            views_teach=True,
            hidden=128,
            dim=32,
        ),
        Task("digits-noviews", _digits, None, "digits, no views (only the answers)", hidden=128, dim=32),
        Task("rings", _synthetic(rings), noise_view, "3 concentric rings + 4 nuisance dims"),
        Task("spirals", _synthetic(spirals), noise_view, "3 spiral arms + 4 nuisance dims"),
        Task("blobs", _synthetic(blobs), noise_view, "4 overlapping blobs + 4 nuisance dims"),
        Task("iris", _sklearn("iris"), noise_view, "iris (150 samples, 3 classes)"),
        Task("wine", _sklearn("wine"), noise_view, "wine (178 samples, 3 classes)"),
        Task("breast-cancer", _sklearn("breast_cancer"), noise_view, "breast cancer (569 samples, 2 classes)"),
    ]
}


def load_task(task: Task):
    """``(x_pool, y_pool, x_test, y_test)`` of ``task``."""
    return task.load()


def resolve_tasks(names, op: str) -> list[Task]:
    """The tasks named in ``names`` (a list, or a comma-separated string), in the order
    given; an unknown name is a ValueError that lists the valid ones."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    bad = [n for n in names if n not in TASKS]
    if bad or not names:
        raise ValueError(
            f"{op}: tasks must name some of {', '.join(TASKS)}; unknown: {', '.join(map(repr, bad)) or '(none given)'}"
        )
    return [TASKS[n] for n in names]
