"""Builds and loads the CPU emulation of palfast's CUDA ops (test-only).

The real csrc/cuda/**/*.cu files (and csrc/palfast.cpp, for the op schemas) are
compiled by the host C++ compiler with tests/cuda_emu/prelude.h force-included
and tests/cuda_emu/include ahead of torch's headers, so the CUDA headers they
include resolve to the emulator (cuda_emu.h). The ops register under
``torch.ops.palfast_emu`` for CPU tensors.

Shared memory declarations are rewritten on the way (rewrite(): the compiler
sees a copy of csrc/ and of tests/cuda_emu/*.cpp|*.cu under build/cuda_emu/src,
with `#line` naming the original file, so diagnostics point at the real
source): `extern __shared__ T name[];` becomes a reference to the launch's
dynamic shared memory, and each static `__shared__` array reports its size, so
the emulator can check the launch's shared memory against the GPU's limits
(cuda_emu.h, "Shared memory").

Objects are cached under build/cuda_emu/ by a hash of their source, every
header under csrc/ and tests/cuda_emu/, this file, the flags and the torch
version: editing a .cu file and re-running pytest rebuilds that file only. The
prelude (with ATen.h) is a precompiled header, keyed by the emulator's own files.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import os
import re
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
    own = [*HERE.glob("*.cpp"), *HERE.glob("*.cu")]  # the emulator's runtime and test kernels
    return [CSRC / "palfast.cpp", *sorted((CSRC / "cuda").rglob("*.cu")), *sorted(own)]


# ---------------------------------------------------------------- shared memory rewrite
# A host compiler cannot take `extern __shared__ T name[];` (cuda_emu.h defines
# __shared__ as `static`, and `extern static` is no declaration), and a static is
# blind to the size of what it declares. So the sources are compiled from a copy
# in which
#   extern __shared__ [__align__(A)] T name[];
# becomes  T (&name)[] = ::palfast_emu::dynamic_shared<T>(A);  (the launch's
# dynamic shared memory, as on the GPU an array of unknown bound), and
#   __shared__ ... a[..], b[..];
# is followed, on the same line, by a declaration that reports each array's
# address and size to the launch (::palfast_emu::note_static_shared). Comments,
# string literals and preprocessor lines are left alone; a declaration of another
# form is a build error that says what is understood.
SRC = BUILD / "src"  # the rewritten copy
_SHARED = re.compile(r"\b(extern\s+)?__shared__\b")
_ALIGN = re.compile(r"__align__\s*\(")
_NAME_AT_END = re.compile(r"([A-Za-z_]\w*)\s*$")
_CLOSE = {"(": ")", "[": "]", "{": "}"}


def _masked(text: str) -> str:
    """text with comments, string/char literals and preprocessor lines blanked
    (newlines kept), so that offsets into it are offsets into text."""
    out = list(text)
    i, n, line_start = 0, len(text), True
    while i < n:
        c = text[i]
        if line_start and c == "#":  # a directive, with its continuation lines
            j = i
            while j < n and not (text[j] == "\n" and text[j - 1] != "\\"):
                j += 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
        elif c == "R" and text.startswith('R"', i) and not (i and (text[i - 1].isalnum() or text[i - 1] == "_")):
            delim = text[i + 2 : text.index("(", i)]
            j = text.index(")" + delim + '"', i) + len(delim) + 2
        elif c in "\"'" and not (c == "'" and i and text[i - 1].isalnum()):  # not a digit separator
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            j += 1
        else:
            line_start = c == "\n" or (line_start and c in " \t")
            i += 1
            continue
        for k in range(i, min(j, n)):
            if out[k] != "\n":
                out[k] = " "
        i = j
    return "".join(out)


def _split_top(decl: str, sep: str) -> list[str]:
    """decl split at the separators outside brackets (and outside <> before any bracket)."""
    parts, depth, angle, start = [], [], 0, 0
    for i, c in enumerate(decl):
        if c in _CLOSE:
            depth.append(_CLOSE[c])
        elif depth and c == depth[-1]:
            depth.pop()
        elif not depth and c == "<":
            angle += 1
        elif not depth and c == ">" and angle:
            angle -= 1
        elif not depth and not angle and c == sep:
            parts.append(decl[start:i])
            start = i + 1
    return [*parts, decl[start:]]


def _strip_align(decl: str) -> tuple[str, str | None]:
    """decl without its __align__(A), and A (None without one)."""
    m = _ALIGN.search(decl)
    if m is None:
        return decl, None
    depth, j = 1, m.end()
    while depth:
        depth += {"(": 1, ")": -1}.get(decl[j], 0)
        j += 1
    return decl[: m.start()] + " " + decl[j:], decl[m.end() : j - 1].strip()


def rewrite(text: str, where: str) -> str:
    """text with its __shared__ declarations rewritten for the emulator (above)."""
    masked, edits, count = _masked(text), [], 0
    for m in _SHARED.finditer(masked):
        end = masked.find(";", m.end())
        if end < 0:
            raise RuntimeError(f"cuda_emu: {where}: a __shared__ declaration without its ';'")
        body, align = _strip_align(text[m.end() : end])
        line = text.count("\n", 0, m.start()) + 1
        if m.group(1):  # extern: the launch's dynamic shared memory
            d = re.fullmatch(r"\s*(.+?)\s*\b([A-Za-z_]\w*)\s*\[\s*\]\s*", body, re.S)
            if d is None:
                raise RuntimeError(
                    f"cuda_emu: {where}:{line}: cannot emulate this extern __shared__ declaration;"
                    " write it as `extern __shared__ __align__(N) T name[];`"
                )
            t, name = d.group(1), d.group(2)
            new = f"{t} (&{name})[] = ::palfast_emu::dynamic_shared<{t}>({align or 1});"
            edits.append((m.start(), end + 1, new + "\n" * text.count("\n", m.start(), end)))
            continue
        notes = []
        for declarator in _split_top(body, ","):
            head = _split_top(declarator, "=")[0]
            head = head[: head.index("[")] if "[" in head else head
            n = _NAME_AT_END.search(head)
            if n is None:
                raise RuntimeError(f"cuda_emu: {where}:{line}: cannot read the name in this __shared__ declaration")
            notes.append(
                f" const bool palfast_emu_shared_{count} ="
                f" ::palfast_emu::note_static_shared(&{n.group(1)}, sizeof({n.group(1)}));"
            )
            count += 1
        edits.append((end + 1, end + 1, "".join(notes)))
    for start, stop, new in reversed(edits):
        text = text[:start] + new + text[stop:]
    return text


def _shadow(path: Path) -> Path:
    """Where the rewritten copy of a file of the checkout lives."""
    return SRC / path.relative_to(ROOT)


def _write_shadow_tree() -> None:
    """The rewritten copy of csrc/ and of the emulator's own sources, afresh."""
    shutil.rmtree(SRC, ignore_errors=True)
    files = [p for p in CSRC.rglob("*") if p.is_file()] + [p for p in sources() if p.parent == HERE]
    for p in files:
        out = _shadow(p)
        out.parent.mkdir(parents=True, exist_ok=True)
        text = p.read_text()
        # #line: the compiler names the original file in diagnostics and __FILE__.
        out.write_text(f'#line 1 "{_rel(p)}"\n' + rewrite(text, _rel(p)))


def _rel(p: Path) -> str:
    return os.path.relpath(p, ROOT)


def _flags() -> list[str]:
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # Paths relative to the repository root (the compiler's working directory), so a
    # copy of the checkout reuses the cache.
    includes = [f"-I{_rel(HERE / 'include')}", f"-I{_rel(HERE)}", f"-I{_rel(_shadow(CSRC))}"]
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
    args = [cxx, *flags, "-c", "-o", str(obj) + ".tmp", "-x", "c++"]
    if src.parent != HERE:  # palfast's own files see the emulator and palfast_emu registrations
        args = [cxx, f"-I{_rel(pch_dir)}", *flags, "-c", "-o", str(obj) + ".tmp", "-include", "prelude.h", "-x", "c++"]
    _run([*args, _rel(_shadow(src))], f"compiling {_rel(src)}")
    os.replace(str(obj) + ".tmp", obj)


def build() -> Path:
    """The emulator library for the current sources (compiled when missing)."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("cuda_emu: no C++ compiler (set CXX or install g++)")
    flags = _flags()
    setup = " ".join([cxx, *flags, torch.__version__])
    common = _digest([*_headers(), Path(__file__).resolve()], setup)  # this file: the rewrite
    pch_dir = BUILD / f"pch-{_digest(list(HERE.rglob('*.h')), setup)}"
    BUILD.mkdir(parents=True, exist_ok=True)
    objs = {src: BUILD / f"{src.stem}-{_digest([src], common)}.o" for src in sources()}
    lib = BUILD / f"palfast_emu-{hashlib.sha256(''.join(o.name for o in objs.values()).encode()).hexdigest()[:16]}.so"
    with open(BUILD / ".lock", "w") as lock:  # one builder at a time (parallel pytest runs)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib.exists():
            return lib
        todo = [(src, obj) for src, obj in objs.items() if not obj.exists()]
        _write_shadow_tree()
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
