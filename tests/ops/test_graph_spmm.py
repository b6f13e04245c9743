"""palfast::graph_spmm (csrc/graph_spmm.h): G·x and Gᵀ·x against the dense graph,
its autograd (the other side of the graph), scheduling independence, argument checks."""

from __future__ import annotations

import pytest
import torch

import palfast
from palfast._ops import ops
from palfast.testing import KINDS

# float tolerances: CI runs these again under a second CPU capability (.ci/run)
pytestmark = pytest.mark.numeric


@pytest.mark.parametrize("n", [1, 2, 37, 257])
def test_matches_dense(device, graph_factory, n):
    torch.manual_seed(7)
    for kind in KINDS:
        g = graph_factory(kind, n, seed=3).to(device)
        x = torch.randn(n, 5, dtype=torch.float64, device=device)
        w = g.to_dense(torch.float64).to(device)
        torch.testing.assert_close(ops.graph_spmm(x, *g.kernel_args(), False), w @ x)
        torch.testing.assert_close(ops.graph_spmm(x, *g.kernel_args(), True), w.T @ x)


def test_uneven_rows_match_dense(device):
    """A hub row with most of the edges: the rows are handed out dynamically."""
    torch.manual_seed(8)
    n = 3000
    src = torch.cat([torch.zeros(20000, dtype=torch.long), torch.randint(0, n, (500,))])
    dst = torch.randint(0, n, (20500,))
    g = palfast.PairGraph.from_edges(src, dst, torch.rand(20500), num_nodes=n, symmetric=False).to(device)
    x = torch.randn(n, 9, dtype=torch.float64, device=device)
    w = g.to_dense(torch.float64).to(device)
    for transpose in (False, True):
        torch.testing.assert_close(ops.graph_spmm(x, *g.kernel_args(), transpose), (w.T if transpose else w) @ x)


def test_same_bits_for_any_thread_count(graph_factory):
    """Every output row has one owner, so scheduling cannot change a bit."""
    torch.manual_seed(9)
    g = graph_factory("semi", 4001, seed=2)
    x = torch.randn(4001, 33)
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 1, 2):
            torch.set_num_threads(t)
            outs.append(ops.graph_spmm(x, *g.kernel_args(), True))
    finally:
        torch.set_num_threads(threads)
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


@pytest.mark.slow
def test_opcheck(opcheck_inputs):
    for g, x in opcheck_inputs:
        for transpose in (False, True):
            torch.library.opcheck(ops.graph_spmm.default, (x, *g.kernel_args(), transpose))


def test_checks_its_arguments():
    g = palfast.PairGraph.from_views(3, 2)
    with pytest.raises(ValueError, match="palfast.graph_spmm: x must be a 2-D tensor"):
        ops.graph_spmm(torch.randn(6), *g.kernel_args(), False)
    with pytest.raises(ValueError, match="palfast.graph_spmm: graph.indptr must have 6"):
        ops.graph_spmm(torch.randn(5, 2), *g.kernel_args(), False)
