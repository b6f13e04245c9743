"""Bad input and edge cases across the public API (docs/api.md, "What raises").

Each case once corrupted memory, returned garbage, or failed with an unclear
message; each now raises a clear exception naming the argument, or returns the
right value. Per-op numerics live in the per-op test files.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

import palfast
from palfast import PairGraph, reference
from palfast._ops import ops
from palfast.testing import LOSSES

# Every loss module of palfast.nn with a two-view form, module(z_a, z_b).
MODULES = [
    palfast.nn.InfoNCELoss,
    palfast.nn.VICRegLoss,
    palfast.nn.BarlowTwinsLoss,
    palfast.nn.SpectralContrastiveLoss,
    palfast.nn.VIC2Loss,
]


def _graph(device="cpu", n=8):
    """Explicit edges (not symmetric, so both CSR sides exist) plus a label set."""
    e = PairGraph.from_edges([0, 1, 2, 5], [1, 2, 0, 6], [1.0, 2.0, 0.5, 1.0], num_nodes=n, symmetric=False)
    return (e + PairGraph.from_labels(torch.arange(n) % 3)).to(device)


# ------------------------------------------------ graphs changed after they were built
# (more in tests/test_graph_integrity.py)
@pytest.mark.parametrize("loss", LOSSES)
def test_graph_changed_in_place_is_refused_by_the_losses(device, loss):
    g = _graph(device)
    g.indices[0] = 10**9
    with pytest.raises(
        ValueError,
        match=rf"palfast.{loss}: graph must not be changed after it "
        r"is built, got changes to graph.indices",
    ):
        LOSSES[loss](torch.randn(8, 4, device=device), g)


def test_copied_and_pickled_graphs_are_not_taken_for_changed_ones():
    import copy
    import pickle

    g = _graph()
    g.indices.add_(0)  # an in-place op that changes no value is no change
    for h in (g, copy.deepcopy(_graph()), pickle.loads(pickle.dumps(_graph())), _graph().to("cpu")):
        palfast.info_nce(torch.randn(8, 4), h)
    g.indices.add_(1)
    with pytest.raises(ValueError, match="graph must not be changed"):
        palfast.info_nce(torch.randn(8, 4), g)


def test_graph_replaced_with_bad_class_ids_is_refused_at_once(device):
    """dataclasses.replace runs PairGraph's validation (the ops' C++ check stays, for
    direct op calls: test_every_graph_op_rejects_corrupt_graph_tensors)."""
    with pytest.raises(
        ValueError,
        match=r"PairGraph: labels\[0\] must hold class ids in \[-1, "
        r"label_classes\[0\] = 2\), got values in \[0, 2\]",
    ):
        dataclasses.replace(_graph(device), label_classes=(2,))


def _corrupt(g, what):
    """kernel_args of g with one tensor corrupted (clones: g itself stays valid)."""
    args = [a.clone() if isinstance(a, torch.Tensor) else list(a) for a in g.kernel_args()]
    if what == "index":
        args[1][0] = 10**9
    elif what == "negative index":
        args[1][-1] = -3
    elif what == "t_index":
        args[4][0] = 8
    elif what == "indptr decreasing":
        args[0][1] = 3  # [0, 3, 2, ...]
    elif what == "indptr end":
        args[0][-1] += 1
    elif what == "class id":
        args[6][0, 0] = 3
    elif what == "class id below -1":
        args[6][0, 0] = -2
    elif what == "classes > N":
        args[8][0] = 10**12
    elif what == "nan weight":
        args[2][0] = float("nan")
    elif what == "negative degree":
        args[9][0] = -1.0
    return args


CORRUPTIONS = {
    "index": r"graph.indices must be in \[0, N = 8\), got values in \[0, 1000000000\]",
    "negative index": r"graph.indices must be in \[0, N = 8\), got values in \[-3,",
    "t_index": r"graph.t_indices must be in \[0, N = 8\)",
    "indptr decreasing": "graph.indptr must be non-decreasing",
    "indptr end": r"graph.indptr must start at 0 and end at E = 4, got first 0, last 5",
    "class id": r"graph.labels\[0\] must hold class ids in \[-1, label_classes = 3\)",
    "class id below -1": r"graph.labels\[0\] must hold class ids",
    "classes > N": r"graph.label_classes\[0\] must be in \[0, N = 8\]",
    "nan weight": "graph.weights must be finite and >= 0",
    "negative degree": "graph.pos_weight must be finite and >= 0",
}


@pytest.mark.parametrize("what", CORRUPTIONS)
def test_every_graph_op_rejects_corrupt_graph_tensors(device, what):
    """No call of torch.ops.palfast.* can read or write out of bounds (csrc/graph.h)."""
    g = _graph(device)
    args = _corrupt(g, what)
    z = torch.randn(8, 4, device=device, dtype=torch.float64)
    rows = torch.ones(8, device=device, dtype=torch.float64)
    lse = torch.zeros(8, device=device, dtype=torch.float64)
    g0 = torch.ones((), device=device, dtype=torch.float64)
    aux = torch.zeros(1, 4, 4, device=device, dtype=torch.float64)
    calls = {
        "info_nce": lambda: ops.info_nce(z, *args, 0.1, True, 0, 8),
        "info_nce_backward": lambda: ops.info_nce_backward(rows, z, *args, lse, 0.1, True, 0, 8),
        "graph_spmm": lambda: ops.graph_spmm(z, *args, False),
        "graph_dirichlet": lambda: ops.graph_dirichlet(z, *args),
        "graph_dirichlet_backward": lambda: ops.graph_dirichlet_backward(g0, z, *args),
        "barlow_twins_xcorr": lambda: ops.barlow_twins_xcorr(z, *args, 0.005, 0.1, False),
        "barlow_twins_xcorr_backward": lambda: ops.barlow_twins_xcorr_backward(g0, z, *args, aux, 0.005, 0.1, False),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=rf"palfast.{name}: {CORRUPTIONS[what]}"):
            call()


def test_valid_graph_passes_the_op_check(device):
    g = _graph(device)
    z = torch.randn(8, 4, device=device, dtype=torch.float64)
    torch.testing.assert_close(ops.graph_spmm(z, *g.kernel_args(), False), g.to_dense(torch.float64).to(device) @ z)


# ------------------------------------------------------------------- flags and types
@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda z, g: palfast.info_nce(z, g, normalize="no"),
            "palfast.info_nce: normalize must be True or False, got 'no'",
        ),
        (lambda z, g: palfast.info_nce(z, g, check_finite=1), "check_finite must be True or False"),
        (lambda z, g: palfast.vicreg(z, g, check_finite="yes"), "check_finite must be True or False"),
        (lambda z, g: palfast.barlow_twins(z, g, gather="no"), "gather must be True or False"),
        (lambda z, g: palfast.nn.InfoNCELoss(normalize="no")(z, g), "normalize must be True or False"),
        (lambda z, g: palfast.nn.VICRegLoss(check_finite="no")(z[:4], z[4:]), "check_finite must be"),
        (
            lambda z, g: PairGraph.from_edges([0], [1], num_nodes=2, symmetric="no"),
            "PairGraph.from_edges: symmetric must be True or False, got 'no'",
        ),
    ],
)
def test_truthy_strings_are_not_booleans(call, match):
    with pytest.raises(TypeError, match=match):
        call(torch.randn(8, 4), PairGraph.from_views(4, 2))


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("bad_view", ["z_a", "z_b"])
def test_check_finite_holds_for_two_view_modules(module, bad_view):
    z_a, z_b = torch.randn(6, 4), torch.randn(6, 4)
    (z_a if bad_view == "z_a" else z_b)[2, 1] = float("nan")
    with pytest.raises(ValueError, match=rf"{bad_view} must be finite \(check_finite=True\)"):
        module(check_finite=True)(z_a, z_b)
    assert module()(z_a, z_b).isnan()  # the default still propagates NaN, like torch


@pytest.mark.parametrize(
    "args,exc,match",
    [
        (lambda g: (torch.randn(4), g), ValueError, "z must be a 2-D tensor"),
        (lambda g: (torch.randn(4, 3, 1), g), ValueError, "z must be a 2-D tensor"),
        (
            lambda g: (torch.ones(4, 3, dtype=torch.long), g),
            TypeError,
            "z must be float32, float64, float16 or bfloat16",
        ),
        (lambda g: (torch.ones(4, 3, dtype=torch.int32), g), TypeError, "z must be float32"),
        (lambda g: ([[1.0]], g), TypeError, "z must be a torch.Tensor"),
        (lambda g: (torch.randn(5, 3), g), ValueError, r"graph must have one node per row of z \(5\)"),
        (lambda g: (torch.randn(4, 3), torch.eye(4)), TypeError, "graph must be a palfast.PairGraph"),
        (lambda g: (torch.randn(4, 3), None), TypeError, "graph must be a palfast.PairGraph"),
    ],
)
@pytest.mark.parametrize("loss", LOSSES)
def test_bad_z_and_graph(loss, args, exc, match):
    with pytest.raises(exc, match=rf"palfast.{loss}: {match}"):
        LOSSES[loss](*args(PairGraph.from_views(2, 2)))


@pytest.mark.parametrize(
    "views,exc,match",
    [
        (lambda: (torch.randn(4, 3), torch.randn(5, 3)), ValueError, "z_a and z_b must both be"),
        (lambda: (torch.randn(4, 3), torch.randn(4, 2)), ValueError, "z_a and z_b must both be"),
        (lambda: (torch.randn(4, 3), "graph"), TypeError, "z_b must be a torch.Tensor"),
        (lambda: (torch.randn(4, 3), torch.randn(4, 3, dtype=torch.float64)), ValueError, "z_b must have z_a's dtype"),
        (lambda: (torch.ones(4, 3, dtype=torch.long), torch.randn(4, 3)), TypeError, "z_a must be float32"),
    ],
)
@pytest.mark.parametrize("module", MODULES)
def test_bad_views_of_two_view_modules(module, views, exc, match):
    with pytest.raises(exc, match=match):
        module()(*views())


# The covariance losses' hyper-parameters and the modules that take them.
COVARIANCE_MODULES = {"vicreg": palfast.nn.VICRegLoss, "barlow_twins": palfast.nn.BarlowTwinsLoss}


@pytest.mark.parametrize(
    "loss,bad,exc,match",
    [
        ("vicreg", dict(sim_coeff=-1.0), ValueError, "sim_coeff must be a finite number >= 0, got -1.0"),
        ("vicreg", dict(std_coeff=float("inf")), ValueError, "std_coeff must be a finite number >= 0"),
        ("vicreg", dict(cov_coeff="1"), TypeError, "cov_coeff must be a number, got str"),
        ("vicreg", dict(eps=0.0), ValueError, "eps must be a finite number > 0, got 0.0"),
        ("barlow_twins", dict(lambd=-0.1), ValueError, "lambd must be a finite number >= 0, got -0.1"),
        ("barlow_twins", dict(lambd=None), TypeError, "lambd must be a number, got NoneType"),
        ("barlow_twins", dict(eps=-1.0), ValueError, "eps must be a finite number > 0, got -1.0"),
    ],
)
def test_bad_hyper_parameters_of_the_function_and_the_two_view_module(loss, bad, exc, match):
    with pytest.raises(exc, match=rf"palfast.{loss}: {match}"):
        LOSSES[loss](torch.randn(4, 3), PairGraph.from_views(2, 2), **bad)
    with pytest.raises(exc, match=match):
        COVARIANCE_MODULES[loss](**bad)(torch.randn(4, 3), torch.randn(4, 3))


def test_two_view_info_nce_checks_dtypes():
    loss = palfast.nn.InfoNCELoss()
    with pytest.raises(
        TypeError, match="palfast.nn.InfoNCELoss: z_b must be float32, float64, float16 or bfloat16, got torch.int64"
    ):
        loss(torch.randn(4, 3), torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="z_b must have z_a's dtype and device"):
        loss(torch.randn(4, 3), torch.randn(4, 3, dtype=torch.float64))


def test_from_edges_refuses_weights_that_are_not_numbers():
    with pytest.raises(TypeError, match="PairGraph.from_edges: weights must be a tensor of real"):
        PairGraph.from_edges([0], [1], ["a"], num_nodes=2)


def test_from_dense_refuses_complex():
    with pytest.raises(TypeError, match="PairGraph.from_dense: W must be real, got torch.complex64"):
        PairGraph.from_dense(torch.ones(3, 3, dtype=torch.complex64))


@pytest.mark.parametrize(
    "labels",
    [
        np.array([0, 2**64 - 1], dtype=np.uint64),
        torch.tensor([0, 2**63], dtype=torch.uint64),
        [0, 2**64 - 1],
    ],
)
def test_from_labels_refuses_labels_beyond_int64(labels):
    with pytest.raises(ValueError, match="PairGraph.from_labels: labels must fit in int64"):
        PairGraph.from_labels(labels)


def test_from_labels_keeps_large_int64_labels():
    g = PairGraph.from_labels(np.array([2**63 - 1, 0, 2**63 - 1], dtype=np.uint64))
    assert g.label_classes == (2,) and g.num_anchors == 2


# --------------------------------------------------------------------- weight range
@pytest.mark.parametrize(
    "call",
    [
        lambda: PairGraph.from_edges([0], [1], [1e-46], num_nodes=2),
        lambda: PairGraph.from_edges([0], [1], torch.tensor([1e-40], dtype=torch.float64), num_nodes=2),
        lambda: 1e-46 * PairGraph.from_edges([0], [1], num_nodes=2),
        lambda: 1e-46 * PairGraph.from_views(2, 2),
        lambda: PairGraph.from_labels(torch.tensor([0, 0]), weight=1e-46),
        lambda: PairGraph.from_edges([0, 0], [1, 1], [3e38, 3e38], num_nodes=2),
        lambda: PairGraph.from_dense(torch.full((2, 2), 1e31)),
        lambda: PairGraph.from_labels(torch.zeros(2**11, dtype=torch.long), weight=1e24),
    ],
)
def test_weights_outside_the_float32_safe_range_are_refused(call):
    with pytest.raises(
        ValueError,
        match=r"must be (0 or in \[MIN_WEIGHT, MAX_WEIGHT\] = "
        r"\[1e-30, 1e\+30\]|<= MAX_WEIGHT = 1e\+30)",
    ):
        call()


def test_weights_at_the_limits_give_finite_losses():
    z = torch.randn(4, 3, requires_grad=True)
    for w in (palfast.graph.MIN_WEIGHT, palfast.graph.MAX_WEIGHT / 16):
        g = PairGraph.from_edges([0, 2], [1, 3], [w, w], num_nodes=4)
        for loss in LOSSES.values():
            value = loss(z, g)
            value.backward()
            assert torch.isfinite(value) and torch.isfinite(z.grad).all()
            z.grad = None


# ------------------------------------------------------------- graph weights and grad
def test_weights_that_require_grad_are_refused():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(ValueError, match="PairGraph.from_edges: weights must not require grad"):
        PairGraph.from_edges([0, 1], [1, 2], w, num_nodes=3)
    with pytest.raises(ValueError, match="PairGraph.from_dense: W must not require grad"):
        PairGraph.from_dense(torch.ones(3, 3, requires_grad=True))
    with pytest.raises(ValueError, match="PairGraph.__mul__: scale must not require grad"):
        torch.tensor(0.5, requires_grad=True) * PairGraph.from_views(2, 2)
    g = PairGraph.from_views(2, 2)
    assert (np.float32(0.5) * g).label_weights == (0.5,)
    g.pos_weight.requires_grad_()
    with pytest.raises(ValueError, match="palfast.vicreg: graph.pos_weight must not require grad"):
        palfast.vicreg(torch.randn(4, 3), g)


# ---------------------------------------------------------------------- double backward
@pytest.mark.parametrize("loss", LOSSES)
def test_double_backward_raises_instead_of_a_wrong_value(loss):
    z = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    g = PairGraph.from_views(4, 2)
    kw = dict(n_views=2) if loss == "vic2" else {}
    (grad,) = torch.autograd.grad(LOSSES[loss](z, g, **kw), z)  # first order is fine
    assert torch.isfinite(grad).all()
    with pytest.raises(RuntimeError, match=r"does not support double backward \(create_graph=True"):
        torch.autograd.grad(LOSSES[loss](z, g, **kw), z, create_graph=True)


@pytest.mark.parametrize("module", MODULES)
def test_double_backward_of_two_view_modules_raises(module):
    z_a = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    z_b = torch.randn(6, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(module()(z_a, z_b), z_a, create_graph=True)


# ------------------------------------------------------------------- sizes and messages
@pytest.mark.parametrize("loss", LOSSES)
def test_empty_batch_is_a_clear_error(loss):
    """No graph has 0 nodes, and an empty z is refused before the graph is looked at."""
    with pytest.raises(
        ValueError,
        match=r"PairGraph.from_labels: len\(labels\) must satisfy "
        r"1 <= len\(labels\)",
    ):
        PairGraph.from_labels(torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"palfast.{loss}: z must have at least 1 rows"):
        LOSSES[loss](torch.zeros(0, 4), PairGraph.from_views(1, 1))


def test_huge_graphs_are_refused_before_allocating():
    with pytest.raises(
        ValueError,
        match=r"PairGraph.from_views: n must satisfy "
        r"1 <= n <= 2147483647, got 2147483648",
    ):
        PairGraph.from_views(2**31, 2)
    with pytest.raises(ValueError, match=r"n \* n_views must be <= MAX_NODES = 2147483647"):
        PairGraph.from_views(2**30, 2)
    with pytest.raises(ValueError, match="num_nodes must satisfy 1 <= num_nodes <= 2147483647"):
        PairGraph.from_edges([0], [1], num_nodes=2**40)


# ------------------------------------------- arguments that were taken unchecked or raw
@pytest.mark.parametrize("flag", [np.bool_(True), np.bool_(False)])
def test_numpy_booleans_are_booleans(flag):
    z, g = torch.randn(8, 4), PairGraph.from_views(4, 2)
    palfast.info_nce(z, g, normalize=flag)
    PairGraph.from_edges([0], [1], num_nodes=2, symmetric=flag)
    from palfast._checks import check_bool

    assert check_bool("op", "flag", flag) is bool(flag)


def test_seed_must_be_an_int():
    from palfast.active import RelationStore, select_queries

    x = torch.randn(20, 4)
    for seed, exc, match in (
        ("5", TypeError, "seed must be an int, got '5'"),
        (2.0, TypeError, "seed must be an int"),
        (-1, ValueError, r"seed must satisfy 0 <= seed <= 18446744073709551615"),
        (2**64, ValueError, "seed must satisfy"),
    ):
        with pytest.raises(exc, match=rf"palfast.active.select_queries: {match}"):
            select_queries(x, RelationStore(), 3, "random", seed=seed)
    assert select_queries(x, RelationStore(), 3, "random", seed=np.int64(5)).shape == (3, 2)


@pytest.mark.parametrize("weight", [-2, float("nan"), "1"])
def test_negative_weight_is_checked_in_both_module_forms(weight):
    loss = palfast.nn.SpectralContrastiveLoss(negative_weight=weight)
    z_a, z_b = torch.randn(4, 3), torch.randn(4, 3)
    for args in ((z_a, z_b), (torch.cat([z_a, z_b]), PairGraph.from_views(4, 2))):
        with pytest.raises((TypeError, ValueError), match="negative_weight must be a"):
            loss(*args)


@pytest.mark.parametrize(
    "ids",
    [[0, 2**63], [2**64 - 1, 0], np.array([0, 2**63], dtype=np.uint64), torch.tensor([0, 2**63], dtype=torch.uint64)],
)
def test_ids_beyond_int64_are_a_clear_error(ids):
    from palfast.active import candidate_pairs

    with pytest.raises(ValueError, match=r"palfast.active.candidate_pairs: ids must fit in int64"):
        candidate_pairs(torch.randn(2, 3), 1, ids=ids)
    with pytest.raises(ValueError, match=r"palfast.metrics.knn_accuracy: train_y must fit in int64"):
        palfast.metrics.knn_accuracy(torch.randn(2, 3), ids, torch.randn(2, 3), [0, 1], k=1)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda z: z.to_sparse(), r"z must be a dense \(strided\) tensor, got torch.sparse_coo"),
        (lambda z: z.to_sparse_csr(), r"z must be a dense \(strided\) tensor, got torch.sparse_csr"),
        (lambda z: torch.nested.nested_tensor([z, z]), "z must be a regular tensor, got a nested"),
    ],
)
@pytest.mark.parametrize("loss", LOSSES)
def test_sparse_and_nested_z_are_a_clear_error(make, match, loss):
    with pytest.raises(TypeError, match=rf"palfast.{loss}: {match}"):
        LOSSES[loss](make(torch.randn(8, 4)), PairGraph.from_views(4, 2))


@pytest.mark.parametrize("device,exc", [("bogus", ValueError), (3.5, TypeError), (True, TypeError)])
def test_bad_device_is_a_clear_error(device, exc):
    match = "device must be a torch.device or a device string such as 'cpu' or 'cuda:0', got"
    with pytest.raises(exc, match=f"PairGraph.from_views: {match}"):
        PairGraph.from_views(4, 2, device=device)
    with pytest.raises(exc, match=f"PairGraph.to: {match}"):
        PairGraph.from_views(4, 2).to(device)


# ------------------------------------------------------------------- float32 overflow
COVARIANCE_LOSSES = ["vicreg", "barlow_twins", "spectral_contrastive", "vic2"]


@pytest.mark.parametrize("loss", COVARIANCE_LOSSES)
@pytest.mark.parametrize("scale", [1e10, 1e15, 1e17, 3e18, 1e19, 1e20, 1e30])
def test_huge_z_never_gives_a_wrong_finite_loss_or_nan(loss, scale):
    """float32 sums of squares overflow for |z| ≳ 1e19: the result is the float64
    value rounded to float32 (inf where that overflows) or a ValueError naming z."""
    torch.manual_seed(0)
    g = PairGraph.from_views(4, 2)
    y = torch.randn(8, 5)
    want = getattr(reference, loss)(y.double() * scale, g)
    try:
        got = LOSSES[loss](y * scale, g)
    except ValueError as e:
        assert re.search(rf"palfast.{loss}: z is too large for float32 accumulation", str(e))
        return
    assert not torch.isnan(got)
    if abs(want) > torch.finfo(torch.float32).max:
        assert got == torch.sign(want) * float("inf")
    else:
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_huge_z_error_names_z_and_overflow():
    g = PairGraph.from_views(4, 2)
    with pytest.raises(
        ValueError,
        match=r"palfast.barlow_twins: z is too large for float32 "
        r"accumulation \(largest \|z\| = .*\): .* overflow",
    ):
        palfast.barlow_twins(torch.randn(8, 5) * 1e19, g)
    # float64 z has the range for it
    torch.testing.assert_close(
        palfast.barlow_twins(torch.randn(8, 5, dtype=torch.float64) * 1e19, g).isfinite(), torch.tensor(True)
    )
