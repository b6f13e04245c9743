"""palfast.nn's drop-in modules against the libraries they replace, on the same inputs:
NTXentLoss against lightly's NTXentLoss, SupConLoss against pytorch-metric-learning's
SupConLoss, in float64 (to rounding) and float32 (within the rounding bound of
palfast/testing.py, judged against the library in float64 on the same rounded inputs);
and every module's ``gather=`` argument (the 2-rank case is tests/test_distributed.py)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

import palfast
from palfast.testing import INFO_NCE_ROWS_FLOOR, assert_rounding_close, info_nce_cond, info_nce_grad_floor

D = 16


def _values_and_grads(fn, *inputs):
    """fn(*inputs) and the gradients of its inputs, on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward()
    return out.detach(), [t.grad for t in leaves]


def _assert_float64_match(ours, theirs, *inputs):
    (got, g_got), (want, g_want) = _values_and_grads(ours, *inputs), _values_and_grads(theirs, *inputs)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _assert_float32_match(ours, theirs, inputs64, temperature, grad_rows):
    """ours in float32 against theirs in float64 on the same float32-rounded inputs, within
    palfast/testing.py's rounding bound; and against theirs in float32 within twice that
    bound (both are roundings of the float64 value)."""
    rounded = [t.float() for t in inputs64]
    got, g_got = _values_and_grads(ours, *rounded)
    exact, g_exact = _values_and_grads(theirs, *[t.double() for t in rounded])
    theirs32, _ = _values_and_grads(theirs, *rounded)
    cond = info_nce_cond(torch.cat([t for t in rounded if t.is_floating_point()]), temperature)
    assert_rounding_close(got, exact, torch.float32, cond=cond, floor=INFO_NCE_ROWS_FLOOR, what="loss")
    assert_rounding_close(
        got,
        theirs32,
        torch.float32,
        cond=2 * cond,
        floor=INFO_NCE_ROWS_FLOOR,
        what="loss against the library in float32",
    )
    for z, a, b in zip(rounded, g_got, g_exact):
        if z.is_floating_point():
            assert_rounding_close(
                a, b, torch.float32, cond=cond, floor=info_nce_grad_floor(z, grad_rows), what="gradient"
            )


# ---------------------------------------------------------------- NTXentLoss
def _lightly_nt_xent(monkeypatch):
    """lightly's NTXentLoss class, or skip (saying why).

    lightly requires torchvision, which palfast's environments need not have (installing
    lightly's dependencies can replace torch). Its loss module imports the memory bank
    from lightly.models, whose package imports torchvision. Then the module file is
    loaded directly with that one import answered by a pass-through: lightly's
    MemoryBankModule.forward returns ``(output, None)`` at size 0, the only size
    palfast's NTXentLoss takes, so the forward that runs is lightly's own."""
    lightly = pytest.importorskip("lightly", reason="lightly is not installed")
    try:
        from lightly.loss.ntx_ent_loss import NTXentLoss

        return NTXentLoss
    except ImportError:
        pass

    class MemoryBankOff(torch.nn.Module):
        def __init__(self, size, gather_distributed=False):
            super().__init__()
            assert size == 0, "only the size-0 memory bank is stood in for"

        def forward(self, output, labels=None, update=False):
            return output, None

    bank = types.ModuleType("lightly.models.modules.memory_bank")
    bank.MemoryBankModule = MemoryBankOff
    monkeypatch.setitem(sys.modules, "lightly.models.modules.memory_bank", bank)
    path = Path(lightly.__file__).parent / "loss" / "ntx_ent_loss.py"
    spec = importlib.util.spec_from_file_location("_lightly_ntx_ent_loss", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 (any failure of an optional library: skip, saying it)
        pytest.skip(f"lightly's {path.name} cannot be loaded without torchvision: {e!r}")
    return module.NTXentLoss


def _nt_xent_formula(out0, out1, temperature):
    """lightly's published NT-Xent, from its docstring and SimCLR: cross-entropy over the
    2n rows of cat(out0, out1) normalised, logits cos/τ to every other row, the target
    the other view of the same image; mean over the 2n rows."""
    z = torch.nn.functional.normalize(torch.cat([out0, out1]), dim=1)
    n2 = z.shape[0]
    logits = (z @ z.T / temperature).masked_fill(torch.eye(n2, dtype=torch.bool), float("-inf"))
    target = torch.arange(n2).roll(n2 // 2)
    return torch.nn.functional.cross_entropy(logits, target)


def _two_views(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g, dtype=torch.float64), torch.randn(n, D, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 2, 33])
@pytest.mark.parametrize("temperature", [None, 0.1])  # None: both libraries' default (0.5)
def test_nt_xent_matches_lightly(n, temperature, monkeypatch):
    theirs_cls = _lightly_nt_xent(monkeypatch)
    kw = {} if temperature is None else {"temperature": temperature}
    ours, theirs = palfast.nn.NTXentLoss(**kw), theirs_cls(**kw)
    assert ours.temperature == theirs.temperature
    out0, out1 = _two_views(n, seed=n)
    _assert_float64_match(ours, theirs, out0, out1)
    _assert_float32_match(ours, theirs, [out0, out1], ours.temperature, 1 / (2 * n))


@pytest.mark.parametrize("n", [1, 2, 33])
@pytest.mark.parametrize("temperature", [0.5, 0.1])
def test_nt_xent_matches_lightly_formula(n, temperature):
    out0, out1 = _two_views(n, seed=100 + n)
    ours = palfast.nn.NTXentLoss(temperature=temperature)
    formula = lambda a, b: _nt_xent_formula(a, b, temperature)  # noqa: E731
    _assert_float64_match(ours, formula, out0, out1)
    _assert_float32_match(ours, formula, [out0, out1], temperature, 1 / (2 * n))
    # the same loss as the module's two-view form
    torch.testing.assert_close(ours(out0, out1), palfast.nn.InfoNCELoss(temperature)(out0, out1), rtol=0, atol=0)


def test_nt_xent_arguments():
    op = "palfast.nn.NTXentLoss"
    assert palfast.nn.NTXentLoss().temperature == 0.5  # lightly's default
    assert palfast.nn.NTXentLoss(memory_bank_size=0).memory_bank_size == 0
    for size in (4096, (4096, 128), -1, 0.0):
        with pytest.raises(
            ValueError, match=f"{op}: memory_bank_size must be 0 .*got {size!r}".replace("(", r"\(").replace(")", r"\)")
        ):
            palfast.nn.NTXentLoss(memory_bank_size=size)
    for t in (0.0, -0.5):
        with pytest.raises(ValueError, match=f"{op}: temperature must be a finite number > 0"):
            palfast.nn.NTXentLoss(temperature=t)
    with pytest.raises(TypeError, match=f"{op}: gather_distributed must be True or False"):
        palfast.nn.NTXentLoss(gather_distributed="yes")
    loss = palfast.nn.NTXentLoss()
    with pytest.raises(ValueError, match=f"{op}: out0 and out1 must both be"):
        loss(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(TypeError, match=f"{op}: out1 must be a torch.Tensor"):
        loss(torch.randn(4, 3), [1.0])
    assert "gather_distributed=False" in repr(loss)


def test_nt_xent_gather_distributed_without_process_group_is_single_process():
    # as lightly: gather_distributed=True gathers only from other ranks, if any
    out0, out1 = _two_views(5, seed=7)
    torch.testing.assert_close(
        palfast.nn.NTXentLoss(gather_distributed=True)(out0, out1), palfast.nn.NTXentLoss()(out0, out1), rtol=0, atol=0
    )


# ---------------------------------------------------------------- SupConLoss
def _pml_sup_con():
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    return losses.SupConLoss


LABELS = {
    "classes": lambda n, g: torch.randint(0, 5, (n,), generator=g),
    "negative_labels": lambda n, g: torch.randint(-3, 2, (n,), generator=g),  # -1 is a class
    "some_without_positives": lambda n, g: torch.cat(
        [torch.zeros(n // 2, dtype=torch.long), torch.arange(1, n - n // 2 + 1)]
    ),
    "no_positives": lambda n, g: torch.arange(n),
    "no_negatives": lambda n, g: torch.full((n,), 3),
}


@pytest.mark.parametrize("labels", LABELS)
@pytest.mark.parametrize("n", [1, 2, 41])
@pytest.mark.parametrize("temperature", [None, 0.5])  # None: both libraries' default (0.1)
def test_sup_con_matches_pytorch_metric_learning(labels, n, temperature):
    theirs_cls = _pml_sup_con()
    kw = {} if temperature is None else {"temperature": temperature}
    ours, theirs = palfast.nn.SupConLoss(**kw), theirs_cls(**kw)
    assert ours.temperature == theirs.temperature
    g = torch.Generator().manual_seed(n)
    z = torch.randn(n, D, generator=g, dtype=torch.float64)
    y = LABELS[labels](n, g)
    _assert_float64_match(lambda x: ours(x, y), lambda x: theirs(x, y), z)
    _assert_float32_match(lambda x: ours(x, y), lambda x: theirs(x, y), [z], ours.temperature, 1.0)
    if labels in ("no_positives", "no_negatives") or n == 1:
        value, (grad,) = _values_and_grads(lambda x: ours(x, y), z)
        assert value.item() == 0.0 and not grad.any()


def test_sup_con_without_positives_is_zero_with_zero_gradient():
    z = torch.randn(6, D, requires_grad=True)
    loss = palfast.nn.SupConLoss()(z, torch.arange(6))
    loss.backward()
    assert loss.item() == 0.0 and not z.grad.any()


def test_sup_con_leaves_rows_of_zero_loss_out_of_the_mean():
    """pytorch-metric-learning averages the rows whose loss is > 0 (AvgNonZeroReducer): at
    τ = 0.01 rows 0 and 1 (one point, their class) are 100 logits above every negative,
    so their loss, log(1 + 3e⁻¹⁰⁰), is 0 in float64; rows 2 and 3 (opposite points) have
    losses near 100, and row 4 has no positive. The mean is over rows 2 and 3."""
    theirs = _pml_sup_con()(temperature=0.01)
    e = torch.eye(3, dtype=torch.float64)
    z = torch.stack([e[0], e[0], e[1], -e[1], e[2]])
    y = torch.tensor([0, 0, 1, 1, 2])
    ours = palfast.nn.SupConLoss(temperature=0.01)
    rows = palfast.info_nce(z, palfast.PairGraph.from_labels(y), temperature=0.01, reduction="none")
    assert rows[:2].tolist() == [0.0, 0.0] and bool((rows[2:4] > 90).all())
    torch.testing.assert_close(ours(z, y), rows[2:4].mean(), rtol=1e-12, atol=0)
    _assert_float64_match(lambda x: ours(x, y), lambda x: theirs(x, y), z)


def test_sup_con_arguments():
    op = "palfast.nn.SupConLoss"
    loss, z = palfast.nn.SupConLoss(), torch.randn(4, 3)
    for name in ("indices_tuple", "ref_emb", "ref_labels"):
        with pytest.raises(ValueError, match=f"{op}: {name} must be None"):
            loss(z, torch.arange(4), **{name: torch.zeros(4)})
    with pytest.raises(TypeError, match=f"{op}: labels must be an \\[N\\] = \\[4\\] integer"):
        loss(z)
    with pytest.raises(ValueError, match=f"{op}: labels must be an \\[N\\] = \\[4\\] vector"):
        loss(z, torch.arange(5))
    with pytest.raises(TypeError, match=f"{op}: labels must hold integers"):
        loss(z, torch.zeros(4))
    with pytest.raises(TypeError, match=f"{op}: embeddings must be"):
        loss(torch.zeros(4, 3, dtype=torch.long), torch.arange(4))
    with pytest.raises(ValueError, match=f"{op}: temperature must be a finite number > 0"):
        palfast.nn.SupConLoss(temperature=0.0)(z, torch.arange(4))
    with pytest.raises(ValueError, match=f"{op}: embeddings must be finite"):
        palfast.nn.SupConLoss(check_finite=True)(z * float("nan"), torch.tensor([0, 0, 1, 1]))
    assert "gather=False" in repr(loss)


# ---------------------------------------------------------------- gather=
def _every_call():
    """(name, call(module kwargs)) for every module in each form it takes."""
    z, g = torch.randn(8, 4), palfast.PairGraph.from_views(4, 2)
    a, b = z[:4], z[4:]
    nn = palfast.nn
    calls = {}
    for cls in (nn.InfoNCELoss, nn.VICRegLoss, nn.BarlowTwinsLoss, nn.SpectralContrastiveLoss, nn.VIC2Loss):
        calls[f"{cls.__name__}(z, graph)"] = lambda kw, cls=cls: cls(**kw)(z, g)
        calls[f"{cls.__name__}(z_a, z_b)"] = lambda kw, cls=cls: cls(**kw)(a, b)
    calls["SupConLoss"] = lambda kw: nn.SupConLoss(**kw)(z, torch.arange(4).repeat(2))
    return calls


@pytest.mark.parametrize("name", list(_every_call()))
def test_every_module_takes_gather(name):
    call = _every_call()[name]
    with pytest.raises(ValueError, match="gather=True needs an initialised"):
        call({"gather": True})
    with pytest.raises(TypeError, match="gather must be True or False"):
        call({"gather": "yes"})
    # without a process group gather=None and False are the single-process loss
    torch.testing.assert_close(call({"gather": None}), call({"gather": False}), rtol=0, atol=0)
