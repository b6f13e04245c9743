"""palfast refuses, with the fix spelled out, a torch of another minor or flavour (palfast/_ops.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from palfast import _ops


def _message(built_version, built_cuda, torch_version, torch_cuda, torch_hip=None):
    with pytest.raises(ImportError) as info:
        _ops._check_torch(built_version, built_cuda, torch_version, torch_cuda, torch_hip)
    return str(info.value)


def test_the_installed_torch_passes():
    _ops._check_torch(
        _ops.BUILD_INFO["torch_version"],
        _ops.BUILD_INFO["torch_cuda"],
        torch.__version__,
        torch.version.cuda,
        getattr(torch.version, "hip", None),
    )


@pytest.mark.parametrize("built, cuda", [("2.13.0+cpu", ""), ("2.14.1+cu130", "13.0")])
def test_same_minor_and_flavour_passes(built, cuda):
    patch = built.replace(".0+", ".7+").replace(".1+", ".3+")  # another patch release is fine
    _ops._check_torch(built, cuda, patch, cuda or None)


def test_another_minor_names_both_versions_and_the_fix():
    msg = _message("2.13.0+cpu", "", "2.14.1+cpu", None)
    assert "torch 2.13.0+cpu (cpu)" in msg and "torch 2.14.1+cpu (cpu)" in msg
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu\n" in msg


def test_cpu_wheel_beside_cuda_torch():
    msg = _message("2.14.1+cpu", "", "2.14.1+cu130", "13.0")
    assert "(cpu)" in msg and "torch 2.14.1+cu130 (cu130)" in msg
    assert "pip install torch==2.14.1 --index-url https://download.pytorch.org/whl/cpu\n" in msg


def test_cuda_wheel_beside_another_cuda_or_rocm():
    msg = _message("2.14.1+cu130", "13.0", "2.14.1+cu126", "12.6")
    assert "(cu130)" in msg and "(cu126)" in msg
    assert "pip install torch==2.14.1 --index-url https://download.pytorch.org/whl/cu130\n" in msg
    assert "(rocm6.4)" in _message("2.14.1+cu130", "13.0", "2.14.1+rocm6.4", None, "6.4.43482")


def test_unknown_build_flavour_checks_the_minor_only():
    _ops._check_torch("2.14.1", None, "2.14.0+cu130", "13.0")
    msg = _message("2.13.0", None, "2.14.1", None)
    assert "flavour unknown" in msg and "pip install torch==2.13.0\n" in msg


@pytest.mark.slow
def test_import_of_a_mismatched_build_fails_with_the_fix(tmp_path):
    """The real import path: palfast with a recorded build torch of another minor."""
    fake = "9.99.0+cu990" if torch.version.cuda is None else "9.99.0+cpu"
    code = (
        "import sys, types\n"
        f"sys.modules['palfast._build_info'] = types.SimpleNamespace(torch_version={fake!r}, "
        f"torch_cuda={'99.0' if 'cu' in fake else ''!r})\n"
        "try:\n"
        "    import palfast\n"
        "except ImportError as e:\n"
        "    print(e)\n"
        "else:\n"
        "    sys.exit('palfast imported beside the wrong torch')\n"
    )
    # cwd outside the checkout: the palfast these tests import, not the source folder.
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    assert f"torch {fake}" in out.stdout and f"torch {torch.__version__}" in out.stdout
    assert "pip install torch==9.99.0 --index-url https://download.pytorch.org/whl/" in out.stdout
