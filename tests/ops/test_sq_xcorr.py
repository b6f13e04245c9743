"""palfast::sq_xcorr (csrc/sq_xcorr.h): both sides against the dense product, the
side rule's one home (palfast/_ops.py, sq_xcorr_uses_gram), opcheck, argument checks."""

from __future__ import annotations

import pytest
import torch

from palfast import _ops
from palfast._ops import ops

# float tolerances: CI runs these again under a second CPU capability (.ci/run)
pytestmark = pytest.mark.numeric


def _dense(p, q, offdiag):
    c = p.T @ (p if q is None else q)
    return c.square().sum() - (c.diagonal().square().sum() if offdiag else 0)


@pytest.mark.parametrize("gram", [False, True])
@pytest.mark.parametrize("pair", [False, True])
@pytest.mark.parametrize("offdiag", [False, True])
@pytest.mark.parametrize("m,a", [(1, 3), (30, 40), (41, 7)])
def test_both_sides_match_dense_float64(device, gram, pair, offdiag, m, a):
    """Either side is a valid way to compute the value; the caller only picks the cheaper."""
    torch.manual_seed(m * 100 + a)
    p = torch.randn(m, a, dtype=torch.float64, device=device, requires_grad=True)
    q = torch.randn(m, a, dtype=torch.float64, device=device, requires_grad=True) if pair else None
    value, aux = ops.sq_xcorr(p, q, offdiag, gram)
    assert aux.shape == ((2 if pair else 1, m, m) if gram else (1, a, a))
    want = _dense(p, q, offdiag)
    torch.testing.assert_close(value, want)
    grads = torch.autograd.grad(value, [p] + ([q] if pair else []))
    wants = torch.autograd.grad(want, [p] + ([q] if pair else []))
    for got, exp in zip(grads, wants):
        torch.testing.assert_close(got, exp)


def test_wrapper_takes_the_side_of_the_rule(device):
    for m, a, b, self_product in [(30, 40, 40, True), (30, 29, 29, True), (6, 40, 40, False), (40, 6, 6, False)]:
        p = torch.randn(m, a, device=device)
        q = None if self_product else torch.randn(m, b, device=device)
        _, aux = _ops.sq_xcorr(p, q, True)
        gram = _ops.sq_xcorr_uses_gram(m, a, b, self_product)
        assert aux.shape[1:] == ((m, m) if gram else (a, b))


def test_gram_blocks_beyond_one_tile(device):
    """M > 512: the Gram matrices are built from upper block rows and mirrored."""
    torch.manual_seed(14)
    p, q = (torch.randn(530, 900, dtype=torch.float64, device=device) for _ in range(2))
    for second in (None, q):  # both take the Gram side at these sizes
        value, aux = _ops.sq_xcorr(p, second, True)
        assert aux.shape[1:] == (530, 530)
        torch.testing.assert_close(value, _dense(p, second, True))


@pytest.mark.slow
def test_opcheck(device):
    torch.manual_seed(6)
    for n, d in [(7, 20), (20, 7)]:
        p, q = (torch.randn(n, d, device=device, requires_grad=True) for _ in range(2))
        for gram in (False, True):
            for second in (None, q):
                torch.library.opcheck(ops.sq_xcorr.default, (p, second, True, gram))
                _, aux = ops.sq_xcorr(p.detach(), None if second is None else q.detach(), True, gram)
                torch.library.opcheck(
                    ops.sq_xcorr_backward.default,
                    (
                        torch.tensor(0.5, device=device),
                        p.detach(),
                        None if second is None else q.detach(),
                        aux,
                        True,
                        gram,
                    ),
                )


@pytest.mark.slow
def test_opcheck_on_transposed_input(device):
    """The losses pass zᵀ (a non-contiguous view) to sq_xcorr."""
    torch.manual_seed(6)
    x = torch.randn(7, 20, device=device, requires_grad=True)
    y = torch.randn(20, 7, device=device, requires_grad=True)
    torch.library.opcheck(ops.sq_xcorr.default, (x.T, None, True, True))
    torch.library.opcheck(ops.sq_xcorr.default, (y.T, y.T.flip(1), True, False))
    a = torch.randn(6, 40, device=device, requires_grad=True)
    b = torch.randn(7, 40, device=device, requires_grad=True)
    torch.library.opcheck(ops.sq_xcorr.default, (a.T, b.T, False, True))


def test_checks_its_arguments():
    with pytest.raises(ValueError, match="palfast.sq_xcorr: q must have as many rows as p"):
        ops.sq_xcorr(torch.randn(5, 2), torch.randn(4, 2), False, False)
    with pytest.raises(ValueError, match="offdiag needs square"):
        ops.sq_xcorr(torch.randn(5, 2), torch.randn(5, 3), True, False)
    with pytest.raises(ValueError, match="palfast.sq_xcorr: p must be a 2-D tensor"):
        ops.sq_xcorr(torch.randn(5), None, True, False)
    with pytest.raises(
        ValueError,
        match=r"aux must be the \[1, 2, 2\] Float tensor returned by "
        r"sq_xcorr with gram=False",
    ):
        ops.sq_xcorr_backward(torch.tensor(1.0), torch.randn(5, 2), None, torch.ones(1, 5, 5), True, False)
    with pytest.raises(ValueError, match=r"aux must be the \[1, 5, 5\]"):
        ops.sq_xcorr_backward(torch.tensor(1.0), torch.randn(5, 2), None, torch.ones(1, 2, 2), True, True)
    with pytest.raises(ValueError, match="palfast.sq_xcorr_backward: grad must be a 0-dim"):
        ops.sq_xcorr_backward(torch.ones(2), torch.randn(5, 2), None, torch.ones(1, 2, 2), True, False)
