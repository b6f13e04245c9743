"""Strategy calls stay interactive at scale: N = 10,000 samples, 1,000 classes
(docs/active.md, "Query strategies": each call under 1 s on 2 cores)."""

import time

import pytest
import torch

from palfast.active import STRATEGIES, RelationStore, select_queries

#: The target of docs/active.md: a person (or the annotate app) never waits a second.
MAX_SECONDS = 1.0
N, N_CLASSES, D, BUDGET = 10_000, 1_000, 32, 50
#: Known members per class: every class already has a component, so "pal" works on all
#: 1,000 of them (its costliest case: per-class similarities and votes).
KNOWN_PER_CLASS = 3


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_call_under_a_second_at_10k_samples_1k_classes(strategy):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(N) % N_CLASSES
    x = torch.randn(N_CLASSES, D, generator=g)[y] + 0.3 * torch.randn(N, D, generator=g)
    store = RelationStore()
    first = torch.arange(N_CLASSES)  # samples c, c + 1000, c + 2000 are class c
    chain = torch.cat(
        [torch.stack([first + k * N_CLASSES, first + (k + 1) * N_CLASSES], 1) for k in range(KNOWN_PER_CLASS - 1)]
    )
    store.record(chain, torch.ones(chain.shape[0], dtype=torch.bool))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU time of one thread: a bound for 2 cores, whatever the load
    try:
        select_queries(x, store, BUDGET, strategy, seed=0)  # warm-up (imports, faiss)
        cpu, wall = time.process_time(), time.perf_counter()
        q = select_queries(x, store, BUDGET, strategy, seed=1)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        torch.set_num_threads(threads)
    assert q.shape == (BUDGET, 2)
    print(f"{strategy}: {cpu:.3f} s CPU, {wall:.3f} s wall (1 thread)")
    assert cpu < MAX_SECONDS, f"{strategy}: {cpu:.2f} s of CPU for one call"


#: Largest single allocation allowed to a strategy, per row and neighbour: the k-NN graph
#: in both directions as int64 rows and float similarities, sorted, is a few times
#: 2·N·k·8 bytes; an N×C matrix of similarities to the classes (C = N/4 here) is
#: N·N/4·4 bytes, 100 times more at N = 4000, k = 10.
MAX_BYTES_PER_ROW_AND_NEIGHBOUR = 64


@pytest.mark.parametrize(
    "strategy", [pytest.param(s, marks=pytest.mark.slow) if s == "pal" else s for s in STRATEGIES]
)  # pal: ~10 s under the profiler
def test_no_allocation_grows_as_n_squared_or_n_times_classes(strategy):
    """The largest tensor a call allocates is O(N·k), whatever the store holds (the
    FAISS search itself is outside torch's allocator: the index is not counted)."""
    pytest.importorskip("faiss")
    from torch.profiler import ProfilerActivity, profile

    n, n_classes, k = 4000, 1000, 10
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % n_classes
    x = torch.randn(n_classes, 16, generator=g)[y] + 0.3 * torch.randn(n, 16, generator=g)
    # 3 known members per class: N · 3000 members is above PAL_EXACT_WORK
    store = RelationStore()
    first = torch.arange(n_classes)
    chain = torch.cat(
        [torch.stack([first, first + n_classes], 1), torch.stack([first + n_classes, first + 2 * n_classes], 1)]
    )
    store.record(chain, torch.ones(chain.shape[0], dtype=torch.bool))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        q = select_queries(x, store, 10, strategy, k=k, seed=0, backend="faiss")
    assert q.shape == (10, 2)
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert biggest <= MAX_BYTES_PER_ROW_AND_NEIGHBOUR * n * k, f"{strategy}: one allocation of {biggest / 1e6:.1f} MB"
