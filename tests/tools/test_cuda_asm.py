"""The inline PTX of csrc/cuda/ (no GPU needed: the sources are read, not run): every asm
statement whose instruction reads or writes memory through an address the compiler
cannot see as a pointer (ldmatrix, cp.async, red) carries a "memory" clobber, so the
compiler keeps plain loads and stores of that memory on their side of it (the CPU
emulator replaces these statements, so no emulator test can see a missing clobber)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Instructions that touch memory: shared-memory fragment loads, asynchronous copies and
# their group boundaries and waits, global reductions.
MEMORY_OPS = ("ldmatrix", "cp.async", "red.")
ASM = re.compile(r"asm\s+volatile\s*\((.*?)\);", re.S)


def _asm_statements():
    for path in sorted((ROOT / "csrc" / "cuda").rglob("*.cu*")):
        for m in ASM.finditer(path.read_text()):
            yield path.relative_to(ROOT), m.group(1)


def test_memory_instructions_have_a_memory_clobber():
    touching = [(path, body) for path, body in _asm_statements() if any(op in body for op in MEMORY_OPS)]
    assert len(touching) >= 6  # ldmatrix (2), cp.async, commit_group, wait_group, red
    missing = [f"{path}: {body.split(chr(10))[0].strip()}" for path, body in touching if '"memory"' not in body]
    assert not missing, 'asm without a "memory" clobber:\n' + "\n".join(missing)
