"""The real data ``palfast demo`` and ``palfast bench --only strategies`` train on.

scikit-learn's bundled 8×8 digits (no download), split into a pool and a test set,
and the random views (augmentations) that the loss's view graph pairs.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["augment", "augment_noise", "load_digits_split"]


def load_digits_split(seed: int = 0):
    """Digits as float32 [N, 64] in [0, 1], split 2/3 pool, 1/3 test (stratified,
    fixed ``seed``): (x_pool, y_pool, x_test, y_test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_pool, x_test, y_pool, y_test = train_test_split(x, y, test_size=1 / 3, stratify=y, random_state=seed)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32) / 16.0
    return as_x(x_pool), torch.tensor(y_pool), as_x(x_test), torch.tensor(y_test)


def augment_noise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A weak view of digits ``[B, 64]``: N(0, 0.1²) noise added, no shift."""
    return x + 0.1 * torch.randn(x.shape, generator=gen)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random view of 8×8 digits ``[B, 64]``: shift by −1..1 pixel in each direction
    (zero fill) and add N(0, 0.1²) noise."""
    b = x.shape[0]
    img = nn.functional.pad(x.reshape(b, 1, 8, 8), (1, 1, 1, 1))
    dy = torch.randint(0, 3, (b,), generator=gen)
    dx = torch.randint(0, 3, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(8))[:, :, None]  # [B, 8, 1]
    cols = (dx[:, None] + torch.arange(8))[:, None, :]  # [B, 1, 8]
    out = img[torch.arange(b)[:, None, None], 0, rows, cols]  # [B, 8, 8]
    out = out.reshape(b, 64) + 0.1 * torch.randn(b, 64, generator=gen)
    return out
