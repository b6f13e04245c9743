"""Losses under torch.distributed: 2 gloo processes on the CPU must reproduce the
single-process loss value and, after DDP's gradient averaging, its gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import palfast


@pytest.mark.parametrize("counts", [(12, 12), (9, 15)])
@pytest.mark.slow
def test_two_gloo_ranks_match_single_process(counts, tmp_path, monkeypatch):
    # Spawned workers get our sys.path and cwd: keep the checkout's root (whose
    # palfast/ has no compiled _C) off both, and import the worker from tests/.
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))
    from _dist_worker import N_IN, D, _graphs, _labels, _losses, _run, _run_two_views, _two_view_losses, _worker

    mp.spawn(_worker, args=(2, counts, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    n = sum(counts)
    x = torch.randn(n, N_IN, dtype=torch.float64)
    model = torch.nn.Linear(N_IN, D).double()
    x_b = torch.randn(n, N_IN, dtype=torch.float64)
    wants = {
        (gname, lname): _run(model, x, g, fn) for gname, g in _graphs(n).items() for lname, fn in _losses().items()
    }
    # The modules' two-view form (each rank passes its own z_a, z_b) and the drop-ins:
    # the single-process loss of the global batch too.
    wants.update({("two_views", lname): _run_two_views(model, x, x_b, fn) for lname, fn in _two_view_losses().items()})
    wants["SupConLoss"] = _run(model, x, _labels(n), palfast.nn.SupConLoss(temperature=0.3))
    for key, (want_loss, want_grads) in wants.items():
        for rank in range(2):
            loss, grads = results[rank][key]
            torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-9, msg=f"{key} loss on rank {rank}")
            for got, want in zip(grads, want_grads):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9, msg=f"{key} grad on rank {rank}")
    want_pairs, want_sims = palfast.active.candidate_pairs(x * 3.0, k=4, backend="torch")
    for rank in range(2):
        pairs, sims = results[rank]["candidates"]
        assert torch.equal(pairs, want_pairs)
        torch.testing.assert_close(sims, want_sims)


try:
    import faiss  # noqa: F401

    HAVE_FAISS = True
except ImportError:
    HAVE_FAISS = False
#: Recall@10 of the sharded IVF graph's pairs against the exact ones (as tests/test_knn.py).
MIN_RECALL = 0.95


@pytest.mark.parametrize(
    "counts",
    [
        (4, 296),  # rank 0 holds fewer rows than k + 1
        pytest.param((1100, 1900), marks=pytest.mark.slow),
    ],
)
@pytest.mark.slow
def test_sharded_candidate_pairs_match_single_process(counts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))
    from _dist_worker import _candidates_worker, candidate_cases, candidate_pool, candidate_store

    mp.spawn(_candidates_worker, args=(2, counts, str(tmp_path), HAVE_FAISS), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x = candidate_pool(sum(counts))
    store = candidate_store()
    exact = palfast.active.candidate_pairs(x, k=10, store=store, backend="torch", index="exact")
    errors = [results[r].pop("errors") for r in range(2)]
    assert "embeddings must be finite, got" in errors[1]["nan_on_rank_1"]
    assert "embeddings of rank(s) [1] are invalid" in errors[0]["nan_on_rank_1"]
    if HAVE_FAISS:
        for r in range(2):
            assert f"nlist must be <= N = {counts[0]}" in errors[r]["nlist_over_rank_0_rows"]
            assert "rank 0's shard" in errors[r]["nlist_over_rank_0_rows"]
    for name, kw in candidate_cases(HAVE_FAISS).items():
        pairs, sims = results[0][name]
        assert torch.equal(results[1][name][0], pairs) and torch.equal(results[1][name][1], sims)
        assert not bool(store.known_mask(pairs).any())
        assert bool((sims[:-1] >= sims[1:]).all())
        if name == "ivf":
            want = {tuple(p) for p in exact[0].tolist()}
            assert len(want & {tuple(p) for p in pairs.tolist()}) / len(want) >= MIN_RECALL
            continue
        if name.startswith("exact"):  # the same search, sharded: the same pairs, in order
            want = palfast.active.candidate_pairs(x, store=store, **kw)
            assert torch.equal(pairs, want[0]), name
            torch.testing.assert_close(sims, want[1], rtol=0, atol=1e-6)
        else:
            # IVF scanning every list is exhaustive: the exact pairs. Its scanner rounds
            # the similarities differently from the flat search (by ~1e-7), which may swap
            # two pairs of equal similarity, so the pairs are compared with their sims.
            got = dict(zip(map(tuple, pairs.tolist()), sims.tolist()))
            want = dict(zip(map(tuple, exact[0].tolist()), exact[1].tolist()))
            assert got.keys() == want.keys(), name
            assert max(abs(got[p] - want[p]) for p in want) <= 1e-6, name


def test_gather_without_process_group_is_an_error():
    with pytest.raises(ValueError, match="gather=True needs an initialised"):
        palfast.info_nce(torch.randn(4, 3), palfast.PairGraph.from_views(2, 2), gather=True)
