"""info_nce fwd+bwd: palfast vs naive eager, torch.compile(naive) and pytorch-metric-learning.

Workload: SimCLR-style views graph (n images × 2 views, N = 2n rows), D = 128,
temperature 0.1. The naive baseline is the usual eager NT-Xent (dense N×N
logits + cross-entropy); it stops where its N×N matrices cannot fit in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import palfast

from .harness import Case, Skip

D = 128
TAU = 0.1


def _naive_nt_xent(z: torch.Tensor, n: int) -> torch.Tensor:
    u = F.normalize(z, dim=1)
    s = u @ u.T / TAU
    s = s.masked_fill(torch.eye(z.shape[0], dtype=torch.bool, device=z.device), float("-inf"))
    target = (torch.arange(z.shape[0], device=z.device) + n) % z.shape[0]
    return F.cross_entropy(s, target)


def _free_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def _dense_guard(N: int, device: str, copies: int = 6) -> None:
    # the naive losses hold several N×N fp32 matrices at once
    if copies * N * N * 4 > 0.6 * _free_bytes(device):
        raise Skip(f"needs ~{copies * N * N * 4 / 2**30:.0f} GiB for N×N matrices")


def _inputs(N: int, device: str, dtype: torch.dtype):
    gen = torch.Generator(device=device).manual_seed(N)
    z = torch.randn(N, D, device=device, dtype=dtype, generator=gen).requires_grad_()
    return z


def _step(loss_fn, z):
    def run():
        z.grad = None
        loss_fn(z).backward()
    return run


def cases(quick: bool = False, device: str = "cpu") -> list[Case]:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    sizes = [1024, 4096] if quick else [1024, 4096, 8192, 16384, 65536]
    out = []
    for N in sizes:
        n = N // 2

        def make_palfast(N=N, n=n):
            z = _inputs(N, device, dtype)
            g = palfast.PairGraph.from_views(n, 2, device=device)
            return _step(lambda x: palfast.info_nce(x, g, temperature=TAU), z)

        def make_naive(N=N, n=n):
            _dense_guard(N, device)
            z = _inputs(N, device, dtype)
            return _step(lambda x: _naive_nt_xent(x, n), z)

        def make_compiled(N=N, n=n):
            _dense_guard(N, device)
            if N > 8192:
                raise Skip("skipped above N=8192 to keep the benchmark short")
            z = _inputs(N, device, dtype)
            fn = torch.compile(lambda x: _naive_nt_xent(x, n))
            return _step(fn, z)

        def make_pml(N=N, n=n):
            _dense_guard(N, device, copies=10)
            if N > 8192:
                raise Skip("skipped above N=8192 to keep the benchmark short (~20 s a step)")
            try:
                from pytorch_metric_learning.losses import SupConLoss
            except ImportError as e:
                raise Skip("pytorch-metric-learning is not installed") from e
            z = _inputs(N, device, dtype)
            labels = torch.arange(n, device=device).repeat(2)
            loss = SupConLoss(temperature=TAU)
            return _step(lambda x: loss(x, labels), z)

        impls = {"palfast": make_palfast, "naive_eager": make_naive}
        if not quick:
            impls["torch_compile_naive"] = make_compiled
            impls["pml_SupConLoss"] = make_pml
        out.append(Case("bench_info_nce", f"info_nce N={N} D={D} {str(dtype)[6:]}",
                        {"N": N, "D": D, "dtype": str(dtype)[6:]}, impls, "naive_eager", device))
    return out
