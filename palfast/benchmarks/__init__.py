"""The benchmark cases of `palfast bench`, one module per op, sharing harness.py (bench/README.md)."""
