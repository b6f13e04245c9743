"""The CUDA emulator, built once per test session (build.py; cached under build/cuda_emu)."""

from __future__ import annotations

import pytest

from cuda_emu import build as emu_build


@pytest.fixture(scope="session")
def emu():
    """The emulator library (torch.ops.palfast_emu.*); the tests using it skip where no C++
    compiler exists."""
    if emu_build.compiler() is None:
        pytest.skip("no C++ compiler to build the CUDA emulator (set CXX or install g++)")
    return emu_build.load()
