"""Builds and loads the CPU emulation of palfast's CUDA ops (test-only).

The real csrc/cuda/**/*.cu files (and csrc/palfast.cpp, for the op schemas) are
compiled by the host C++ compiler with tests/cuda_emu/prelude.h force-included
and tests/cuda_emu/include ahead of torch's headers, so the CUDA headers they
include resolve to the emulator (cuda_emu.h). The ops register under
``torch.ops.palfast_emu`` for CPU tensors.

Objects are cached under build/cuda_emu/ by a hash of their source, every
header under csrc/ and tests/cuda_emu/, the flags and the torch version:
editing a .cu file and re-running pytest rebuilds that file only. The prelude
(with ATen.h) is a precompiled header, keyed by the emulator's own files.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import torch
import torch.utils.cpp_extension as cpp_extension

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
BUILD = Path(os.environ.get("PALFAST_EMU_BUILD", ROOT / "build" / "cuda_emu"))
# -O1: the kernels run fast enough and each file compiles in a fraction of -O2's time.
OPT = os.environ.get("PALFAST_EMU_OPT", "-O1")
JOBS = 2  # objects compiled at once (CI and dev machines have 2 cores)


def compiler() -> str | None:
    """The host C++ compiler ($CXX, else g++ or c++ on PATH), or None."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def sources() -> list[Path]:
    return [CSRC / "palfast.cpp", *sorted((CSRC / "cuda").rglob("*.cu")), *sorted(HERE.glob("*.cpp"))]


def _rel(p: Path) -> str:
    return os.path.relpath(p, ROOT)


def _flags() -> list[str]:
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # Paths relative to the repository root (the compiler's working directory), so a
    # copy of the checkout reuses the cache.
    includes = [f"-I{_rel(HERE / 'include')}", f"-I{_rel(HERE)}", f"-I{_rel(CSRC)}"]
    includes += [f"-isystem{p}" for p in cpp_extension.include_paths()]
    includes.append(f"-isystem{sysconfig.get_paths()['include']}")
    return [
        "-std=c++20",
        OPT,
        "-fPIC",
        "-g0",
        "-w",
        # CUDA code type-puns freely (uint4 loads of 16-bit rows): no strict aliasing.
        "-fno-strict-aliasing",
        # The same rounding on every x86-64: no fused multiply-adds that the compiler
        # chose, and no -march (baseline SSE2 code, whatever the build machine's CPU).
        "-ffp-contract=off",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        f'-DPALFAST_TORCH_VERSION="{torch.__version__}"',
        '-DPALFAST_CUDA_ARCHS="emulated"',
        *includes,
    ]


def _digest(paths, extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for p in sorted(paths):
        h.update(str(p.relative_to(ROOT)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _headers() -> list[Path]:
    found = [p for ext in ("*.h", "*.cuh") for p in CSRC.rglob(ext)]
    return found + [p for p in HERE.rglob("*.h")]


def _run(args: list[str], what: str) -> None:
    proc = subprocess.run(["nice", *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"cuda_emu: {what} failed:\n{proc.stderr[-8000:]}")


def _precompile(cxx: str, pch_dir: Path, flags: list[str]) -> None:
    """prelude.h.gch in pch_dir: g++ takes it for `-include prelude.h` when pch_dir
    comes first on the include path (and falls back to the header if it does not fit)."""
    pch = pch_dir / "prelude.h.gch"
    if pch.exists():
        return
    pch_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "prelude.h", pch_dir / "prelude.h")
    _run(
        [cxx, *flags, "-x", "c++-header", _rel(pch_dir / "prelude.h"), "-o", str(pch) + ".tmp"],
        "precompiling tests/cuda_emu/prelude.h",
    )
    os.replace(str(pch) + ".tmp", pch)


def _compile(cxx: str, src: Path, obj: Path, flags: list[str], pch_dir: Path) -> None:
    args = [cxx, *flags, "-c", "-o", str(obj) + ".tmp"]
    if src.parent != HERE:  # palfast's own files see the emulator and palfast_emu registrations
        args = [cxx, f"-I{_rel(pch_dir)}", *flags, "-c", "-o", str(obj) + ".tmp", "-include", "prelude.h", "-x", "c++"]
    _run([*args, _rel(src)], f"compiling {_rel(src)}")
    os.replace(str(obj) + ".tmp", obj)


def build() -> Path:
    """The emulator library for the current sources (compiled when missing)."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("cuda_emu: no C++ compiler (set CXX or install g++)")
    flags = _flags()
    setup = " ".join([cxx, *flags, torch.__version__])
    common = _digest(_headers(), setup)
    pch_dir = BUILD / f"pch-{_digest(list(HERE.rglob('*.h')), setup)}"
    BUILD.mkdir(parents=True, exist_ok=True)
    objs = {src: BUILD / f"{src.stem}-{_digest([src], common)}.o" for src in sources()}
    lib = BUILD / f"palfast_emu-{hashlib.sha256(''.join(o.name for o in objs.values()).encode()).hexdigest()[:16]}.so"
    with open(BUILD / ".lock", "w") as lock:  # one builder at a time (parallel pytest runs)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib.exists():
            return lib
        todo = [(src, obj) for src, obj in objs.items() if not obj.exists()]
        if any(src.parent != HERE for src, _ in todo):
            _precompile(cxx, pch_dir, flags)
        with concurrent.futures.ThreadPoolExecutor(JOBS) as pool:
            for f in [pool.submit(_compile, cxx, src, obj, flags, pch_dir) for src, obj in todo]:
                f.result()
        torch_lib = Path(torch.__file__).parent / "lib"
        link = [
            cxx,
            "-shared",
            "-o",
            str(lib) + ".tmp",
            *map(str, objs.values()),
            f"-L{torch_lib}",
            f"-Wl,-rpath,{torch_lib}",
            "-ltorch",
            "-ltorch_cpu",
            "-lc10",
        ]
        _run(link, "linking")
        os.replace(str(lib) + ".tmp", lib)
        _prune({lib, pch_dir})
    return lib


def _prune(keep: set[Path]) -> None:
    """Drops older libraries and precompiled headers (hundreds of MB each); old
    objects are small and stay, so undoing an edit rebuilds nothing."""
    for p in [*BUILD.glob("palfast_emu-*.so"), *BUILD.glob("pch-*")]:
        if p not in keep:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


_loaded: Path | None = None


def load():
    """``torch.ops.palfast_emu`` with the emulated CUDA ops registered (built if needed)."""
    global _loaded
    if _loaded is None:
        _loaded = build()
        torch.ops.load_library(str(_loaded))
    return torch.ops.palfast_emu
