"""Worker of tests/test_distributed.py, in its own module so that spawned processes
can import it without the checkout's root (and its uncompiled palfast/) on sys.path."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import palfast

N_IN, D = 6, 5


def _graphs(n):
    gen = torch.Generator().manual_seed(1)
    src, dst = torch.randint(0, n, (2 * n,), generator=gen), torch.randint(0, n, (2 * n,), generator=gen)
    return {
        "views": palfast.PairGraph.from_views(n // 2, 2),
        "labels": palfast.PairGraph.from_labels(torch.randint(-1, 4, (n,), generator=gen)),
        "edges": palfast.PairGraph.from_edges(src, dst, torch.rand(2 * n, generator=gen), num_nodes=n, symmetric=False),
        # known negatives between neighbouring rows (never two views of one image)
        "signed": palfast.PairGraph.from_views(n // 2, 2).with_negatives(
            palfast.PairGraph.from_edges(torch.arange(n), (torch.arange(n) + 1) % n, num_nodes=n)
        ),
    }


def _losses():
    return {
        "info_nce": lambda z, g: palfast.info_nce(z, g, temperature=0.3),
        "info_nce_unknown": lambda z, g: palfast.info_nce(z, g, temperature=0.3, unknown_weight=0.3),
        "vicreg": lambda z, g: palfast.vicreg(z, g),
        "barlow_twins": lambda z, g: palfast.barlow_twins(z, g),
        "spectral_contrastive": lambda z, g: palfast.spectral_contrastive(z, g),
        "vic2": lambda z, g: palfast.vic2(z, g),
    }


def _two_view_losses():
    """Modules called as loss(z_a, z_b), gathering by default (gather=None: on under a
    process group of more than one rank), and the drop-ins, gathering when asked."""
    nn = palfast.nn
    return {
        "InfoNCELoss": nn.InfoNCELoss(temperature=0.3),
        "VICRegLoss": nn.VICRegLoss(),
        "BarlowTwinsLoss": nn.BarlowTwinsLoss(),
        "SpectralContrastiveLoss": nn.SpectralContrastiveLoss(),
        "VIC2Loss": nn.VIC2Loss(),
        "NTXentLoss": nn.NTXentLoss(gather_distributed=True),
    }


def _labels(n):
    """Class labels for SupConLoss: some classes span both ranks, and -3 is a class."""
    return torch.randint(-3, 3, (n,), generator=torch.Generator().manual_seed(3))


def _run(model, x, graph, loss_fn):
    model.zero_grad()
    loss = loss_fn(model(x), graph)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _run_two_views(model, x_a, x_b, loss_fn):
    model.zero_grad()
    loss = loss_fn(model(x_a), model(x_b))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _worker(rank, world, counts, out_dir):
    # File rendezvous: no free-port probing, which can race with other sockets.
    dist.init_process_group(
        "gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=rank, world_size=world
    )
    torch.manual_seed(0)
    n = sum(counts)
    x = torch.randn(n, N_IN, dtype=torch.float64)
    model = torch.nn.Linear(N_IN, D).double()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    begin = sum(counts[:rank])
    mine = x[begin : begin + counts[rank]]
    out = {}
    x_b = torch.randn(n, N_IN, dtype=torch.float64)  # the second view of the n images
    for lname, fn in _two_view_losses().items():
        out[("two_views", lname)] = _run_two_views(ddp, mine, x_b[begin : begin + counts[rank]], fn)
    out["SupConLoss"] = _run(
        ddp, mine, _labels(n)[begin : begin + counts[rank]], palfast.nn.SupConLoss(temperature=0.3, gather=True)
    )
    for gname, g in _graphs(n).items():
        for lname, fn in _losses().items():
            out[(gname, lname)] = _run(ddp, mine, g, fn)
    out["candidates"] = palfast.active.distributed.candidate_pairs(mine * 3.0, k=4, backend="torch")
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    # Results are saved: end without interpreter finalization, which can abort
    # a gloo process (see palfast.distributed.exit_process). An exception above
    # propagates normally, so a failing rank still reports its traceback.
    palfast.distributed.exit_process(0)


# ------------------------------------------------ sharded candidate search
#: Bytes per chunk in the candidate workers: 1 KiB is 8 rows of D = 32, so the queries
#: reach the shards in many all-gather rounds, the last one partial.
CANDIDATE_CHUNK_BYTES = 1 << 10
CANDIDATE_D = 32


def candidate_cases(have_faiss: bool) -> dict:
    """The searches the sharded candidate test runs: name -> keyword arguments."""
    cases = {"exact_torch": dict(k=10, backend="torch", index="exact")}
    if have_faiss:
        cases.update(
            exact_faiss=dict(k=10, backend="faiss", index="exact"),
            # every list scanned: an exhaustive search through the IVF code
            ivf_all_lists=dict(k=10, index="ivf", nlist=2, nprobe=2),
            ivf=dict(k=10, index="ivf"),
        )
    return cases


def candidate_pool(n: int) -> torch.Tensor:
    """Overlapping classes (like tests/test_knn.py's clustered): an approximate index
    has real work to do."""
    g = torch.Generator().manual_seed(2)
    y = torch.randint(0, max(2, n // 50), (n,), generator=g)
    return torch.randn(max(2, n // 50), CANDIDATE_D, generator=g)[y] + 0.6 * torch.randn(n, CANDIDATE_D, generator=g)


def candidate_store():
    """A few answers, so the store filtering (on the source rank only) is exercised."""
    store = palfast.active.RelationStore()
    store.record(torch.tensor([[0, 1], [2, 3], [1, 3]]), torch.tensor([True, True, False]))
    return store


def _candidates_worker(rank, world, counts, out_dir, have_faiss):
    dist.init_process_group(
        "gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=rank, world_size=world
    )
    palfast.knn.CHUNK_BYTES = CANDIDATE_CHUNK_BYTES
    x = candidate_pool(sum(counts))
    begin = sum(counts[:rank])
    mine = x[begin : begin + counts[rank]]
    store = candidate_store() if rank == 0 else None
    search = palfast.active.distributed.candidate_pairs
    out = {name: search(mine, store=store, **kw) for name, kw in candidate_cases(have_faiss).items()}
    # Bad input on one rank (or for one shard) must raise on every rank, not hang the others.
    bad = {"nan_on_rank_1": lambda: search(mine * float("nan") if rank == 1 else mine, k=10, backend="torch")}
    if have_faiss:
        bad["nlist_over_rank_0_rows"] = lambda: search(mine, k=10, index="ivf", nlist=counts[0] + 1)
    out["errors"] = {}
    for name, call in bad.items():
        try:
            call()
            out["errors"][name] = None
        except ValueError as e:
            out["errors"][name] = str(e)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    palfast.distributed.exit_process(0)
