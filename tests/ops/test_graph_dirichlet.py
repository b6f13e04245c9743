"""palfast::graph_dirichlet (csrc/graph_dirichlet.h): Σ_ij w_ij ‖z_i − z_j‖² and its
gradient against the dense graph, scheduling independence, opcheck, argument checks."""

from __future__ import annotations

import pytest
import torch

import palfast
from palfast._ops import ops
from palfast.testing import KINDS

# float tolerances: CI runs these again under a second CPU capability (.ci/run)
pytestmark = pytest.mark.numeric


def _dense(z, w):
    return (w * torch.cdist(z, z).square()).sum()


@pytest.mark.parametrize("n", [1, 2, 41, 257])
@pytest.mark.slow
def test_matches_dense_float64(device, graph_factory, n):
    torch.manual_seed(n)
    for kind in KINDS:
        g = graph_factory(kind, n, seed=4).to(device)
        w = g.to_dense(torch.float64).to(device)
        z = torch.randn(n, 6, dtype=torch.float64, device=device, requires_grad=True)
        got = ops.graph_dirichlet(z, *g.kernel_args())
        want = _dense(z, w)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got, z)[0], torch.autograd.grad(want, z)[0])


def test_same_bits_run_to_run(graph_factory):
    torch.manual_seed(9)
    g = graph_factory("semi", 4001, seed=2)
    z = torch.randn(4001, 33)
    grad = torch.tensor(1.7)
    first = ops.graph_dirichlet_backward(grad, z, *g.kernel_args())
    for _ in range(3):
        assert torch.equal(ops.graph_dirichlet_backward(grad, z, *g.kernel_args()), first)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(ops.graph_dirichlet_backward(grad, z, *g.kernel_args()), first)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_opcheck(device, graph_factory):
    torch.manual_seed(6)
    g = graph_factory("semi", 23).to(device)
    z = torch.randn(23, 11, device=device, requires_grad=True)
    torch.library.opcheck(ops.graph_dirichlet.default, (z, *g.kernel_args()))
    torch.library.opcheck(
        ops.graph_dirichlet_backward.default, (torch.tensor(1.5, device=device), z.detach(), *g.kernel_args())
    )


def test_checks_its_arguments():
    g = palfast.PairGraph.from_views(3, 2)
    with pytest.raises(ValueError, match="palfast.graph_dirichlet: graph.indptr must have 6"):
        ops.graph_dirichlet(torch.randn(5, 2), *g.kernel_args())
    with pytest.raises(ValueError, match="palfast.graph_dirichlet_backward: grad must be a 0-dim"):
        ops.graph_dirichlet_backward(torch.ones(2), torch.randn(6, 2), *g.kernel_args())
