#!/usr/bin/env python3
"""Registers, shared memory and spills of every CUDA kernel, read from a build log.

A CUDA build with `-Xptxas=-v` (CI's job 2 sets CUDAFLAGS=-Xptxas=-v, which CMake
passes to nvcc) logs, per kernel and architecture, what ptxas allocated. This
prints that as a table, kernels by name (demangled with c++filt when it is on
PATH), and exits 1 if a kernel compiled for one of the --no-spills architectures
spills registers to local memory: the tile kernels of csrc/cuda/ are sized to
hold their accumulators in registers (csrc/cuda/info_nce/info_nce.md, "Registers and
shared memory"), and a spill there is a slowdown no CPU test can see.

    python tools/ptxas_report.py build/cuda-build.log --no-spills sm_90
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

_ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas info\s*: Used (\d+) registers(?:.*?(\d+) bytes smem)?")
# Namespaces and the return type that every palfast kernel shares: noise in the table.
_NOISE = ("void ", "palfast::cuda::", "(anonymous namespace)::", "spmm_detail::")


@dataclass
class Kernel:
    name: str
    arch: str
    registers: int = 0
    smem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0


def parse(text: str) -> list[Kernel]:
    """The kernels of a ptxas -v log, in the order ptxas compiled them."""
    kernels: list[Kernel] = []
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            kernels.append(Kernel(m.group(1), m.group(2)))
        elif kernels and (m := _FRAME.search(line)):
            kernels[-1].stack, kernels[-1].spill_stores, kernels[-1].spill_loads = map(int, m.groups())
        elif kernels and (m := _USED.search(line)):
            kernels[-1].registers = int(m.group(1))
            kernels[-1].smem = int(m.group(2) or 0)
    return kernels


def demangle(names: list[str]) -> list[str]:
    """Readable names: c++filt's, less the shared prefixes and the parameter list."""
    if shutil.which("c++filt") and names:
        out = subprocess.run(
            ["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True
        ).stdout.splitlines()
        names = out if len(out) == len(names) else names
    short = []
    for name in names:
        for noise in _NOISE:
            name = name.replace(noise, "")
        short.append(name.split("(")[0])  # the template arguments stay, the parameters go
    return short


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", help="a build log with ptxas -v output")
    parser.add_argument(
        "--no-spills",
        nargs="*",
        default=[],
        metavar="ARCH",
        help="architectures (e.g. sm_90) on which a spill fails the check",
    )
    args = parser.parse_args(argv)
    with open(args.log, errors="replace") as f:
        kernels = parse(f.read())
    if not kernels:
        print(f"{args.log}: no ptxas -v output (build with CUDAFLAGS=-Xptxas=-v)", file=sys.stderr)
        return 1
    names = demangle([k.name for k in kernels])
    # A kernel used by several .cu files is compiled in each: one row per distinct result.
    rows = sorted(
        {
            (name, k.arch, k.registers, k.smem, k.stack, k.spill_stores, k.spill_loads): k
            for k, name in zip(kernels, names)
        }.items()
    )
    width = max(map(len, names))
    print(f"{'kernel':<{width}}  arch    regs   smem B  stack B  spill st/ld B")
    bad = []
    for (name, *_), k in rows:
        print(
            f"{name:<{width}}  {k.arch:<6} {k.registers:5d} {k.smem:8d} {k.stack:8d}  {k.spill_stores}/{k.spill_loads}"
        )
        if k.arch in args.no_spills and (k.spill_stores or k.spill_loads):
            bad.append(f"{name} ({k.arch}): {k.spill_stores} bytes spill stores, {k.spill_loads} bytes spill loads")
    print(f"{len(rows)} kernels × architectures ({len(kernels)} compilations)")
    for line in bad:
        print(f"spills: {line}", file=sys.stderr)
    if bad:
        print(
            "Registers spill to local memory in the kernels above: shrink their per-thread "
            "state or their __launch_bounds__ (csrc/cuda/info_nce/info_nce.md has the budgets).",
            file=sys.stderr,
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
