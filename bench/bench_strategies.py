"""Run the strategy suite: `python bench/bench_strategies.py [--quick] [--tasks ...] ...`.

The same as `python -m palfast.benchmarks.bench_strategies --out bench/results ...`
(`palfast bench --only strategies` runs it with fewer options); the suite lives in
palfast/benchmarks/bench_strategies.py (shipped in the wheel), results go to bench/results/.
"""

import sys

from palfast.benchmarks.bench_strategies import main

if __name__ == "__main__":
    sys.exit(main(["--out", "bench/results", *sys.argv[1:]]))
