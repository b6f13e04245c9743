"""Dynamic shared memory under the CPU emulator (tests/cuda_emu/cuda_emu.h, "Shared
memory"): `extern __shared__` arrays sized by the launch, the 48 KB default limit that
cudaFuncSetAttribute raises, the device's opt-in maximum with the static bytes counted,
a fresh poisoned buffer per block at the declared alignment, and the planted bugs the
emulator must catch. The kernels are in tests/cuda_emu/dynamic_smem.cu.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cuda_emu import build as emu_build

# the emulator tests are the suite's slowest (make test-fast leaves them out)
pytestmark = pytest.mark.slow

FLOAT = 4  # bytes
DEFAULT_LIMIT = 48 * 1024  # dynamic shared memory a launch gets without cudaFuncSetAttribute
OPTIN_SM90 = 227 * 1024  # cudaDevAttrMaxSharedMemoryPerBlockOptin of an H100/H200
OPTIN_SM80 = 163 * 1024  # ... of an A100
STATIC = 16 * 1024  # the static array of block_sum_kernel
POISON_WORD = 0xFFFFFFFF  # what a block finds in dynamic shared memory it has not written
NO_LIMIT = -1  # the op's max_dynamic: cudaFuncSetAttribute not called
NO_PROBE = -1


def _x(blocks: int, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(blocks, rows, cols, generator=torch.Generator().manual_seed(seed))


def _transpose(emu, x, max_dynamic, barrier=True, probe=NO_PROBE, probe_write=False):
    return emu.emu_dsmem_transpose(x, max_dynamic, barrier, probe, probe_write)


@pytest.mark.parametrize("seed", [0, 1])
def test_transpose_above_48kb_after_cudafuncsetattribute(emu, seed):
    """An 80 KB tile per block, three blocks: each block's own buffer, against torch."""
    emu.emu_set_seed(seed)
    x = _x(3, 128, 160, seed)
    bytes_ = 128 * 160 * FLOAT
    assert bytes_ > DEFAULT_LIMIT
    assert torch.equal(_transpose(emu, x, bytes_), x.transpose(1, 2))


def test_transpose_at_the_opt_in_maximum(emu):
    """227 KB on the emulated sm_90: the largest tile a block can have."""
    x = _x(1, 227, 256)
    assert 227 * 256 * FLOAT == OPTIN_SM90
    assert torch.equal(_transpose(emu, x, OPTIN_SM90), x.transpose(1, 2))


def test_48kb_needs_no_attribute(emu):
    x = _x(2, 96, 128)
    assert 96 * 128 * FLOAT == DEFAULT_LIMIT
    assert torch.equal(_transpose(emu, x, NO_LIMIT), x.transpose(1, 2))


def test_above_48kb_without_attribute_is_refused(emu):
    """On a GPU the launch fails with cudaErrorInvalidValue; here it raises before any block runs."""
    with pytest.raises(RuntimeError, match=r"launch refused \(cudaErrorInvalidValue.*cudaFuncSetAttribute"):
        _transpose(emu, _x(1, 97, 128), NO_LIMIT)


def test_above_the_attribute_is_refused(emu):
    with pytest.raises(RuntimeError, match="launch refused.*limit 65536 bytes set by cudaFuncSetAttribute"):
        _transpose(emu, _x(1, 128, 160), 64 * 1024)


def test_attribute_above_the_opt_in_maximum_is_invalid(emu):
    with pytest.raises(RuntimeError, match="cudaFuncSetAttribute.*invalid argument"):
        _transpose(emu, _x(1, 8, 8), OPTIN_SM90 + 1)


def test_sm80_opt_in_maximum(emu):
    """An A100 allows 163 KB: 200 KB is refused by cudaFuncSetAttribute there, not on an H100."""
    x = _x(1, 200, 256)
    emu.emu_set_smem_arch(80)
    try:
        with pytest.raises(RuntimeError, match="cudaFuncSetAttribute.*invalid argument"):
            _transpose(emu, x, 200 * 256 * FLOAT)
        assert torch.equal(_transpose(emu, _x(1, 163, 256), OPTIN_SM80), _x(1, 163, 256).transpose(1, 2))
    finally:
        emu.emu_set_smem_arch(90)
    assert torch.equal(_transpose(emu, x, 200 * 256 * FLOAT), x.transpose(1, 2))


def _sums(blocks: int, chunk: int) -> torch.Tensor:
    """Small integers: every float32 sum is exact."""
    return torch.randint(-8, 9, (blocks, chunk), generator=torch.Generator().manual_seed(chunk)).float()


def test_static_plus_dynamic_within_48kb(emu):
    x = _sums(3, (DEFAULT_LIMIT - STATIC) // FLOAT)
    assert torch.equal(emu.emu_dsmem_block_sum(x, NO_LIMIT), x.sum(1))


def test_static_plus_dynamic_above_48kb_without_attribute_is_refused(emu):
    """32 KB dynamic alone passes the launch check; with the 16 KB static array it does not."""
    x = _sums(1, (DEFAULT_LIMIT - STATIC) // FLOAT + 1)
    with pytest.raises(RuntimeError, match="static plus dynamic shared memory above 48 KB"):
        emu.emu_dsmem_block_sum(x, NO_LIMIT)


def test_static_plus_attribute_at_the_opt_in_maximum(emu):
    chunk = (OPTIN_SM90 - STATIC) // FLOAT
    x = _sums(2, chunk)
    assert torch.equal(emu.emu_dsmem_block_sum(x, chunk * FLOAT), x.sum(1))


def test_static_plus_attribute_above_the_opt_in_maximum_is_refused(emu):
    """cudaFuncSetAttribute(220 KB) passes alone, but not with the kernel's 16 KB static array:
    on a GPU that call fails; the emulator learns the static bytes at the launch."""
    x = _sums(1, 1024)
    with pytest.raises(RuntimeError, match="above the device's opt-in maximum"):
        emu.emu_dsmem_block_sum(x, 220 * 1024)


@pytest.mark.parametrize("align", [16, 128])
def test_every_block_starts_poisoned_at_the_declared_alignment(emu, align):
    """Each block finds poison, though the block before it wrote there; the buffer is
    aligned to what the declaration asks and not to twice that."""
    out = emu.emu_dsmem_first_look(4, align, 100)
    assert (out[:, 0] == POISON_WORD).all()
    assert (out[:, 1] % align == 0).all() and (out[:, 1] % (2 * align) == align).all()


# ------------------------------------------------------------------ planted bugs
def test_missing_barrier_reads_poison(emu):
    x = _x(2, 128, 160)
    got = _transpose(emu, x, 128 * 160 * FLOAT, barrier=False)
    assert got.isnan().any()


def test_read_one_past_the_end_reads_poison(emu):
    x = _x(3, 128, 160)
    got = _transpose(emu, x, 128 * 160 * FLOAT, probe=0)
    assert got[:, 0, 0].isnan().all()  # every block's thread 0 read element rows·cols


def test_write_one_past_the_end_is_an_error(emu):
    with pytest.raises(RuntimeError, match="wrote dynamic shared memory 0 bytes past the end of the 81920 bytes"):
        _transpose(emu, _x(1, 128, 160), 128 * 160 * FLOAT, probe=0, probe_write=True)


def test_read_far_past_the_end_faults_with_a_message():
    """Beyond the slack the buffer ends at a guard page: the process dies (a segmentation
    fault, as an unchecked kernel would on the GPU), naming the overrun. Run apart."""
    if emu_build.compiler() is None:
        pytest.skip("no C++ compiler to build the CUDA emulator (set CXX or install g++)")
    lib = emu_build.build()
    probe = 8  # 32 bytes past: the slack of a 16-byte aligned buffer is under 32 bytes
    code = (
        f"import torch; torch.ops.load_library({str(lib)!r}); "
        f"torch.ops.palfast_emu.emu_dsmem_transpose(torch.zeros(1, 64, 64), -1, True, {probe}, False)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "bytes past the end of the 16384 bytes its launch asked for" in proc.stderr
