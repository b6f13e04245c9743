"""palfast::barlow_twins_xcorr (csrc/barlow_twins_xcorr.h), the op under
palfast.barlow_twins: both sides agree, the side rule's one home (palfast/_ops.py),
opcheck, argument checks. The loss itself is tested in tests/losses/test_barlow_twins.py."""

from __future__ import annotations

import pytest
import torch

import palfast
from palfast import _ops
from palfast._ops import ops
from palfast.testing import KINDS

# float tolerances: CI runs these again under a second CPU capability (.ci/run)
pytestmark = pytest.mark.numeric


@pytest.mark.parametrize("n,d", [(2, 3), (15, 20), (20, 15)])
def test_both_sides_agree_float64(device, graph_factory, n, d):
    torch.manual_seed(n + d)
    for kind in KINDS:
        g = graph_factory(kind, n, seed=2).to(device)
        zhat = torch.randn(n, d, dtype=torch.float64, device=device, requires_grad=True)
        args = (*g.kernel_args(), 0.3, 1.0 / max(g.total_weight, 1e-9))
        values, grads = [], []
        for gram in (False, True):
            loss, aux = ops.barlow_twins_xcorr(zhat, *args, gram)
            assert aux.shape == ((2, n, n) if gram else (1, d, d))
            values.append(loss)
            grads.append(torch.autograd.grad(loss, zhat)[0])
        torch.testing.assert_close(values[0], values[1])
        torch.testing.assert_close(grads[0], grads[1])


def test_wrapper_takes_the_side_of_the_rule(graph_factory):
    for n, d in [(15, 20), (20, 15)]:
        g = graph_factory("semi", n)
        _, aux = _ops.barlow_twins_xcorr(torch.randn(n, d), g.kernel_args(), 0.1, 1.0)
        gram = _ops.barlow_twins_xcorr_uses_gram(n, d)
        assert aux.shape == ((2, n, n) if gram else (1, d, d))


@pytest.mark.slow
def test_opcheck(device, opcheck_inputs):
    for g, zhat in opcheck_inputs:
        for gram in (False, True):
            args = (*g.kernel_args(), 0.1, 1.0 / g.total_weight, gram)
            torch.library.opcheck(ops.barlow_twins_xcorr.default, (zhat, *args))
            _, aux = ops.barlow_twins_xcorr(zhat.detach(), *args)
            torch.library.opcheck(
                ops.barlow_twins_xcorr_backward.default,
                (
                    torch.tensor(1.3, device=device),
                    zhat.detach(),
                    *g.kernel_args(),
                    aux,
                    0.1,
                    1.0 / g.total_weight,
                    gram,
                ),
            )


def test_checks_its_arguments():
    g = palfast.PairGraph.from_views(3, 2)
    with pytest.raises(ValueError, match="palfast.barlow_twins_xcorr: graph.indptr must have 6"):
        ops.barlow_twins_xcorr(torch.randn(5, 2), *g.kernel_args(), 0.1, 1.0, False)
    with pytest.raises(ValueError, match="scale \\(1/|G|\\) must be a finite number > 0"):
        ops.barlow_twins_xcorr(torch.randn(6, 2), *g.kernel_args(), 0.1, 0.0, False)
    with pytest.raises(ValueError, match="lambd must be a finite number >= 0"):
        ops.barlow_twins_xcorr(torch.randn(6, 2), *g.kernel_args(), -1.0, 1.0, False)
    with pytest.raises(ValueError, match="aux must be the .* returned by barlow_twins_xcorr with gram=False"):
        ops.barlow_twins_xcorr_backward(
            torch.tensor(1.0), torch.randn(6, 2), *g.kernel_args(), torch.ones(2, 6, 6), 0.1, 1.0, False
        )
