"""candidate_pairs (k-NN by cosine similarity, FAISS IndexFlatIP) vs torch mm + topk.

The baseline is what a user writes without FAISS, and palfast's own fallback
(``palfast.knn.knn(backend="torch")``): normalise, then for blocks of query rows
take ``x_block @ x.T`` and ``topk(k)``, self excluded (a full N×N matrix at
N = 65536 would be 16 GiB). Both are exact (recall is checked
in tests/active/test_candidates.py, not here). palfast's time includes making the
unordered unique pairs, sorted by similarity.
"""

from __future__ import annotations

import torch

from palfast.active import candidate_pairs
from palfast.knn import knn

from .harness import Case, Skip

D, K = 128, 10


def _inputs(N: int, device: str) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(N)
    return torch.randn(N, D, device=device, generator=gen)


def cases(quick: bool = False, device: str = "cpu") -> list[Case]:
    sizes = [4096] if quick else [8192, 65536]
    out = []
    for N in sizes:

        def make_palfast(N=N):
            try:
                import faiss  # noqa: F401
            except ImportError as e:
                raise Skip("faiss is not installed") from e
            x = _inputs(N, device)
            return lambda: candidate_pairs(x, K, backend="faiss", index="exact")

        def make_torch(N=N):
            x = _inputs(N, device)
            return lambda: knn(x, K, backend="torch")

        out.append(
            Case(
                "bench_candidates",
                f"candidate_pairs N={N} D={D} k={K}",
                {"N": N, "D": D, "k": K},
                {"palfast_faiss": make_palfast, "torch_mm_topk": make_torch},
                "torch_mm_topk",
                device,
            )
        )
    return out
