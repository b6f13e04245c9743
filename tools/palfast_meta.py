"""scikit-build-core metadata provider: palfast's version and its pin on torch.

version
    Read from ``palfast/__init__.py`` (the one place it is written). With
    ``PALFAST_LOCAL_VERSION=torch`` the installed torch is appended as a PEP 440
    local version, ``0.2.0+pt213cpu`` or ``0.2.0+pt214cu130``, as PyG does, so
    a wheel's file name says which torch it needs (tools/build_wheels.sh sets
    it; plain source builds and the sdist stay ``0.2.0``).

dependencies
    The compiled extension links to libtorch's C++ ABI, which changes between
    minor releases, so a wheel built on torch 2.13 must not be installed beside
    torch 2.14. A requirement cannot say "the CUDA 13.0 flavour" (``torch==2.14.*``
    matches ``2.14.1+cpu`` too): palfast/_ops.py checks that on import.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_INIT = Path(__file__).resolve().parent.parent / "palfast" / "__init__.py"
_LOCAL_VERSION_ENV = "PALFAST_LOCAL_VERSION"


def torch_flavour(cuda: str | None, hip: str | None) -> str:
    """``cpu``, ``cu130`` (torch.version.cuda 13.0) or ``rocm6.2``: the names PyTorch's indexes use."""
    if cuda:
        return "cu" + "".join(cuda.split(".")[:2])
    if hip:
        return "rocm" + ".".join(hip.split(".")[:2])
    return "cpu"


def torch_local_version() -> str:
    """``pt213cpu``: the torch minor and flavour the extension is being built against."""
    import torch

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return f"pt{major}{minor}" + torch_flavour(torch.version.cuda, getattr(torch.version, "hip", None))


def base_version() -> str:
    match = re.search(r'^__version__ = "([^"]+)"$', _INIT.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f'{_INIT} has no line __version__ = "..."')
    return match.group(1)


def dynamic_metadata(field, settings=None, project=None):
    if field == "version":
        local = os.environ.get(_LOCAL_VERSION_ENV, "")
        if local not in ("", "torch"):
            raise RuntimeError(f"{_LOCAL_VERSION_ENV} must be unset or 'torch', got {local!r}")
        return base_version() + (f"+{torch_local_version()}" if local else "")
    if field == "dependencies":
        import torch

        major, minor = torch.__version__.split("+")[0].split(".")[:2]
        return [f"torch=={major}.{minor}.*", "numpy>=1.22"]
    raise RuntimeError(f"palfast_meta provides 'version' and 'dependencies', not {field!r}")


def get_requires_for_dynamic_metadata(settings=None):
    return ["torch"]
