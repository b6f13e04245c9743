"""Run the candidates benchmarks: `python bench/bench_candidates.py [--quick] [--filter TEXT] ...`.

The same as `palfast bench --only candidates ...`; the cases live in
palfast/benchmarks/bench_candidates.py (shipped in the wheel), results go to bench/results/.
"""

import sys

from palfast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--only", "candidates", "--out", "bench/results", *sys.argv[1:]]))
