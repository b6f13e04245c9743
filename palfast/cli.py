"""``palfast`` command line: ``palfast demo | bench | info`` (SPEC §6).

Minimal version from the active branch; the lead merges the full one."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _info(args) -> int:
    import torch

    from . import __version__, _ops

    print(f"palfast {__version__}, torch {torch.__version__}, build {_ops.BUILD_INFO}")
    try:
        import faiss
        print(f"faiss {faiss.__version__} (GPU: {hasattr(faiss, 'StandardGpuResources')})")
    except ImportError:
        print("faiss: not installed")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="palfast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    from .demo import add_demo_arguments, run_demo

    add_demo_arguments(sub.add_parser("demo", help="active PAL end to end on digits"))
    sub.add_parser("bench", help="micro-benchmarks (not in this branch)")
    sub.add_parser("info", help="versions, compiled kernels, FAISS")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return run_demo(args)
    if args.command == "info":
        return _info(args)
    print("palfast bench: not available in this build")
    return 2


if __name__ == "__main__":
    sys.exit(main())
