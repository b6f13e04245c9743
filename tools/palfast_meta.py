"""scikit-build-core metadata provider: pin torch to the minor version we build against.

The compiled extension links to libtorch's C++ ABI, which changes between
minor releases, so a wheel built on torch 2.13 must not be installed beside
torch 2.14. Everything else palfast needs at run time is listed here too.
"""

from __future__ import annotations


def dynamic_metadata(field, settings=None, project=None):
    if field != "dependencies":
        raise RuntimeError(f"palfast_meta only provides 'dependencies', not {field!r}")
    import torch

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return [f"torch=={major}.{minor}.*", "numpy>=1.22"]


def get_requires_for_dynamic_metadata(settings=None):
    return ["torch"]
