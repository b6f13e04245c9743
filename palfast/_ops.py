"""The only module that touches ``torch.ops.palfast``.

Importing it loads the compiled extension (which registers the op schemas and
the CPU/CUDA kernels) and registers, for each op, a fake kernel (shapes only,
for torch.compile and meta tensors) and its autograd formula.
"""

from __future__ import annotations

import torch

_REBUILD = "    pip install --no-build-isolation --force-reinstall --no-deps .\n"
# Where PyTorch publishes each flavour of torch (cpu, cu130, ...).
_TORCH_INDEX = "https://download.pytorch.org/whl/"


def _torch_minor(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _torch_flavour(cuda: str | None, hip: str | None = None) -> str:
    """``cpu``, ``cu130`` or ``rocm6.2``, as in PyTorch's index names (and tools/palfast_meta.py)."""
    if cuda:
        return "cu" + "".join(cuda.split(".")[:2])
    if hip:
        return "rocm" + ".".join(hip.split(".")[:2])
    return "cpu"


def _check_torch(
    built_version: str, built_cuda: str | None, torch_version: str, torch_cuda: str | None, torch_hip: str | None = None
) -> None:
    """Raise ImportError unless the installed torch has the minor version and flavour palfast was built for.

    The C++ ABI of libtorch changes between minor versions, a CUDA build links
    libraries a CPU torch lacks, and a CPU build has no kernels for a CUDA torch's
    tensors: both must match. ``built_cuda=None`` means unknown (an old build): check the minor only.
    """
    minor_ok = _torch_minor(built_version) == _torch_minor(torch_version)
    built = None if built_cuda is None else _torch_flavour(built_cuda)
    installed = _torch_flavour(torch_cuda, torch_hip)
    if minor_ok and built in (None, installed):
        return
    public = built_version.split("+")[0]
    fix = f"    pip install torch=={public}"
    if built is not None:
        fix += f" --index-url {_TORCH_INDEX}{built}"
    raise ImportError(
        f"palfast was built against torch {built_version} ({built or 'flavour unknown'}) but torch "
        f"{torch_version} ({installed}) is installed; the C++ ABI differs between torch minor versions "
        "and between CPU and CUDA builds. Install the torch palfast was built for:\n"
        f"{fix}\n"
        "or the palfast wheel built for your torch (docs/install.md), or rebuild palfast against "
        "the installed torch from a palfast checkout:\n" + _REBUILD
    )


try:
    from . import _build_info  # written by CMakeLists.txt next to _C
except ImportError:  # a checkout without an in-place build: _C below reports it
    _build_info = None
if _build_info is not None:  # before loading _C, whose loader errors would hide the cause
    _check_torch(
        _build_info.torch_version,
        _build_info.torch_cuda,
        torch.__version__,
        torch.version.cuda,
        getattr(torch.version, "hip", None),
    )

try:
    from . import _C
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "palfast's compiled extension (palfast._C) could not be loaded: "
        f"{e}. Rebuild it against the installed torch with\n"
        + _REBUILD
        + "from a palfast checkout (see README.md, 'Build'). If palfast is installed and you are "
        "running Python from inside a checkout, its palfast/ folder (which has no compiled "
        "_C) shadows the installed package: run from another directory, or build in place."
    ) from e

if _build_info is None:  # a build older than _build_info.py: _C knows only the torch version
    _check_torch(_C.torch_version, None, torch.__version__, torch.version.cuda)

ops = torch.ops.palfast

#: How the extension was built: torch version, whether CUDA kernels exist, archs.
BUILD_INFO = {
    "torch_version": _C.torch_version,
    "torch_cuda": _build_info.torch_cuda if _build_info else None,
    "with_cuda": bool(_C.with_cuda),
    "cuda_archs": [a for a in _C.cuda_archs.replace(",", ";").split(";") if a],
}


def _no_double_backward(op: str, *tensors) -> None:
    """First derivatives only. The backward ops have no derivative of their own, so a
    second one (``create_graph=True``: Hessian-vector products, gradient penalties)
    would silently drop their part: refuse it. Autograd runs a backward with grad
    mode on exactly when ``create_graph=True``. ``torch.func.grad`` and ``vjp`` always
    run it so (to allow nested transforms); under one such transform nothing
    differentiates it again, so it is refused only under several, or when the plain
    tensors beneath the transform's wrappers also require grad."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return
    # torch.func's wrappers require grad for their own level: look beneath them.
    if _transform_depth() > 1 or any(_unwrapped(t).requires_grad for t in tensors if t is not None):
        raise RuntimeError(
            f"palfast.{op} does not support double backward (create_graph=True, "
            "torch.autograd.grad of a gradient, Hessian-vector products, nested torch.func "
            "transforms): its backward is a custom op without a derivative, so the result "
            "would be wrong. Use palfast.reference (pure PyTorch, small N) for higher "
            "derivatives (docs/api.md, 'Gradients')"
        )


def _transform_depth() -> int:
    """How many torch.func transforms (grad, vjp, vmap, jvp) enclose this call."""
    return len(torch._C._functorch.get_interpreter_stack() or ())


def _unwrapped(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor beneath torch.func's wrappers of ``t``."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


# ------------------------------------------------------------ graph integrity
@torch.library.custom_op("palfast::graph_unchanged", mutates_args=())
def graph_unchanged(tensors: list[torch.Tensor], copies: list[torch.Tensor], names: str, op: str) -> torch.Tensor:
    """Raise ``ValueError`` unless each of ``tensors`` equals its copy (shape, dtype,
    device, values); else return a float32 0-dim zero on the first tensor's device.
    ``names``: the tensors' names, separated by spaces (a schema has no list of strings).

    ``PairGraph.check_unchanged`` calls it with a graph's tensors and the copies taken
    when the graph was built. It is an op, not Python around the ops, so that
    ``torch.compile`` keeps it in the compiled graph and runs it on every call (the
    losses add its zero to their result, so it is never dropped as unused)."""
    names = names.split()
    changed = [
        name
        for t, c, name in zip(tensors, copies, names)
        if t.shape != c.shape or t.dtype != c.dtype or t.device != c.device
    ]
    if not changed:  # the values, compared on the device: one host sync for all tensors
        equal = torch.stack([(t == c).all() for t, c in zip(tensors, copies)]).tolist()
        changed = [name for name, same in zip(names, equal) if not same]
    if changed:
        graph = changed[0].rsplit(".", 1)[0]  # "graph", or "graph.negatives"
        raise ValueError(
            f"{op}: {graph} must not be changed after it is built, got changes to "
            f"{', '.join(changed)}; build a new PairGraph (a PairGraph is immutable: its "
            "derived fields, such as degrees and totals, would no longer match; docs/api.md, "
            "'What is checked')"
        )
    return torch.zeros((), device=tensors[0].device)


@graph_unchanged.register_fake
def _graph_unchanged_fake(tensors, copies, names, op):
    return torch.zeros((), device=tensors[0].device)


def _acc_dtype(z: torch.Tensor) -> torch.dtype:
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _differentiable(name: str, op, setup_context, backward):
    """``op``, differentiable also under ``torch.func.grad`` and ``vjp``.

    ``register_autograd`` (above each op) generates an ``autograd.Function`` whose
    ``forward`` takes ``ctx``, which torch.func refuses. Under a torch.func transform
    the call goes instead through an ``autograd.Function`` with the same formula and
    a separate ``setup_context``, the form torch.func accepts. Everywhere else (eager,
    ``torch.compile``, whose dynamo cannot trace that Function when a symmetric graph
    passes one tensor as both CSR sides) it calls ``op`` directly."""

    def forward(*args):
        return op(*args)

    fn = type(
        name,
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
        },
    )

    def call(*args):
        if not torch.compiler.is_compiling() and _transform_depth():
            return fn.apply(*args)
        return op(*args)

    return call


# --------------------------------------------------------------------- info_nce
@torch.library.register_fake("palfast::info_nce")
def _info_nce_fake(
    z,
    indptr,
    indices,
    weights,
    t_indptr,
    t_indices,
    t_weights,
    labels,
    label_weights,
    label_classes,
    pos_weight,
    temperature,
    normalize,
    anchor_begin,
    anchor_end,
):
    n = z.shape[0]
    return z.new_empty(n, dtype=_acc_dtype(z)), z.new_empty(n, dtype=_acc_dtype(z))


@torch.library.register_fake("palfast::info_nce_backward")
def _info_nce_backward_fake(grad_rows, z, *args):
    return torch.empty_like(z)


def _info_nce_setup(ctx, inputs, output):
    z, *graph, temperature, normalize, anchor_begin, anchor_end = inputs
    ctx.graph = graph
    ctx.scalars = (temperature, normalize, anchor_begin, anchor_end)
    ctx.save_for_backward(z, output[1])


def _info_nce_backward(ctx, grad_rows, grad_lse):
    z, lse = ctx.saved_tensors
    _no_double_backward("info_nce", z, grad_rows)
    # lse is an auxiliary output saved for backward; its gradient is not supported.
    grad_z = ops.info_nce_backward(grad_rows.contiguous(), z, *ctx.graph, lse, *ctx.scalars)
    return (grad_z,) + (None,) * (len(ctx.graph) + len(ctx.scalars))


torch.library.register_autograd("palfast::info_nce", _info_nce_backward, setup_context=_info_nce_setup)
info_nce = _differentiable("InfoNCE", ops.info_nce, _info_nce_setup, _info_nce_backward)


# ------------------------------------------------------------ covariance losses
# graph_spmm, graph_dirichlet, sq_xcorr, barlow_twins_xcorr (contracts: csrc/<op>.h).
_GRAPH_ARG_COUNT = 10  # tensors and lists a PairGraph expands to (kernel_args)


@torch.library.register_fake("palfast::graph_spmm")
def _graph_spmm_fake(x, *graph_and_transpose):
    return x.new_empty(x.shape)  # the kernels return contiguous tensors


def _graph_spmm_setup(ctx, inputs, output):
    _, *graph, transpose = inputs
    ctx.graph, ctx.transpose = graph, transpose


def _graph_spmm_backward(ctx, grad):
    # (G x)' = Gᵀ: the same op with the other side of the graph (through graph_spmm
    # below, so that torch.func.grad, which records this backward, can take it).
    grad_x = graph_spmm(grad.contiguous(), *ctx.graph, not ctx.transpose)
    return (grad_x,) + (None,) * (len(ctx.graph) + 1)


torch.library.register_autograd("palfast::graph_spmm", _graph_spmm_backward, setup_context=_graph_spmm_setup)
graph_spmm = _differentiable("GraphSpMM", ops.graph_spmm, _graph_spmm_setup, _graph_spmm_backward)


@torch.library.register_fake("palfast::graph_dirichlet")
def _graph_dirichlet_fake(z, *graph):
    return z.new_empty((), dtype=_acc_dtype(z))


@torch.library.register_fake("palfast::graph_dirichlet_backward")
def _graph_dirichlet_backward_fake(grad, z, *graph):
    return z.new_empty(z.shape)


def _graph_dirichlet_setup(ctx, inputs, output):
    z, *graph = inputs
    ctx.graph = graph
    ctx.save_for_backward(z)


def _graph_dirichlet_backward(ctx, grad):
    (z,) = ctx.saved_tensors
    _no_double_backward("graph_dirichlet (in vicreg and vic2)", z, grad)
    grad_z = ops.graph_dirichlet_backward(grad, z, *ctx.graph)
    return (grad_z,) + (None,) * len(ctx.graph)


torch.library.register_autograd(
    "palfast::graph_dirichlet", _graph_dirichlet_backward, setup_context=_graph_dirichlet_setup
)
graph_dirichlet = _differentiable(
    "GraphDirichlet", ops.graph_dirichlet, _graph_dirichlet_setup, _graph_dirichlet_backward
)


# The Gram-side rules: the only copies. The ops take the side as an argument
# (csrc/sq_xcorr.h, csrc/barlow_twins_xcorr.h), so the C++ never decides it and
# the fake kernels below derive aux's shape from the same argument.
def sq_xcorr_uses_gram(m: int, a: int, b: int, self_product: bool) -> bool:
    """Whether ``sq_xcorr`` of p [m, a], q [m, b] is cheaper on the m×m Gram side.

    FLOPs of forward + backward: Gram 2·m²·(a + b) (self: 2·m²·a), product 3·m·a·b
    (self: 2·m·a²)."""
    return m < a if self_product else 2 * m * (a + b) < 3 * a * b


def barlow_twins_xcorr_uses_gram(n: int, d: int) -> bool:
    """Whether ``barlow_twins_xcorr`` of zhat [n, d] works on n×n Gram matrices (n < d)."""
    return n < d


def sq_xcorr(p: torch.Tensor, q: torch.Tensor | None, offdiag: bool):
    """``palfast::sq_xcorr`` on the cheaper side: (value, aux)."""
    m, a = p.shape
    b = a if q is None else q.shape[1]
    return _sq_xcorr(p, q, offdiag, sq_xcorr_uses_gram(m, a, b, q is None))


def barlow_twins_xcorr(zhat: torch.Tensor, graph_args, lambd: float, scale: float):
    """``palfast::barlow_twins_xcorr`` on the cheaper side: (loss, aux)."""
    n, d = zhat.shape
    return _barlow_twins_xcorr(zhat, *graph_args, lambd, scale, barlow_twins_xcorr_uses_gram(n, d))


def _pair_acc(p, q):
    return torch.float64 if torch.float64 in (p.dtype, None if q is None else q.dtype) else torch.float32


@torch.library.register_fake("palfast::sq_xcorr")
def _sq_xcorr_fake(p, q, offdiag, gram):
    acc = _pair_acc(p, q)
    m, a = p.shape
    b = a if q is None else q.shape[1]
    if gram:
        aux = p.new_empty((1 if q is None else 2, m, m), dtype=acc)
    else:
        aux = p.new_empty((1, a, b), dtype=acc)
    return p.new_empty((), dtype=acc), aux


@torch.library.register_fake("palfast::sq_xcorr_backward")
def _sq_xcorr_backward_fake(grad, p, q, aux, offdiag, gram):
    return p.new_empty(p.shape), (p.new_empty(0) if q is None else q.new_empty(q.shape))


def _sq_xcorr_setup(ctx, inputs, output):
    p, q, offdiag, gram = inputs
    ctx.offdiag, ctx.gram = offdiag, gram
    ctx.has_q = q is not None
    ctx.save_for_backward(p, q, output[1])


def _sq_xcorr_backward(ctx, grad, grad_aux):
    # aux is saved for backward only; its gradient is not supported.
    p, q, aux = ctx.saved_tensors
    _no_double_backward("sq_xcorr (in vicreg, barlow_twins, spectral_contrastive and vic2)", p, q, grad)
    grad_p, grad_q = ops.sq_xcorr_backward(grad, p, q if ctx.has_q else None, aux, ctx.offdiag, ctx.gram)
    return grad_p, (grad_q if ctx.has_q else None), None, None


torch.library.register_autograd("palfast::sq_xcorr", _sq_xcorr_backward, setup_context=_sq_xcorr_setup)
_sq_xcorr = _differentiable("SqXcorr", ops.sq_xcorr, _sq_xcorr_setup, _sq_xcorr_backward)


@torch.library.register_fake("palfast::barlow_twins_xcorr")
def _barlow_twins_xcorr_fake(zhat, *graph_lambd_scale_gram):
    acc = _acc_dtype(zhat)
    n, d = zhat.shape
    gram = graph_lambd_scale_gram[-1]
    aux = zhat.new_empty((2, n, n) if gram else (1, d, d), dtype=acc)
    return zhat.new_empty((), dtype=acc), aux


@torch.library.register_fake("palfast::barlow_twins_xcorr_backward")
def _barlow_twins_xcorr_backward_fake(grad, zhat, *args):
    return zhat.new_empty(zhat.shape)


def _barlow_twins_xcorr_setup(ctx, inputs, output):
    zhat, *graph, lambd, scale, gram = inputs
    ctx.graph, ctx.scalars = graph, (lambd, scale, gram)
    ctx.save_for_backward(zhat, output[1])


def _barlow_twins_xcorr_backward(ctx, grad, grad_aux):
    zhat, aux = ctx.saved_tensors
    _no_double_backward("barlow_twins", zhat, grad)
    grad_z = ops.barlow_twins_xcorr_backward(grad, zhat, *ctx.graph, aux, *ctx.scalars)
    return (grad_z,) + (None,) * (len(ctx.graph) + len(ctx.scalars))


torch.library.register_autograd(
    "palfast::barlow_twins_xcorr", _barlow_twins_xcorr_backward, setup_context=_barlow_twins_xcorr_setup
)
_barlow_twins_xcorr = _differentiable(
    "BarlowTwinsXcorr", ops.barlow_twins_xcorr, _barlow_twins_xcorr_setup, _barlow_twins_xcorr_backward
)
