"""The part of the contract every graph loss shares (docs/api.md), run once per loss.

Each loss's own file (tests/test_<loss>.py) checks what is particular to it: the
float64 reference over sizes and graph kinds, gradcheck, its two-view form, its
edge cases and its error messages. Here the same checks run over every loss in
LOSSES: float32 close to float64, float16/bfloat16 within the rounding rule of
palfast/testing.py (assert_rounding_close), non-contiguous input, and non-finite input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

import palfast
from palfast import reference
from palfast.testing import (
    assert_float32_close_to_float64,
    assert_nan_propagates_unless_checked,
    assert_within_rounding_error,
    info_nce_cond,
)

# float tolerances: CI runs these again under a second CPU capability (.ci/run)
pytestmark = pytest.mark.numeric


@dataclass(frozen=True)
class Loss:
    fn: Callable
    ref: Callable
    # [N, D] of the low-precision check, and the scale of its z: small enough that
    # the naive reference does not overflow float16 on the way (else it is no yardstick).
    low_precision_shapes: tuple = ((64, 96), (200, 24))
    low_precision_scale: float = 1.0
    low_precision_kw: dict = field(default_factory=dict)
    # The loss's condition (palfast/testing.py, ROUNDING_MULTIPLE): 1 for the
    # covariance losses, 1 + 1/τ for info_nce.
    cond: float = 1.0


LOSSES = {
    "info_nce": Loss(
        palfast.info_nce,
        reference.info_nce,
        low_precision_shapes=((257, 64),),
        low_precision_kw=dict(temperature=0.2, reduction="none"),
        cond=info_nce_cond(torch.zeros(1, 1), temperature=0.2),
    ),
    "vicreg": Loss(palfast.vicreg, reference.vicreg, low_precision_scale=0.8),
    "barlow_twins": Loss(palfast.barlow_twins, reference.barlow_twins, low_precision_kw=dict(lambd=0.05)),
    "spectral_contrastive": Loss(
        palfast.spectral_contrastive,
        reference.spectral_contrastive,
        low_precision_shapes=((96, 32),),
        low_precision_scale=0.3,
    ),
}


def _low_precision_cases():
    return [
        pytest.param(name, n, d, id=f"{name}-{n}x{d}")
        for name, loss in LOSSES.items()
        for n, d in loss.low_precision_shapes
    ]


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.slow
def test_float32_close_to_float64(device, graph_factory, name):
    torch.manual_seed(2)
    z = torch.randn(300, 200, device=device)
    g = graph_factory("semi", 300, seed=2).to(device)
    assert_float32_close_to_float64(LOSSES[name].fn, LOSSES[name].ref, z, g)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name,n,d", _low_precision_cases())
def test_low_precision_within_rounding_error(device, graph_factory, name, n, d, dtype):
    loss = LOSSES[name]
    torch.manual_seed(3)
    z64 = torch.randn(n, d, dtype=torch.float64, device=device) * loss.low_precision_scale
    g = graph_factory("semi", n, seed=4).to(device)
    assert_within_rounding_error(loss.fn, loss.ref, z64, g, dtype, cond=loss.cond, **loss.low_precision_kw)


@pytest.mark.parametrize("kind", ["labels", "edges"])
@pytest.mark.parametrize("name", LOSSES)
def test_non_contiguous_input(device, graph_factory, name, kind):
    torch.manual_seed(12)
    z = torch.randn(40, 60, dtype=torch.float64, device=device)[:, ::2]
    assert not z.is_contiguous()
    g = graph_factory(kind, 40).to(device)
    torch.testing.assert_close(LOSSES[name].fn(z, g), LOSSES[name].ref(z, g))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", LOSSES)
def test_non_finite_input_gives_nan_unless_checked(device, name, bad):
    z = torch.randn(8, 4, device=device)
    z[2, 1] = bad
    g = palfast.PairGraph.from_views(4, 2).to(device)
    assert_nan_propagates_unless_checked(LOSSES[name].fn, z, g)


# ------------------------------------------------------------ the functional front
TWO_VIEW = {
    "vicreg_two_view": palfast.nn.VICRegLoss,
    "barlow_twins_two_view": palfast.nn.BarlowTwinsLoss,
    "spectral_contrastive_two_view": palfast.nn.SpectralContrastiveLoss,
}


def test_functional_front_exports_every_loss_of_palfast_losses():
    import palfast.functional as F
    import palfast.losses

    assert set(F.__all__) == set(palfast.losses.__all__)
    for name in F.__all__:
        assert getattr(F, name) is getattr(palfast.losses, name)
    assert F.INFO_NCE_MAX_LOGIT[torch.float32] == 2**24  # docs/api.md, "Numerics"


@pytest.mark.parametrize("name", TWO_VIEW)
def test_two_view_function_is_the_modules_two_view_form(name):
    fn = getattr(palfast.functional, name)
    z_a, z_b = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    assert torch.equal(fn(z_a, z_b), TWO_VIEW[name]()(z_a, z_b))
    assert fn(z_a.float(), z_b.float()).dtype == torch.float32


@pytest.mark.parametrize("name", TWO_VIEW)
def test_two_view_function_checks_its_views(name):
    fn = getattr(palfast.functional, name)
    with pytest.raises(ValueError, match=rf"palfast.{name}: z_a and z_b must both be \[n, D\]"):
        fn(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(TypeError, match=rf"palfast.{name}: z_b must be a torch.Tensor"):
        fn(torch.randn(4, 3), palfast.PairGraph.from_views(2, 2))
    bad = torch.randn(4, 3)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match=rf"palfast.{name}: z_b must be finite"):
        fn(torch.randn(4, 3), bad, check_finite=True)
    with pytest.raises(ValueError, match="gather=True needs an initialised torch.distributed"):
        fn(torch.randn(4, 3), torch.randn(4, 3), gather=True)
