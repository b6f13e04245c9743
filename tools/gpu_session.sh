#!/usr/bin/env bash
# The first command of a session on a machine with a GPU, nvcc and torch (docs/cuda.md,
# "On a GPU"):
#   1. environment (GPU, driver, torch, nvcc);      4. `palfast bench --only info_nce`:
#      wheels carried in .whl/ installed               effective TFLOP/s, forward and
#   2. build palfast in place for the local GPU        forward+backward, vs eager PyTorch,
#      (ptxas registers and spills per kernel)         torch.compile and Inf-CL, kernel
#   3. the CUDA tests                                  grids, the speed targets (JSON in $OUT)
#                                                   5. compute-sanitizer memcheck, racecheck,
#                                                      synccheck over every CUDA op
# Every step has a time cap and the whole run ends within --total-s seconds (default
# 540); a failing step is reported and the next one still runs. The exit status is
# non-zero if any step failed. The benchmark runs before the sanitizers: it needs the most
# time, and the sanitizers (small workloads, capped at 60, 60 and 45 s) get what
# is left.
#
#   tools/gpu_session.sh            # on the GPU machine (docs/cuda.md, "On a GPU")
#   tools/gpu_session.sh --dry-run  # the same steps on the CPU (CI runs this): the build
#                                   # is configured only, CUDA parts say "skipped: no GPU"
#   tools/gpu_session.sh --total-s 300  # a shorter (or longer) time limit for the whole run
# OUT=dir sets where logs and the benchmark's JSON go (default build/gpu_session);
# they are 8 files, few enough to copy back from a remote machine in one go.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
TOTAL_S=540          # default limit of the whole run: 9 minutes, each step capped inside it
while (( $# )); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --total-s)
      [[ "${2:-}" =~ ^[0-9]+$ ]] && (( $2 >= 60 )) || {
        echo "$0: --total-s needs a whole number of seconds >= 60, got '${2:-}'" >&2; exit 2; }
      TOTAL_S=$2; shift ;;
    *) echo "usage: $0 [--dry-run] [--total-s SECONDS]" >&2; exit 2 ;;
  esac
  shift
done

OUT="${OUT:-build/gpu_session}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SAFETY_S=15          # kept back for the table at the end
START=$(date +%s)
PY="${PYTHON:-python3}"
JOBS=$(nproc)
FAILED=()
# Wheels a GPU machine lacks (Inf-CL), carried in .whl/ (docs/cuda.md), go here.
SITE="$PWD/build/gpu_session_site"
# The benchmark writes JSON + CSV here; the JSON alone is copied into $OUT at the end.
BENCH_DIR="$PWD/build/gpu_session_bench"
rm -rf "$BENCH_DIR"

remaining() { echo $(( TOTAL_S - SAFETY_S - ($(date +%s) - START) )); }

# step NAME CAP_S COMMAND...: runs COMMAND with the smaller of CAP_S and the time
# left, output to the terminal and $OUT/NAME.log.
step() {
  local name=$1 cap=$2; shift 2
  local left; left=$(remaining)
  (( cap > left )) && cap=$left
  echo "=== $name (cap ${cap} s) ==="
  if (( cap <= 0 )); then
    echo "skipped: out of time"; FAILED+=("$name (no time left)"); return
  fi
  local t0=$(date +%s) rc=0
  # The steps are shell functions: timeout runs them in a child bash (export -f below).
  timeout --kill-after=5 "$cap" bash -c '"$@"' step "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  echo "--- $name: exit $rc in $(( $(date +%s) - t0 )) s"
  if (( rc == 124 || rc == 137 )); then FAILED+=("$name (timed out after ${cap} s)")
  elif (( rc != 0 )); then FAILED+=("$name (exit $rc)"); fi
}

HAVE_GPU=0
if (( ! DRY_RUN )) && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  HAVE_GPU=1
fi
DEVICE=cpu; (( HAVE_GPU )) && DEVICE=cuda
no_gpu() { echo "skipped: no GPU ($*)"; }

# The toolkit's own nvcc (a wrapper elsewhere on PATH would mislead torch's CMake config).
find_nvcc() {
  local c
  for c in "${CUDACXX:-}" "${CUDA_HOME:-/nonexistent}/bin/nvcc" /usr/local/cuda/bin/nvcc \
           "$(command -v nvcc 2>/dev/null)"; do
    [ -n "$c" ] && [ -x "$c" ] && { readlink -f "$c"; return; }
  done
}

# The carried wheels, installed without the network or their dependencies (.whl/ holds
# every one that is missing there, one version each).
install_wheels() {
  local wheels=(.whl/*.whl)
  if [ ! -e "${wheels[0]}" ]; then echo "no .whl/*.whl: nothing to install (Inf-CL will be skipped)"; return; fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${wheels[@]}" && echo "installed into $SITE: ${wheels[*]}"
}

env_info() {
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  if (( HAVE_GPU )); then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  else no_gpu "nvidia-smi"; fi
  echo "nvcc: $(find_nvcc || true)"
  local n; n=$(find_nvcc); [ -n "$n" ] && "$n" --version | tail -1
  command -v compute-sanitizer || echo "compute-sanitizer: not found"
  nproc
  install_wheels
}

# In place: CMake builds _C and copies it into palfast/ (PALFAST_INPLACE), so
# PYTHONPATH=. imports this checkout; no pip, whose metadata pins torch's minor.
build() {
  local args=(-S . -B build/gpu-session -G Ninja -DCMAKE_BUILD_TYPE=Release -DPALFAST_INPLACE=ON
              -DPython_EXECUTABLE="$(command -v "$PY")")
  if (( DRY_RUN )); then
    cmake "${args[@]}" -DPALFAST_CUDA=OFF && echo "build skipped in dry run (configure only; the tests use the installed palfast)"
    return
  fi
  local nvcc; nvcc=$(find_nvcc)
  [ -n "$nvcc" ] || { echo "no nvcc found" >&2; return 1; }
  local cc; cc=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  # -Xptxas=-v: this GPU's compiler's registers, shared memory and spills per kernel,
  # tabled by tools/ptxas_report.py after the build (as CI's job 2 does for nvcc 13.0).
  TORCH_CUDA_ARCH_LIST="$cc" CUDACXX="$nvcc" cmake "${args[@]}" -DPALFAST_CUDA=ON \
    -DCMAKE_CUDA_COMPILER="$nvcc" -DCMAKE_CUDA_FLAGS=-Xptxas=-v &&
    cmake --build build/gpu-session -j "$JOBS" 2>&1 | tee build/gpu-session/compile.log &&
    PYTHONPATH=. "$PY" -c "import palfast, palfast._C as c; print('built', c.cuda_archs, 'with_cuda', c.with_cuda)" &&
    { "$PY" tools/ptxas_report.py build/gpu-session/compile.log || true; }
}

# On the GPU this checkout (built in place) comes first; the carried wheels follow.
pyenv() {
  local path="$SITE"
  (( DRY_RUN )) || path=".:$SITE"
  PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}" "$@"
}

tests() {
  if (( HAVE_GPU )); then
    pyenv "$PY" -P -m pytest -x -q tests/losses/test_info_nce_cuda.py tests/losses/test_info_nce.py tests/test_graph.py -k "cuda or CUDA"
  else
    no_gpu "CUDA tests"; pyenv "$PY" -P -m pytest -q tests/losses/test_info_nce_cuda.py
  fi
}

sanitize() {
  local tool=$1
  if (( HAVE_GPU )); then
    command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer not found"; return 1; }
    # Caching allocator off: memcheck then sees each tensor's real bounds.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 pyenv compute-sanitizer --tool "$tool" --error-exitcode 1 \
      "$PY" tools/gpu_bench.py workload --device cuda
  else
    no_gpu "compute-sanitizer --tool $tool; the workload runs on the CPU"
    pyenv "$PY" tools/gpu_bench.py workload --device cpu
  fi
}

# -P: the installed palfast in a dry run, not the source tree in the current folder.
bench() {
  if (( HAVE_GPU )); then
    pyenv "$PY" -P -m palfast.cli bench --device cuda --only info_nce --repeats 10 --min-time 0.3 \
      --out "$BENCH_DIR"
  else
    no_gpu "benchmark at N=4096..65536 on CUDA; one small CPU case instead"
    pyenv "$PY" -P -m palfast.cli bench --device cpu --only info_nce --quick --filter "N=1024" \
      --repeats 1 --no-memory --out "$BENCH_DIR"
  fi
}

export DRY_RUN HAVE_GPU DEVICE OUT PY JOBS SITE BENCH_DIR
export -f find_nvcc no_gpu pyenv install_wheels env_info build tests sanitize bench
echo "gpu_session: dry_run=$DRY_RUN gpu=$HAVE_GPU out=$OUT"
# Caps add up to more than TOTAL_S on purpose: a step that finishes early leaves
# its time to the later ones, and the last steps get what is left.
step env 30 env_info
step build 180 build
step tests 80 tests
# Compiling torch.compile's and Inf-CL's kernels takes most of it; the JSON is rewritten
# after every case, so a cut run keeps the cases it finished (the speed targets' cases first).
step bench 240 bench
step memcheck 60 sanitize memcheck   # importing torch under a sanitizer alone takes ~20 s
step racecheck 60 sanitize racecheck
step synccheck 45 sanitize synccheck

echo "=== summary ($(( $(date +%s) - START )) s) ==="
for f in "$BENCH_DIR"/bench_*.json; do [ -f "$f" ] && cp "$f" "$OUT/"; done
pyenv "$PY" tools/gpu_bench.py table --out "$BENCH_DIR" || FAILED+=("bench (no results)")
if (( ${#FAILED[@]} )); then printf 'FAILED: %s\n' "${FAILED[@]}"; exit 1; fi
echo "all steps passed"
