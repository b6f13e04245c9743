"""Run the info_nce benchmarks: `python bench/bench_info_nce.py [--quick] [--filter TEXT] ...`.

The same as `palfast bench --only info_nce ...`; the cases live in
palfast/benchmarks/bench_info_nce.py (shipped in the wheel), results go to bench/results/.
"""

import sys

from palfast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--only", "info_nce", "--out", "bench/results", *sys.argv[1:]]))
