"""Run the covariance benchmarks: `python bench/bench_covariance.py [--quick] [--filter TEXT] ...`.

The same as `palfast bench --only covariance ...`; the cases live in
palfast/benchmarks/bench_covariance.py (shipped in the wheel), results go to bench/results/.
"""

import sys

from palfast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--only", "covariance", "--out", "bench/results", *sys.argv[1:]]))
