"""The only module that touches ``torch.ops.palfast``.

Importing it loads the compiled extension (which registers the op schemas and
the CPU/CUDA kernels) and registers, for each op, a fake kernel (shapes only,
for torch.compile and meta tensors) and its autograd formula.
"""

from __future__ import annotations

import torch

try:
    from . import _C
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "palfast's compiled extension (palfast._C) could not be loaded: "
        f"{e}. Rebuild it against the installed torch with\n"
        "    pip install --no-build-isolation --force-reinstall --no-deps .\n"
        "from a palfast checkout (see README.md, 'Build')."
    ) from e


def _torch_minor(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


if _torch_minor(_C.torch_version) != _torch_minor(torch.__version__):
    raise ImportError(
        f"palfast._C was built against torch {_C.torch_version} but torch {torch.__version__} "
        "is installed; the C++ ABI differs between torch minor versions. Rebuild with\n"
        "    pip install --no-build-isolation --force-reinstall --no-deps .")

ops = torch.ops.palfast

#: How the extension was built: torch version, whether CUDA kernels exist, archs.
BUILD_INFO = {
    "torch_version": _C.torch_version,
    "with_cuda": bool(_C.with_cuda),
    "cuda_archs": [a for a in _C.cuda_archs.replace(",", ";").split(";") if a],
}


def _acc_dtype(z: torch.Tensor) -> torch.dtype:
    return torch.float64 if z.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------- info_nce
@torch.library.register_fake("palfast::info_nce")
def _info_nce_fake(z, indptr, indices, weights, t_indptr, t_indices, t_weights, labels,
                   label_weights, label_classes, pos_weight, temperature, normalize,
                   anchor_begin, anchor_end):
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
    # lse is an auxiliary output saved for backward; its gradient is not supported.
    grad_z = ops.info_nce_backward(grad_rows.contiguous(), z, *ctx.graph, lse, *ctx.scalars)
    return (grad_z,) + (None,) * (len(ctx.graph) + len(ctx.scalars))


torch.library.register_autograd("palfast::info_nce", _info_nce_backward,
                                setup_context=_info_nce_setup)
