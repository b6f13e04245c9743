#!/usr/bin/env bash
# The tests marked numeric, again under a second CPU capability (.ci/run, job 1a).
#
# Tolerances must hold on every CPU (tests/_helpers.py, ROUNDING_MULTIPLE): rerun the
# tests marked numeric with ATen's (and MKL's) vector code capped below what this CPU
# picks: AVX2 on an AVX-512 machine, as an AMD machine runs; the scalar `default`
# paths on an AVX2 machine, so every machine tries a second rounding.
#
#   bash tools/numeric_second_cpu.sh [VENV]   # VENV (default .venv) has palfast and pytest
set -euo pipefail
venv=${1:-.venv}
capability=$("$venv/bin/python" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')
case "$capability" in
  AVX512*|avx512*) second=avx2 ;;
  *) second=default ;;
esac
echo "this CPU: $capability; rerun with ATEN_CPU_CAPABILITY=$second MKL_ENABLE_INSTRUCTIONS=AVX2"
export ATEN_CPU_CAPABILITY=$second MKL_ENABLE_INSTRUCTIONS=AVX2
"$venv/bin/python" -c 'import torch; print("ATen now uses", torch.backends.cpu.get_cpu_capability())'
"$venv/bin/pytest" -q -p no:cacheprovider -m numeric
