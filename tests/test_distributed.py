"""Losses under torch.distributed: 2 gloo processes on the CPU must reproduce the
single-process loss value and, after DDP's gradient averaging, its gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import palfast


@pytest.mark.parametrize("counts", [(12, 12), (9, 15)])
def test_two_gloo_ranks_match_single_process(counts, tmp_path, monkeypatch):
    # Spawned workers get our sys.path and cwd: keep the checkout's root (whose
    # palfast/ has no compiled _C) off both, and import the worker from tests/.
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))
    from _dist_worker import N_IN, D, _graphs, _losses, _run, _worker

    mp.spawn(_worker, args=(2, counts, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    n = sum(counts)
    x = torch.randn(n, N_IN, dtype=torch.float64)
    model = torch.nn.Linear(N_IN, D).double()
    for gname, g in _graphs(n).items():
        for lname, fn in _losses().items():
            want_loss, want_grads = _run(model, x, g, fn)
            for rank in range(2):
                loss, grads = results[rank][(gname, lname)]
                torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-9,
                                           msg=f"{lname}/{gname} loss on rank {rank}")
                for got, want in zip(grads, want_grads):
                    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9,
                                               msg=f"{lname}/{gname} grad on rank {rank}")
    want_pairs, want_sims = palfast.active.candidate_pairs(x * 3.0, k=4, backend="torch")
    for rank in range(2):
        pairs, sims = results[rank]["candidates"]
        assert torch.equal(pairs, want_pairs)
        torch.testing.assert_close(sims, want_sims)


def test_gather_without_process_group_is_an_error():
    with pytest.raises(ValueError, match="gather=True needs an initialised"):
        palfast.info_nce(torch.randn(4, 3), palfast.PairGraph.from_views(2, 2), gather=True)
