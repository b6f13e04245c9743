"""Graph-weighted InfoNCE (:func:`info_nce`): SimCLR's NT-Xent and SupCon's L_out
with the weights of a :class:`palfast.PairGraph`, on the ``palfast::info_nce``
kernel; with ``unknown_weight < 1`` a correction over the graph's known pairs
(docs/api.md, "info_nce: unknown pairs")."""

from __future__ import annotations

import math
import warnings

import torch

from .. import _ops
from .. import distributed as _dist
from .._checks import check_bool, check_choice, check_number
from ..graph import PairGraph
from ._common import acc, check_gather, check_z, with_check

__all__ = ["INFO_NCE_MAX_LOGIT", "info_nce"]

_REDUCTIONS = ("mean", "sum", "none")

#: With ``normalize=False`` the logits are raw dot products. Beyond 2**24 (float32
#: accumulation; 2**53 for float64) neighbouring floats are more than 1 apart, so a
#: logit's rounding alone changes exp(s_ij − lse_i) by up to a factor e and the
#: backward's recomputed tiles need not agree with the forward: info_nce refuses
#: such z rather than return a gradient with no correct digit (docs/api.md).
INFO_NCE_MAX_LOGIT = {torch.float32: float(2**24), torch.float64: float(2**53)}


def _check_logit_range(op: str, z: torch.Tensor, temperature: float) -> None:
    """|s_ij| <= max_i ‖z_i‖² / τ must stay within INFO_NCE_MAX_LOGIT (one host sync;
    skipped under torch.compile)."""
    if torch.compiler.is_compiling():
        return
    limit = INFO_NCE_MAX_LOGIT[_ops._acc_dtype(z)]
    bound = float(acc(z.detach()).square().sum(1).max()) / temperature
    if not bound <= limit:  # NaN z is left to check_finite
        if math.isnan(bound):
            return
        raise ValueError(
            f"{op}: with normalize=False, max_i ‖z_i‖² / temperature must be <= "
            f"INFO_NCE_MAX_LOGIT = {limit:g} for {_ops._acc_dtype(z)} accumulation "
            f"(larger logits lose their precision), got {bound:g}; scale z down, "
            "raise the temperature, or use normalize=True"
        )


#: Rows of norm below this are divided by it instead of normalised: the kernels'
#: kNormFloor (csrc/info_nce.h), which is torch.nn.functional.normalize's eps.
_NORM_FLOOR = 1e-12


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """x / max(‖x‖, _NORM_FLOOR) row-wise, as the info_nce kernel normalises: the norm is
    taken after dividing by the row's largest |entry| so rows of norm 1e30 do not
    overflow in float32 (docs/api.md, "Numerics")."""
    scale = x.detach().abs().amax(1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    norm = (x / scale).norm(dim=1, keepdim=True) * scale
    return x / norm.clamp_min(_NORM_FLOOR)


def _sparse_csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """[n, n] CSR matrix with ``values`` at (rows, cols); rows sorted ascending."""
    crow = torch.zeros(n + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": ours is tested
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, (n, n), check_invariants=False)


class _KnownPairsLogSumExp(torch.autograd.Function):
    """t_i = log Σ_{e: rows[e] = i} exp(⟨u_i, u_{cols[e]}⟩ / τ) (−inf for rows without
    pairs; rows sorted, pairs unique). The logits come from a sampled dense-dense
    product (SDDMM) on the pairs' CSR pattern and the gradient from two sparse-dense
    products, so nothing of size pairs × D is formed: memory O(N·D + pairs)."""

    @staticmethod
    def forward(ctx, u, rows, cols, temperature):
        n = u.shape[0]
        pattern = _sparse_csr(rows, cols, u.new_zeros(rows.numel()), n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            s = torch.sparse.sampled_addmm(pattern, u, u.T, beta=0.0, alpha=1.0 / temperature).values()
        # each row's sum is shifted by its largest logit, so exp cannot overflow
        peak = u.new_full((n,), float("-inf")).scatter_reduce_(0, rows, s, "amax")
        total = u.new_zeros(n).index_add_(0, rows, torch.exp(s - peak[rows]))
        t = torch.log(total) + peak
        ctx.save_for_backward(u, rows, cols, s, t)
        ctx.temperature = temperature
        return t

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_t):
        u, rows, cols, s, t = ctx.saved_tensors
        n = u.shape[0]
        q = grad_t[rows] * torch.exp(s - t[rows]) / ctx.temperature  # ∂loss/∂s_e
        by_col = torch.argsort(cols * n + rows)  # the transpose's CSR order
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            grad_u = torch.sparse.mm(_sparse_csr(rows, cols, q, n), u)
            grad_u += torch.sparse.mm(_sparse_csr(cols[by_col], rows[by_col], q[by_col], n), u)
        return grad_u, None, None, None


def _unknown_pairs_correction(keys, graph, rows, lse, temperature, normalize, begin, end, unknown_weight):
    """lse'_i − lse_i for the anchors of rows [begin, end) (0 elsewhere), where
    lse'_i = log(λ e^{lse_i} + (1 − λ) Σ_{k∈K_i} e^{s_ik}) (info_nce, "Unknown pairs").

    lse_i is the kernel's value; its gradient is that of ℓ⁰_i + ⟨û_i, (Gû)_i⟩/(τ W_i),
    which equals lse_i for an anchor (ℓ⁰ the kernel's rows), through the kernel's
    backward and one graph SpMM."""
    x = acc(keys)
    u = _unit_rows(x) if normalize else x
    w = graph.degree().to(x.dtype)
    anchor = w > 0
    anchor[:begin] = False
    anchor[end:] = False
    pos = (u * _ops.graph_spmm(u, *graph.kernel_args(), False)).sum(1) / (
        temperature * torch.where(anchor, w, torch.ones_like(w))
    )
    recon = rows + pos
    lse = lse.detach() + (recon - recon.detach())
    pr, pc = graph.known_pairs(anchor)
    t = _KnownPairsLogSumExp.apply(u, pr, pc, temperature)
    t = torch.where(anchor, t, torch.zeros_like(t))  # finite where unused: no NaN gradients
    mixed = torch.logaddexp(
        lse + math.log(unknown_weight) if unknown_weight > 0 else torch.full_like(lse, float("-inf")),
        t + math.log1p(-unknown_weight),
    )
    return torch.where(anchor, mixed - lse, torch.zeros_like(lse))


def info_nce(
    z: torch.Tensor,
    graph: PairGraph,
    *,
    temperature: float = 0.1,
    normalize: bool = True,
    reduction: str = "mean",
    unknown_weight: float = 1.0,
    check_finite: bool = False,
    gather: bool | None = None,
) -> torch.Tensor:
    r"""Graph-weighted InfoNCE (SupCon's L_out with weights), docs/api.md, "Losses".

    .. math::
        \ell_i = -\frac{1}{W_i}\sum_{j\ne i} w_{ij}\Big[s_{ij}
                 - \log\sum_{k\ne i} \omega_{ik} e^{s_{ik}}\Big],\qquad
        s_{ij} = \langle \hat z_i, \hat z_j\rangle / \tau

    for rows with W_i = Σ_j w_ij > 0; ω_ik = λ = ``unknown_weight`` for pairs neither
    positive nor known negative, else 1 (docs/api.md#info_nce-unknown-pairs). λ = 1 is
    NT-Xent with ``from_views(n, 2)``, SupCon with ``from_labels``; memory O(N·D + E).

    Args: ``z [N, D]`` float embeddings and ``graph``, a :class:`PairGraph` over its rows
    on its device; ``temperature`` τ > 0; ``normalize``: cosine (True) or raw dot products
    (False: ``max_i ‖z_i‖²/τ <= INFO_NCE_MAX_LOGIT`` is checked, one host sync);
    ``reduction``: ``"mean"`` over rows with W_i > 0 (0 with zero gradient when none),
    ``"sum"``, or ``"none"`` (``[N]``, 0 for rows without positives; this rank's rows
    when gathered); ``unknown_weight`` λ in [0, 1]; ``check_finite``, ``gather`` as in
    :mod:`palfast.functional`. Returns z's dtype, computed in float32 (float64 for float64 z).

    Example::

        >>> import torch, palfast
        >>> z = torch.randn(8, 16, requires_grad=True)
        >>> palfast.info_nce(z, palfast.PairGraph.from_views(4, 2), temperature=0.5).backward()
    """
    op = "palfast.info_nce"
    gather = check_gather(op, gather)
    unchanged = check_z(op, z, graph, check_finite, n_global=gather)
    temperature = check_number(op, "temperature", temperature, 0.0, strict=True)
    normalize = check_bool(op, "normalize", normalize)
    check_choice(op, "reduction", reduction, _REDUCTIONS)
    unknown_weight = check_number(op, "unknown_weight", unknown_weight, 0.0, maximum=1.0)
    if not normalize:
        _check_logit_range(op, z, temperature)
    keys, begin, end = _dist.all_gather_rows(z, graph.num_nodes) if gather else (z, 0, z.shape[0])
    rows, lse = _ops.info_nce(keys, *graph.kernel_args(), temperature, normalize, begin, end)
    if unknown_weight < 1:
        if torch.compiler.is_compiling():
            raise ValueError(
                f"{op}: unknown_weight < 1 cannot run under torch.compile (its "
                "known-pair list has a data-dependent size); call info_nce outside "
                "the compiled region, or use unknown_weight=1.0"
            )
        if _ops._transform_depth():
            raise ValueError(
                f"{op}: unknown_weight < 1 cannot run under torch.func transforms "
                "(grad, vjp, vmap): its backward builds sparse CSR tensors, which "
                "torch.func cannot wrap; use torch.autograd.grad, or "
                "unknown_weight=1.0"
            )
        rows = rows + _unknown_pairs_correction(
            keys, graph, rows, lse, temperature, normalize, begin, end, unknown_weight
        )
    if reduction == "none":
        return with_check(rows[begin:end], unchanged, z.dtype)
    out = rows.sum()
    if reduction == "mean":
        out = out / max(graph.num_anchors, 1)
    if gather:
        out = _dist.global_value(out)
    return with_check(out, unchanged, z.dtype)
