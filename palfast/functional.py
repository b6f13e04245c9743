"""Graph-weighted self-supervised losses (docs/api.md), stateless.

Every loss takes ``(z, graph, *, ...)`` where ``z [N, D]`` are embeddings (views
of one image are separate rows) and ``graph`` is a :class:`palfast.PairGraph`
over the N rows. Arguments are checked here, once, before any kernel runs.
NaN/Inf in ``z`` propagate to a NaN loss like PyTorch's losses; pass
``check_finite=True`` to get a ``ValueError`` instead (it costs a host sync).
First derivatives only: ``create_graph=True`` through a loss raises (docs/api.md,
"Gradients"), and so does a graph whose tensors require grad.

Covariance losses (:func:`vicreg`, :func:`barlow_twins`, :func:`spectral_contrastive`,
:func:`vic2`) share two arguments and their return value:

* ``check_finite``: raise ``ValueError`` on NaN/Inf in z (else they give NaN);
* ``gather``: under torch.distributed (default: on when world size > 1) z holds this
  rank's rows and ``graph`` is over the global batch; the global loss is returned on
  every rank (see :func:`_global_rows`);
* they return a scalar in z's dtype, computed in float32 (float64 for float64 z).
"""

from __future__ import annotations

import math
import warnings

import torch

from . import _ops
from . import distributed as _dist
from ._checks import FLOAT_DTYPES, check_bool, check_choice, check_int, check_number, check_tensor
from .graph import PairGraph

__all__ = ["info_nce", "vicreg", "barlow_twins", "spectral_contrastive", "vic2"]

_REDUCTIONS = ("mean", "sum", "none")

#: With ``normalize=False`` the logits are raw dot products. Beyond 2**24 (float32
#: accumulation; 2**53 for float64) neighbouring floats are more than 1 apart, so a
#: logit's rounding alone changes exp(s_ij − lse_i) by up to a factor e and the
#: backward's recomputed tiles need not agree with the forward: info_nce refuses
#: such z rather than return a gradient with no correct digit (docs/api.md).
INFO_NCE_MAX_LOGIT = {torch.float32: float(2**24), torch.float64: float(2**53)}


def _check_z(op: str, z, graph, check_finite, n_global: bool = False) -> torch.Tensor:
    """z: a float [N >= 1, D >= 1] tensor; graph: an unchanged PairGraph over its rows.
    Returns the 0-dim zero of ``graph.check_unchanged``, which the loss adds to its
    result (:func:`_with_check`).

    An empty batch (N = 0) is refused rather than given a loss of 0: an empty
    batch is almost always a data-loading bug (docs/api.md, "Edge cases")."""
    check_finite = check_bool(op, "check_finite", check_finite)
    check_tensor(op, "z", z, min_rows=1, dtypes=FLOAT_DTYPES)
    if not isinstance(graph, PairGraph):
        raise TypeError(f"{op}: graph must be a palfast.PairGraph, got {type(graph).__name__}. "
                        "Build one with PairGraph.from_views / from_labels / from_edges")
    if not n_global and graph.num_nodes != z.shape[0]:
        raise ValueError(f"{op}: graph must have one node per row of z ({z.shape[0]}), "
                         f"got a graph over {graph.num_nodes} nodes")
    if graph.device != z.device:
        raise ValueError(f"{op}: graph must be on z's device ({z.device}), got {graph.device}; "
                         "use graph.to(z.device)")
    unchanged = graph.check_unchanged(op)
    _check_finite(op, "z", z, check_finite)
    return unchanged


def _with_check(out: torch.Tensor, unchanged: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out`` in ``dtype``, plus the zero of the graph check: the result depends on the
    check, so a compiled graph cannot drop it (PairGraph.check_unchanged)."""
    return (out + unchanged.to(out.dtype)).to(dtype)


def _no_overflow_nan(op: str, z: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """``loss``, or ``ValueError`` naming z when it is NaN although z is finite.

    The covariance losses sum squares and fourth powers of z's entries in float32
    (float64 for float64 z); in float32 squared inner products overflow from
    |z| ≈ 1e9 (spectral_contrastive, vic2), squares from ≈ 1e19, and inf − inf gives
    NaN where the exact loss is merely large (docs/api.md, "Numerics"). A loss
    that legitimately overflows to ±inf is returned as such. One host sync (one
    scalar); skipped under torch.compile, where such a loss stays NaN."""
    if torch.compiler.is_compiling() or not bool(torch.isnan(loss)):
        return loss
    x = z.detach()
    if not bool(torch.isfinite(x).all()):
        return loss  # NaN/Inf in z: NaN loss, like PyTorch's losses (check_finite)
    peak = float(torch.maximum(x.amax(), -x.amin()))
    acc = str(_ops._acc_dtype(z)).removeprefix("torch.")
    raise ValueError(f"{op}: z is too large for {acc} accumulation (largest |z| = "
                     f"{peak:g}): its sums of squares overflow and the loss would be NaN; scale z "
                     "down (normalise it), or pass z.double()")


def _variance_overflows(x: torch.Tensor) -> torch.Tensor:
    """Whether a column's sum of squares may overflow x's dtype: N · max|x|² > its
    largest float (a device bool; no host sync)."""
    d = x.detach()
    peak = torch.maximum(d.amax(), -d.amin())
    return peak.square() * x.shape[0] > torch.finfo(x.dtype).max


def _check_finite(op: str, name: str, z: torch.Tensor, check_finite: bool) -> None:
    if check_finite and not bool(torch.isfinite(z).all()):
        raise ValueError(f"{op}: {name} must be finite (check_finite=True), got NaN or Inf "
                         "entries")


def _check_logit_range(op: str, z: torch.Tensor, temperature: float) -> None:
    """|s_ij| <= max_i ‖z_i‖² / τ must stay within INFO_NCE_MAX_LOGIT (one host sync;
    skipped under torch.compile)."""
    if torch.compiler.is_compiling():
        return
    limit = INFO_NCE_MAX_LOGIT[_ops._acc_dtype(z)]
    bound = float(_acc(z.detach()).square().sum(1).max()) / temperature
    if not bound <= limit:  # NaN z is left to check_finite
        if math.isnan(bound):
            return
        raise ValueError(f"{op}: with normalize=False, max_i ‖z_i‖² / temperature must be <= "
                         f"INFO_NCE_MAX_LOGIT = {limit:g} for {_ops._acc_dtype(z)} accumulation "
                         f"(larger logits lose their precision), got {bound:g}; scale z down, "
                         "raise the temperature, or use normalize=True")


def _check_gather(op: str, gather) -> bool:
    return _dist.resolve_gather(None if gather is None else check_bool(op, "gather", gather))

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


def _label_set_pairs(y: torch.Tensor, anchor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ordered pairs (i, k), i ≠ k, of rows sharing a known class of label set y,
    for the rows i where ``anchor`` holds: Σ_c (anchors in c)·n_c pairs."""
    known = (y >= 0).nonzero().squeeze(1)
    order = known[torch.argsort(y[known], stable=True)]  # rows grouped by class
    counts = torch.bincount(y[order])
    starts = torch.cumsum(counts, 0) - counts
    rows = order[anchor[order]]
    size = counts[y[rows]]
    r = torch.repeat_interleave(rows, size)
    local = torch.arange(r.numel(), device=y.device) - torch.repeat_interleave(
        torch.cumsum(size, 0) - size, size)
    c = order[starts[y[r]] + local]
    off = r != c
    return r[off], c[off]


def _known_pairs(graph: PairGraph, anchor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ordered pair (i, k), i ≠ k, of an anchor row i that is a positive or a known
    negative, once, sorted by (i, k)."""
    parts = []
    for g in (graph, graph.negatives):
        if g is None:
            continue
        r, c, _ = g._edge_list()
        parts.append((r[anchor[r]], c[anchor[r]]))
        parts += [_label_set_pairs(y, anchor) for y, a in zip(g.labels, g.label_weights) if a > 0]
    n = graph.num_nodes
    keys = torch.unique(torch.cat([r * n + c for r, c in parts]))
    return keys // n, keys % n


def _sparse_csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
                n: int) -> torch.Tensor:
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
            s = torch.sparse.sampled_addmm(pattern, u, u.T, beta=0.0,
                                           alpha=1.0 / temperature).values()
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


def _unknown_pairs_correction(keys, graph, rows, lse, temperature, normalize, begin, end,
                              unknown_weight):
    """lse'_i − lse_i for the anchors of rows [begin, end) (0 elsewhere), where
    lse'_i = log(λ e^{lse_i} + (1 − λ) Σ_{k∈K_i} e^{s_ik}) (info_nce, "Unknown pairs").

    lse_i is the kernel's value; its gradient is that of ℓ⁰_i + ⟨û_i, (Gû)_i⟩/(τ W_i),
    which equals lse_i for an anchor (ℓ⁰ the kernel's rows), through the kernel's
    backward and one graph SpMM."""
    x = _acc(keys)
    u = _unit_rows(x) if normalize else x
    w = graph.degree().to(x.dtype)
    anchor = w > 0
    anchor[:begin] = False
    anchor[end:] = False
    pos = (u * _ops.graph_spmm(u, *graph.kernel_args(), False)).sum(1) / (
        temperature * torch.where(anchor, w, torch.ones_like(w)))
    recon = rows + pos
    lse = lse.detach() + (recon - recon.detach())
    pr, pc = _known_pairs(graph, anchor)
    t = _KnownPairsLogSumExp.apply(u, pr, pc, temperature)
    t = torch.where(anchor, t, torch.zeros_like(t))  # finite where unused: no NaN gradients
    mixed = torch.logaddexp(lse + math.log(unknown_weight) if unknown_weight > 0 else
                            torch.full_like(lse, float("-inf")), t + math.log1p(-unknown_weight))
    return torch.where(anchor, mixed - lse, torch.zeros_like(lse))


def info_nce(z: torch.Tensor, graph: PairGraph, *, temperature: float = 0.1,
             normalize: bool = True, reduction: str = "mean", unknown_weight: float = 1.0,
             check_finite: bool = False, gather: bool | None = None) -> torch.Tensor:
    r"""Graph-weighted InfoNCE (SupCon's L_out with weights), docs/api.md.

    .. math::
        \ell_i = -\frac{1}{W_i}\sum_{j\ne i} w_{ij}\Big[s_{ij}
                 - \log\sum_{k\ne i} e^{s_{ik}}\Big],\qquad
        s_{ij} = \langle \hat z_i, \hat z_j\rangle / \tau

    for rows with W_i = Σ_j w_ij > 0. ``reduction="mean"`` averages over those rows
    (0.0 with zero gradient when there are none), ``"sum"`` adds them, ``"none"``
    returns ``[N]`` with 0 for rows without positives. With
    ``PairGraph.from_views(n, 2)`` this is SimCLR's NT-Xent; with ``from_labels``
    it is SupCon. The kernel never builds the N×N matrix: memory is O(N·D + E).

    **Unknown pairs** (``unknown_weight`` λ < 1). Every k ≠ i in the denominator is
    pushed away from i, also when nothing says that i and k differ (two pieces of
    one class the oracle has not joined yet). With λ the denominator weighs pairs by
    what is known about them:

    .. math::
        \log\sum_{k\ne i}\omega_{ik}e^{s_{ik}}
        = \log\Big(\lambda\,e^{\mathrm{lse}_i} + (1-\lambda)\sum_{k\in K_i} e^{s_{ik}}\Big),
        \qquad \omega_{ik} = 1 \text{ if } k\in K_i \text{ else } \lambda

    where K_i is the known pairs of row i: its positives (w_ik > 0) and its known
    negatives (``graph.negatives`` has w⁻_ik > 0; their weights are not used, only
    that they are known) and lse_i the dense log-sum-exp. λ = 1 (the default) is the
    loss above, bit for bit, and ignores ``graph.negatives``; λ = 0 contrasts each
    anchor with its known pairs only. lse_i comes from the same kernel (O(N·D)
    memory); the sum over K_i is a sampled product on the known pairs' sparse
    pattern and its gradient two sparse products, so memory is O(N·D + E_K) with
    E_K the known ordered pairs of the anchors (label sets expanded: a class of m
    rows counts m² pairs). That list has a data-dependent
    size, so λ < 1 does not run under ``torch.compile(fullgraph=True)`` (it raises,
    saying so).

    Args:
        z: ``[N, D]`` float32/float64/float16/bfloat16 embeddings.
        graph: :class:`PairGraph` over the N rows, on z's device.
        temperature: τ > 0.
        normalize: cosine similarity (True) or raw dot products (False). With False,
            ``max_i ‖z_i‖² / τ`` must be <= ``INFO_NCE_MAX_LOGIT`` (2**24 in float32;
            checked with one host sync, else ``ValueError``).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.
        unknown_weight: λ in [0, 1], the weight of pairs neither positive nor known
            negative in the denominator (1: every pair, as SimCLR / SupCon).
        check_finite: raise ``ValueError`` on NaN/Inf in z (else they give NaN).
        gather: under torch.distributed (default: on when world size > 1) z holds
            this rank's rows and ``graph`` is over the global batch; see
            :mod:`palfast.distributed`. The value is the global loss on every rank;
            ``reduction="none"`` returns this rank's rows only.

    Returns:
        A scalar (or ``[N]`` for ``"none"``) in z's dtype, computed in float32
        (float64 for float64 z).

    Example::

        >>> import torch, palfast
        >>> z = torch.randn(8, 16, requires_grad=True)
        >>> loss = palfast.info_nce(z, palfast.PairGraph.from_views(4, 2), temperature=0.5)
        >>> loss.backward()
    """
    op = "palfast.info_nce"
    gather = _check_gather(op, gather)
    unchanged = _check_z(op, z, graph, check_finite, n_global=gather)
    temperature = check_number(op, "temperature", temperature, 0.0, strict=True)
    normalize = check_bool(op, "normalize", normalize)
    check_choice(op, "reduction", reduction, _REDUCTIONS)
    unknown_weight = check_number(op, "unknown_weight", unknown_weight, 0.0, maximum=1.0)
    if not normalize:
        _check_logit_range(op, z, temperature)
    keys, begin, end = (_dist.all_gather_rows(z, graph.num_nodes) if gather
                        else (z, 0, z.shape[0]))
    rows, lse = _ops.info_nce(keys, *graph.kernel_args(), temperature, normalize, begin, end)
    if unknown_weight < 1:
        if torch.compiler.is_compiling():
            raise ValueError(f"{op}: unknown_weight < 1 cannot run under torch.compile (its "
                             "known-pair list has a data-dependent size); call info_nce outside "
                             "the compiled region, or use unknown_weight=1.0")
        if _ops._transform_depth():
            raise ValueError(f"{op}: unknown_weight < 1 cannot run under torch.func transforms "
                             "(grad, vjp, vmap): its backward builds sparse CSR tensors, which "
                             "torch.func cannot wrap; use torch.autograd.grad, or "
                             "unknown_weight=1.0")
        rows = rows + _unknown_pairs_correction(keys, graph, rows, lse, temperature, normalize,
                                                begin, end, unknown_weight)
    if reduction == "none":
        return _with_check(rows[begin:end], unchanged, z.dtype)
    out = rows.sum()
    if reduction == "mean":
        out = out / max(graph.num_anchors, 1)
    if gather:
        out = _dist.global_value(out)
    return _with_check(out, unchanged, z.dtype)


# ------------------------------------------------------------ covariance losses
# VICReg, Barlow Twins, spectral contrastive and PAL's VIC² (docs/api.md–3.4).
# The custom ops do the parts that cost: the graph products (graph_spmm,
# graph_dirichlet: CSR + class sums, never a dense G) and the squared Frobenius
# norms of D×D cross-correlations (sq_xcorr, barlow_twins_xcorr: through N×N Gram
# matrices when N < D). The O(N·D) rest (centring, standardising, the variance
# hinge, diagonals) is plain PyTorch in float32 (float64 for float64 z).

def _global_rows(op: str, z, graph, check_finite: bool,
                 gather) -> tuple[torch.Tensor, torch.Tensor]:
    """Check z and, under torch.distributed (``gather``), return all ranks' rows (and
    the zero of the graph check, for :func:`_with_check`).

    The covariance losses then compute the global loss on the gathered rows on
    every rank: the gather's backward sums each rank's gradient into the owner,
    i.e. world × the single-process gradient, which DDP's averaging turns back
    into the exact single-process gradient. Statistics are O(D²) (or the Gram
    side O(N²) when N < D), never more than the single-process loss uses."""
    gather = _check_gather(op, gather)
    unchanged = _check_z(op, z, graph, check_finite, n_global=gather)
    if gather:
        z, _, _ = _dist.all_gather_rows(z, graph.num_nodes)
    return z, unchanged


def _vicreg_coeffs(op: str, sim_coeff, std_coeff, cov_coeff, eps) -> tuple[float, ...]:
    """VICReg's three weights (finite, >= 0) and eps (finite, > 0)."""
    return (check_number(op, "sim_coeff", sim_coeff, 0.0),
            check_number(op, "std_coeff", std_coeff, 0.0),
            check_number(op, "cov_coeff", cov_coeff, 0.0),
            check_number(op, "eps", eps, 0.0, strict=True))


def _barlow_twins_coeffs(op: str, lambd, eps) -> tuple[float, float]:
    """Barlow Twins' lambd (finite, >= 0) and eps (finite, > 0)."""
    return check_number(op, "lambd", lambd, 0.0), check_number(op, "eps", eps, 0.0, strict=True)


def _acc(z: torch.Tensor) -> torch.Tensor:
    """z in the accumulation dtype: float32 for 16-bit z, else unchanged."""
    return z if z.dtype in (torch.float32, torch.float64) else z.float()


def _check_rows(op: str, name: str, z: torch.Tensor, minimum: int, why: str) -> None:
    if z.shape[0] < minimum:
        raise ValueError(f"{op}: {name} must have at least {minimum} rows ({why}), "
                         f"got shape {tuple(z.shape)}")


def _variance_covariance(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """VICReg's variance and covariance terms of one batch x [N >= 2, D]:
    (1/D) Σ_k relu(1 − sqrt(Var_k + eps)) and (1/D) Σ_{k≠l} C_kl², C the unbiased covariance."""
    n, d = x.shape
    a = (x - x.mean(0)).mul_(1 / math.sqrt(n - 1))  # C = aᵀa
    var = a.square().sum(0)
    var_term = torch.relu(1 - torch.sqrt(var + eps)).mean()
    cov_term = _ops.sq_xcorr(a, None, True)[0] / d
    return var_term, cov_term


def _standardize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Columns to mean 0, biased variance 1: BatchNorm1d(affine=False) in training mode
    (the same fused ATen op, which saves only the column statistics for backward)."""
    if x.shape[0] == 1:  # batch_norm refuses one row; its columns are all 0 after centring
        return (x - x.mean(0)) * eps**-0.5
    return torch.nn.functional.batch_norm(x, None, None, training=True, momentum=0.0, eps=eps)


def _dirichlet_mean(x: torch.Tensor, graph: PairGraph) -> torch.Tensor:
    """Σ_ij w_ij ‖x_i − x_j‖² / |G|, or 0 (with zero gradient) for an empty graph."""
    if graph.total_weight <= 0:
        return x.new_zeros(())
    return _ops.graph_dirichlet(x, *graph.kernel_args()) / graph.total_weight


def vicreg(z: torch.Tensor, graph: PairGraph, *, sim_coeff: float = 25.0,
           std_coeff: float = 25.0, cov_coeff: float = 1.0, eps: float = 1e-4,
           check_finite: bool = False, gather: bool | None = None) -> torch.Tensor:
    r"""Graph-weighted VICReg (Bardes et al. 2022 in PAL's graph form), docs/api.md.

    .. math::
        \mathrm{inv} = \frac{1}{D\,|G|}\sum_{ij} w_{ij}\|z_i - z_j\|^2,\quad
        \mathrm{var} = \frac1D\sum_k \mathrm{relu}\big(1 - \sqrt{\mathrm{Var}_k(z) + \epsilon}\big),\quad
        \mathrm{cov} = \frac1D\sum_{k\ne l} C_{kl}^2

    with the unbiased variance and covariance ``C = (z − z̄)ᵀ(z − z̄)/(N − 1)`` over
    all N rows; loss = sim_coeff·inv + std_coeff·var + cov_coeff·cov.
    ``Σ C_kl²`` goes through the N×N Gram matrix when N < D (``‖AᵀA‖_F = ‖AAᵀ‖_F``),
    so time is O(N·D·min(N, D)) and memory O(N·D + min(N, D)²), never D×D for
    a small batch.

    Relation to the official two-view VICReg: with ``PairGraph.from_views(n, 2)``
    and ``z = cat(z_a, z_b)`` the invariance term equals ``mse(z_a, z_b)``, but
    variance and covariance are taken over the 2n pooled rows, where the official
    loss takes them per view and adds the two covariance terms.
    ``palfast.nn.VICRegLoss()(z_a, z_b)`` computes the official loss exactly.

    Edge cases: an empty graph (|G| = 0) gives inv = 0; N = 1 raises ``ValueError``
    (the unbiased variance needs two rows).

    Known negatives (``graph.negatives``) are ignored, by design: subtracted in the
    invariance term, ``−Σ w⁻_ij‖z_i − z_j‖²`` is unbounded below (the variance hinge
    floors each column's spread, never caps it, and the covariance term leaves the
    diagonal free), and VICReg's repulsion already comes from its variance and
    covariance terms over all rows. A graph from ``RelationStore.graph(...,
    negatives=True)`` therefore gives the same value as one without negatives.

    Args:
        z: ``[N, D]`` float32/float64/float16/bfloat16 embeddings, N >= 2.
        graph: :class:`PairGraph` over the N rows, on z's device.
        sim_coeff, std_coeff, cov_coeff: weights >= 0 of the three terms.
        eps: > 0, added to the variance under the square root.
        check_finite, gather: as for every covariance loss (see "Covariance losses"
            in the module docstring), which also says what is returned.

    Example::

        >>> import torch, palfast
        >>> z = torch.randn(8, 32, requires_grad=True)
        >>> loss = palfast.vicreg(z, palfast.PairGraph.from_views(4, 2))
        >>> loss.backward()
    """
    op = "palfast.vicreg"
    z, unchanged = _global_rows(op, z, graph, check_finite, gather)
    sim_coeff, std_coeff, cov_coeff, eps = _vicreg_coeffs(op, sim_coeff, std_coeff, cov_coeff, eps)
    _check_rows(op, "z", z, 2, "the unbiased variance over N − 1 needs two")
    x = _acc(z)
    inv = _dirichlet_mean(x, graph) / z.shape[1]
    var, cov = _variance_covariance(x, eps)
    loss = _with_check(sim_coeff * inv + std_coeff * var + cov_coeff * cov, unchanged, z.dtype)
    return _no_overflow_nan(op, z, loss)


def barlow_twins(z: torch.Tensor, graph: PairGraph, *, lambd: float = 5e-3, eps: float = 1e-5,
                 check_finite: bool = False, gather: bool | None = None) -> torch.Tensor:
    r"""Graph-weighted Barlow Twins (Zbontar et al. 2021 in PAL's graph form), docs/api.md.

    .. math::
        C = \frac{\hat z^\top G \hat z}{|G|},\qquad
        \mathcal L = \sum_k (1 - C_{kk})^2 + \lambda \sum_{k\ne l} C_{kl}^2

    where ẑ standardises each column of z over the N rows (mean 0, biased variance
    1, ``eps`` added to the variance: ``BatchNorm1d(affine=False)``). G enters
    through sparse products only. When N < D the off-diagonal sum is
    ``Σ (K ⊙ G K Gᵀ)/|G|²`` with the N×N Gram matrix ``K = ẑẑᵀ`` and G K Gᵀ from
    SpMMs (one N²·D GEMM forward, one backward); else C itself is formed.

    Relation to the official two-view Barlow Twins (``c = bn(z_a)ᵀ bn(z_b)/n``):
    with ``from_views(n, 2)`` on ``cat(z_a, z_b)`` the graph form standardises
    over the pooled 2n rows and its C is the symmetrised cross-correlation,
    so the two differ; ``palfast.nn.BarlowTwinsLoss()(z_a, z_b)`` computes the
    official loss exactly. The official code's default λ is 0.0051.

    Edge cases: an empty graph (|G| = 0) has C = 0, so the loss is D with zero
    gradient. N = 1 is allowed (ẑ = 0).

    Known negatives (``graph.negatives``) are ignored, by design: with a signed
    ``G⁺ − βG⁻`` the target C_kk = 1 would ask every two known-different classes
    to be perfectly anti-correlated in every feature, which no more than two
    classes can be, and the redundancy term already decorrelates features over
    all rows. A graph with negatives gives the value of its positives alone.

    Args:
        z: ``[N, D]`` float32/float64/float16/bfloat16 embeddings.
        graph: :class:`PairGraph` over the N rows, on z's device.
        lambd: λ >= 0, weight of the off-diagonal (redundancy) term.
        eps: > 0, BatchNorm's epsilon.
        check_finite, gather: as for every covariance loss (see "Covariance losses"
            in the module docstring), which also says what is returned.

    Example::

        >>> import torch, palfast
        >>> labels = torch.tensor([0, 0, 1, 1, -1, 2, 2, 2])   # -1: unknown
        >>> z = torch.randn(8, 32, requires_grad=True)
        >>> palfast.barlow_twins(z, palfast.PairGraph.from_labels(labels)).backward()
    """
    op = "palfast.barlow_twins"
    z, unchanged = _global_rows(op, z, graph, check_finite, gather)
    lambd, eps = _barlow_twins_coeffs(op, lambd, eps)
    zhat = _standardize(_acc(z), eps)
    if graph.total_weight <= 0:
        return _with_check(zhat.sum() * 0 + z.shape[1], unchanged, z.dtype)
    loss, _ = _ops.barlow_twins_xcorr(zhat, graph.kernel_args(), lambd, 1.0 / graph.total_weight)
    # An overflowing column variance standardises the column to 0: a plausible, wrong
    # finite loss. NaN instead, which _no_overflow_nan turns into a ValueError.
    loss = torch.where(_variance_overflows(_acc(z)), torch.full_like(loss, float("nan")), loss)
    return _no_overflow_nan(op, z, _with_check(loss, unchanged, z.dtype))


def spectral_contrastive(z: torch.Tensor, graph: PairGraph, *, negative_weight: float = 1.0,
                         check_finite: bool = False, gather: bool | None = None) -> torch.Tensor:
    r"""Graph-weighted spectral contrastive loss (HaoChen et al. 2021), docs/api.md.

    .. math::
        \mathcal L = -\frac{2}{|G|}\sum_{ij} w_{ij}\langle z_i, z_j\rangle
                     + \frac{1}{N(N-1)}\sum_{i\ne j}\langle z_i, z_j\rangle^2

    The first term is ``<z, G z>`` (one SpMM); the second is
    ``‖zᵀz‖_F² − Σ_i ‖z_i‖⁴`` computed on the D×D side when D < N and on the N×N
    side otherwise. An empty graph drops the first term; N = 1 drops the second.

    **Known negatives.** When ``graph.negatives`` is set the graph is signed,
    ``w_ij = w⁺_ij − β w⁻_ij`` with β = ``negative_weight``, and
    ``|G| = |G⁺| + β|G⁻|`` (the total absolute weight): known-different pairs enter
    the attraction term with a negative sign and are pushed towards negative inner
    products. The loss stays bounded below (the second term is quadratic in every
    inner product). Without negatives, or with β = 0, it is the loss above exactly.

    Relation to the two-view form: ``palfast.nn.SpectralContrastiveLoss()(z_a, z_b)``
    is HaoChen's ``−2 E_i⟨a_i, b_i⟩ + E_{i≠j}⟨a_i, b_j⟩²`` (negatives across views
    only). The graph form with ``from_views(n, 2)`` on ``cat(z_a, z_b)`` has the same
    first term but averages the second over all pairs of the 2n rows.

    Args:
        z: ``[N, D]`` float32/float64/float16/bfloat16 embeddings.
        graph: :class:`PairGraph` over the N rows, on z's device.
        negative_weight: β >= 0, the weight of ``graph.negatives`` in the signed graph.
        check_finite, gather: as for every covariance loss (see "Covariance losses"
            in the module docstring), which also says what is returned.

    Example::

        >>> import torch, palfast
        >>> z = torch.randn(8, 32, requires_grad=True)
        >>> loss = palfast.spectral_contrastive(z, palfast.PairGraph.from_views(4, 2))
        >>> loss.backward()
    """
    op = "palfast.spectral_contrastive"
    z, unchanged = _global_rows(op, z, graph, check_finite, gather)
    negative_weight = check_number(op, "negative_weight", negative_weight, 0.0)
    x = _acc(z)
    n = x.shape[0]
    loss = x.sum() * 0  # stays connected to z when both terms drop out
    signed = [(1.0, graph)]
    if graph.negatives is not None and negative_weight > 0:
        signed.append((-negative_weight, graph.negatives))
    total = sum(abs(a) * g.total_weight for a, g in signed)
    for a, g in signed:
        if g.total_weight > 0:
            gx = _ops.graph_spmm(x, *g.kernel_args(), False)
            loss = loss - 2.0 * a / total * (x * gx).sum()
    if n > 1:
        loss = loss + _ops.sq_xcorr(x.T, None, True)[0] / (n * (n - 1))
    return _no_overflow_nan(op, z, _with_check(loss, unchanged, z.dtype))


def _orthogonality_halves(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """tr((AᵀA/n_a − I)(BᵀB/n_b − I)), unbiased for ‖E[zzᵀ] − I‖_F² when A ⟂ B."""
    na, nb, d = a.shape[0], b.shape[0], a.shape[1]
    cross = _ops.sq_xcorr(a.T, b.T, False)[0]  # ‖A Bᵀ‖² = <AᵀA, BᵀB>
    return cross / (na * nb) - a.square().sum() / na - b.square().sum() / nb + d


def vic2(z: torch.Tensor, graph: PairGraph, *, beta: float = 1.0, n_views: int = 1,
         pool_size: int | None = None, check_finite: bool = False,
         gather: bool | None = None) -> torch.Tensor:
    r"""PAL's VIC² loss (Cabannes et al. 2023) with an unbiased orthogonality term.

    .. math::
        \mathcal L = \beta\,\frac{1}{|G|}\sum_{ij} w_{ij}\|z_i - z_j\|^2
                     + \big\|\mathbb E[z z^\top] - I\big\|_F^2

    The second term is a square of an expectation, so its plug-in mini-batch value
    ``‖zᵀz/N − I‖²`` is biased (by the variance of zzᵀ) and so are its gradients.
    Here it is estimated without bias from two independent halves A, B of the batch:

    .. math::
        \mathrm{tr}\big((A^\top A/n_a - I)(B^\top B/n_b - I)\big)
        = \frac{\|A B^\top\|_F^2}{n_a n_b} - \frac{\|A\|_F^2}{n_a}
          - \frac{\|B\|_F^2}{n_b} + D,

    whose expectation is ``‖E[zzᵀ] − I‖²`` as the two factors are independent
    (the authors' reference code estimates it the same way, written as
    ``E[(xᵀx')²] − 2 E‖x‖² + D`` over two halves). It can be negative.
    ``‖ABᵀ‖²`` is computed on the n_a×n_b or the D×D side, whichever is cheaper.
    The invariance term is the mean over the graph's positive pairs (weights
    normalised by |G|; 0 for an empty graph), without the 1/D of :func:`vicreg`.
    β weights the invariance term; weighting the orthogonality term instead
    only rescales the loss.

    **On a fixed pool, pass** ``pool_size``. The halves estimator is unbiased for
    samples drawn from an infinite population, and no unbiased estimator of this
    square can be bounded below there (the U-statistic is the only symmetric one,
    and one sample grown along a direction the others do not use drives it to −∞;
    any unbiased estimator averages over orderings to it). On a pool of P images
    that batches are drawn from, the halves never see the pool's own ``‖x_i‖⁴``
    terms, so training can exploit it: one exploding sample drove it to −2946 in an
    active-learning run whose batch was the whole pool. With ``pool_size = P``, per
    image i of the batch ``X_i = (1/V) Σ_v z_iv z_ivᵀ`` (its views' mean) and
    ``S = Σ_i X_i`` over the n images of the batch, the term is

    .. math::
        \frac{P-1}{P\,n(n-1)}\Big(\|S\|_F^2 - \sum_i\|X_i\|_F^2\Big)
        + \frac{1}{P\,n}\sum_i\|X_i\|_F^2 - \frac{2}{n}\,\mathrm{tr}\,S + D,

    unbiased, over batches of n images drawn uniformly without replacement, for the
    pool's ``‖(1/P) Σ_pool X_i − I‖²`` (≥ 0, so training cannot win in expectation
    by exploding a sample), bounded below by ``−D·(P − 1)`` for every batch
    (⟨X_i, X_j⟩ ≥ 0 and ``‖X_i‖² ≥ (tr X_i)²/D``), and equal to the plug-in
    ``‖S/n − I‖² ≥ 0`` when the batch is the whole pool (n = P).

    The halves must be independent: views of one image must not be split. ``z`` is
    read as ``n_views`` stacked blocks of n = N / n_views rows (docs/api.md: row
    ``i + v·n`` is view v of image i); A holds images ``0 .. ⌊n/2⌋ − 1`` (all their
    views), B the others. With the default ``n_views=1`` (rows are independent
    samples, e.g. a labels or oracle graph) A and B are the first and second half
    of the rows. Pass ``n_views=2`` for ``z = cat(z_a, z_b)``.

    Args:
        z: ``[N, D]`` float32/float64/float16/bfloat16 embeddings.
        graph: :class:`PairGraph` over the N rows, on z's device.
        beta: weight >= 0 of the invariance term.
        n_views: number of stacked view blocks in z (N must be a multiple, and each
            block must hold at least 2 images).
        pool_size: None (default) = the halves estimator (samples from an infinite
            population); an int P = the batch's images are drawn from a fixed pool of
            P ≥ n images (the pool estimator above, bounded below). Under
            torch.distributed, n counts the global batch.
        check_finite: raise ``ValueError`` on NaN/Inf in z (else they give NaN).
        gather: under torch.distributed (default: on when world size > 1) z holds
            this rank's rows and ``graph`` is over the global batch; the global
            loss is returned on every rank (see :func:`_global_rows`).

    Returns:
        A scalar in z's dtype, computed in float32 (float64 for float64 z).

    Example::

        >>> import torch, palfast
        >>> z = torch.randn(8, 16, requires_grad=True)
        >>> loss = palfast.vic2(z, palfast.PairGraph.from_views(4, 2), n_views=2)
        >>> loss.backward()
    """
    op = "palfast.vic2"
    z, unchanged = _global_rows(op, z, graph, check_finite, gather)
    beta = check_number(op, "beta", beta, 0.0)
    n_views = check_int(op, "n_views", n_views, 1)
    if z.shape[0] % n_views:
        raise ValueError(f"{op}: z must have a multiple of n_views = {n_views} rows "
                         f"(stacked view blocks), got shape {tuple(z.shape)}")
    x = _acc(z)
    n, d = x.shape[0] // n_views, x.shape[1]
    if n < 2:
        raise ValueError(f"{op}: z must hold at least 2 images per view block (two independent "
                         f"halves), got shape {tuple(z.shape)} with n_views={n_views}")
    blocks = x.reshape(n_views, n, d)
    if pool_size is not None:
        pool_size = check_int(op, "pool_size", pool_size, n)
        ortho = _orthogonality_pool(blocks, pool_size)
    else:
        ortho = _orthogonality_halves(blocks[:, : n // 2].reshape(-1, d),
                                      blocks[:, n // 2:].reshape(-1, d))
    return _no_overflow_nan(op, z, _with_check(beta * _dirichlet_mean(x, graph) + ortho,
                                               unchanged, z.dtype))


def _orthogonality_pool(blocks: torch.Tensor, pool: int) -> torch.Tensor:
    """vic2's pool estimator of ‖(1/P) Σ_pool X_i − I‖² (see vic2) from ``blocks
    [V, n, D]`` (view v of image i) and the pool size P ≥ n."""
    v, n, d = blocks.shape
    x = blocks.reshape(-1, d)
    s_sq = _ops.sq_xcorr(x, None, False)[0] / v**2                   # ‖S‖², S = ZᵀZ / V
    grams = torch.einsum("vnd,wnd->nvw", blocks, blocks)             # z_ivᵀ z_iw
    own_sq = grams.square().sum() / v**2                              # Σ_i ‖X_i‖²
    trace = x.square().sum() / v                                      # tr S
    return ((pool - 1) / (pool * n * (n - 1)) * (s_sq - own_sq) + own_sq / (pool * n)
            - 2 * trace / n + d)


# Two-view drop-ins (palfast.nn modules called as loss(z_a, z_b)): the official
# losses, with per-view statistics, on the same fast ops.

def _vicreg_two_view(z_a, z_b, *, sim_coeff, std_coeff, cov_coeff, eps):
    """Official VICReg: 25·mse + 25·(v_a + v_b)/2 + c_a + c_b (per-view statistics)."""
    xa, xb = _acc(z_a), _acc(z_b)
    var_a, cov_a = _variance_covariance(xa, eps)
    var_b, cov_b = _variance_covariance(xb, eps)
    loss = (sim_coeff * torch.nn.functional.mse_loss(xa, xb)
            + std_coeff * (var_a + var_b) / 2 + cov_coeff * (cov_a + cov_b))
    return loss.to(z_a.dtype)


def _barlow_twins_two_view(z_a, z_b, *, lambd, eps):
    """Official Barlow Twins: c = bn(z_a)ᵀbn(z_b)/n, Σ (1 − c_kk)² + λ Σ_{k≠l} c_kl²."""
    pa, pb = _standardize(_acc(z_a), eps), _standardize(_acc(z_b), eps)
    n = pa.shape[0]
    on = (1 - (pa * pb).sum(0) / n).square().sum()
    off = _ops.sq_xcorr(pa, pb, True)[0] / (n * n)
    return (on + lambd * off).to(z_a.dtype)


def _spectral_contrastive_two_view(z_a, z_b):
    """HaoChen et al.: −2 E_i⟨a_i, b_i⟩ + E_{i≠j}⟨a_i, b_j⟩²."""
    xa, xb = _acc(z_a), _acc(z_b)
    n = xa.shape[0]
    loss = -2 * (xa * xb).sum() / n
    if n > 1:
        loss = loss + _ops.sq_xcorr(xa.T, xb.T, True)[0] / (n * (n - 1))
    return loss.to(z_a.dtype)
