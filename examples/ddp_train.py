"""Train an encoder with palfast.nn.InfoNCELoss under DistributedDataParallel.

    torchrun --standalone --nproc_per_node=2 examples/ddp_train.py   # gloo on CPU
    torchrun --nproc_per_node=8 examples/ddp_train.py --steps 500  # NCCL on GPUs

Data: scikit-learn's bundled digits (8×8 images, no download). Every step draws
one global batch (the same on every rank, from a shared seed); rank r embeds
its shard, two noisy views per image, so the global rows are in rank order:
[rank 0: view 0, view 1 | rank 1: view 0, view 1 | ...]. The graph is over the
global batch: view pairs (same image) plus, with weight --label-weight, pairs
whose labels the oracle has revealed (a --known fraction of the images).
palfast gathers the keys from all ranks with gradient, keeps anchors local, and
returns the global loss on every rank.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import palfast


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=256, help="global batch of images")
    p.add_argument("--known", type=float, default=0.2, help="fraction of images with a known label")
    p.add_argument("--label-weight", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    from sklearn.datasets import load_digits

    digits = load_digits()
    x_all = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y_all = torch.tensor(digits.target)
    known = torch.rand(len(y_all), generator=torch.Generator().manual_seed(0)) < args.known

    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts them)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64)).to(device)
    model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = palfast.nn.InfoNCELoss(temperature=0.2)
    shard = args.batch // world
    batch_gen = torch.Generator().manual_seed(1)  # identical on all ranks: one global batch

    for step in range(args.steps):
        idx = torch.randperm(len(y_all), generator=batch_gen)[: shard * world]
        # global row order: for each rank, its shard's view 0 then view 1
        shards = idx.view(world, shard)
        image_ids = torch.cat([torch.cat([s, s]) for s in shards])
        labels = torch.where(known[image_ids], y_all[image_ids], torch.tensor(-1))
        graph = (
            palfast.PairGraph.from_labels(image_ids) + args.label_weight * palfast.PairGraph.from_labels(labels)
        ).to(device)

        mine = x_all[shards[rank]]
        views = torch.cat([mine + 0.1 * torch.randn_like(mine), mine + 0.1 * torch.randn_like(mine)])
        z = model(views.to(device))
        loss = loss_fn(z, graph)  # gathers keys across ranks; the global loss on every rank
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}  (world {world}, global batch {2 * shard * world} rows)")

    # End every rank without interpreter finalization: on gloo, a collective made
    # inside backward() can abort the process at exit otherwise (the docstring of
    # palfast.distributed.exit_process and docs/distributed.md explain why).
    palfast.distributed.exit_process(0)


if __name__ == "__main__":
    main()
