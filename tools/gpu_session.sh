#!/usr/bin/env bash
# The first command of a session on a machine with a GPU, nvcc and torch (docs/cuda.md,
# "On a GPU"). Its steps, in this order, each with a time cap (STEPS below):
#   env        GPU, driver, torch, nvcc, compute-sanitizer; wheels carried in .whl/ installed
#   build      palfast in place for the local GPU (ptxas registers and spills per kernel)
#   memcheck, racecheck, synccheck, initcheck
#              compute-sanitizer over `tools/gpu_bench.py workload`: every CUDA kernel
#              path (FA2-style and shared-memory tiles, symmetric, row-block and online
#              backward, every dtype, odd D, partial tiles) and the graph ops
#   tests      the curated CUDA tests of tools/gpu_tests.txt (each kernel path and
#              awkward size once)
#   bench      `palfast bench --only info_nce`: effective TFLOP/s vs eager PyTorch,
#              torch.compile and Inf-CL, kernel grids, the speed targets; it gets
#              whatever time is left, and its JSON is rewritten after every case
# The checks come first and the benchmark last: a run cut short loses benchmark cases,
# not a sanitizer. The whole run ends within --total-s seconds (default 540); a failing
# step is reported and the next one still runs. Each step prints its verdict (PASS,
# FAIL or SKIPPED, with its seconds) as it ends, and $OUT/steps.json is rewritten at the
# start and the end of every step, so a run cut off by the machine's time limit still
# leaves what it did. The exit status is non-zero if any step failed or ran out of time.
#
#   tools/gpu_session.sh            # on the GPU machine (docs/cuda.md, "On a GPU")
#   tools/gpu_session.sh --dry-run  # the same steps on the CPU (CI runs this): the build
#                                   # is configured only, GPU-only parts say SKIPPED
#   tools/gpu_session.sh --total-s 300  # a shorter (or longer) time limit for the whole run
#   tools/gpu_session.sh --steps memcheck,tests  # only these steps (after env)
#   tools/gpu_session.sh --plan     # the steps, their caps and the tools found; runs nothing
# OUT=dir sets where the results go (default build/gpu_session): steps.json, a log per
# step and the benchmark's JSON, 10 files, few enough to copy back in one go.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
PLAN=0
ONLY=""
TOTAL_S=540          # default limit of the whole run: 9 minutes, each step capped inside it
while (( $# )); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --plan) PLAN=1 ;;
    --total-s)
      [[ "${2:-}" =~ ^[0-9]+$ ]] && (( $2 >= 60 )) || {
        echo "$0: --total-s needs a whole number of seconds >= 60, got '${2:-}'" >&2; exit 2; }
      TOTAL_S=$2; shift ;;
    --steps)
      [[ "${2:-}" =~ ^[a-z,]+$ ]] || {
        echo "$0: --steps needs step names separated by commas (see --plan), got '${2:-}'" >&2; exit 2; }
      ONLY=",$2,"; shift ;;
    *) echo "usage: $0 [--dry-run] [--plan] [--total-s SECONDS] [--steps NAME,...]" >&2; exit 2 ;;
  esac
  shift
done

# The steps in order, NAME:CAP_S. A step gets the smaller of its cap and the time left.
# The caps of the checks (env .. tests) add up to 15 + 200 + 4 × 45 + 50 = 445 s; with
# SAFETY_S = 15 kept back for the summary, 540 − 15 − 445 = 80 s are left for the
# benchmark even if every check takes its whole cap (more when they finish early: env
# takes about 5 s).
#   build 200: the files compile side by side, so the build takes about as long as the
#     largest one, info_nce_backward.cu, for one architecture (docs/cuda.md, "Which
#     torch the in-place build supports", has what is measured);
#   sanitizers 45 each: importing torch under compute-sanitizer takes about 20 s, the
#     workload (tools/gpu_bench.py, WORKLOAD_SHAPES) is sized to run within the rest;
#   tests 50: tools/gpu_tests.txt, 93 cases sized for about 40 s, plus pytest's start.
STEPS=(env:15 build:200 memcheck:45 racecheck:45 synccheck:45 initcheck:45 tests:50 bench:0)
SAFETY_S=15          # kept back for the summary at the end
if [ -n "$ONLY" ]; then
  for want in ${ONLY//,/ }; do
    [[ " ${STEPS[*]} " == *" $want:"* ]] || {
      echo "$0: --steps: no step '$want'; the steps are: ${STEPS[*]%%:*}" >&2; exit 2; }
  done
fi
BENCH_MIN_S=60       # the benchmark's least useful time: its first bf16 case (docs/cuda.md)

OUT="${OUT:-build/gpu_session}"
PY="${PYTHON:-python3}"
JOBS=$(nproc)
# Wheels a GPU machine lacks (Inf-CL), carried in .whl/ (docs/cuda.md), go here.
SITE="$PWD/build/gpu_session_site"
# The benchmark writes JSON + CSV here; the JSON alone is copied into $OUT.
BENCH_DIR="$PWD/build/gpu_session_bench"
START=$(date +%s)
FAILED=()
RECORDS=()           # one JSON object per step, in order, for steps.json
SUMMARY=()           # one line per step, for the summary at the end

remaining() { echo $(( TOTAL_S - SAFETY_S - ($(date +%s) - START) )); }

HAVE_GPU=0
if (( ! DRY_RUN && ! PLAN )) && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  HAVE_GPU=1
fi
DEVICE=cpu; (( HAVE_GPU )) && DEVICE=cuda
# A step that has nothing to do without a GPU says so and exits SKIP_RC (automake's
# code for a skipped test); step() reports it as SKIPPED, not as a failure.
SKIP_RC=77
no_gpu() { echo "skipped: no GPU ($*)"; }

# The toolkit's own nvcc (a wrapper elsewhere on PATH would mislead torch's CMake config).
find_nvcc() {
  local c
  for c in "${CUDACXX:-}" "${CUDA_HOME:-/nonexistent}/bin/nvcc" /usr/local/cuda/bin/nvcc \
           "$(command -v nvcc 2>/dev/null)"; do
    [ -n "$c" ] && [ -x "$c" ] && { readlink -f "$c"; return; }
  done
}

# compute-sanitizer: on PATH, else where a toolkit keeps it (bin/, or its own folder
# beside bin/) next to the nvcc find_nvcc picks, in CUDA_HOME, or in /usr/local/cuda.
find_sanitizer() {
  local c roots=() nvcc root
  c=$(command -v compute-sanitizer 2>/dev/null) && [ -n "$c" ] && { echo "$c"; return; }
  nvcc=$(find_nvcc)
  [ -n "$nvcc" ] && roots+=("$(dirname "$(dirname "$nvcc")")")
  [ -n "${CUDA_HOME:-}" ] && roots+=("$CUDA_HOME")
  roots+=(/usr/local/cuda)
  for root in "${roots[@]}"; do
    for c in "$root/bin/compute-sanitizer" "$root/compute-sanitizer/compute-sanitizer"; do
      [ -x "$c" ] && { echo "$c"; return; }
    done
  done
}

if (( PLAN )); then
  echo "total ${TOTAL_S} s, ${SAFETY_S} s kept for the summary"
  for s in "${STEPS[@]}"; do
    name=${s%%:*} cap=${s##*:}
    (( cap == 0 )) && cap="what is left"
    echo "step $name cap $cap"
  done
  echo "nvcc: $(find_nvcc)"
  echo "compute-sanitizer: $(find_sanitizer)"
  exit 0
fi

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
# What an earlier run left here (only the files this script writes).
rm -rf "$BENCH_DIR" "$OUT"/bench_*.json "$OUT/steps.json"
for s in "${STEPS[@]}"; do rm -f "$OUT/${s%%:*}.log"; done

json_str() { local s=${1//\\/\\\\}; s=${s//\"/\\\"}; printf '"%s"' "$s"; }

# $OUT/steps.json: every step recorded so far (a running one as RUNNING), rewritten
# whole and renamed into place, so a reader never sees half a file.
write_steps() {
  local tmp="$OUT/.steps.json.tmp" i sep=""
  {
    printf '{"total_s": %d, "elapsed_s": %d, "dry_run": %s, "gpu": %s, "steps": [' \
      "$TOTAL_S" $(( $(date +%s) - START )) "$( (( DRY_RUN )) && echo true || echo false)" \
      "$( (( HAVE_GPU )) && echo true || echo false)"
    for i in "${RECORDS[@]}" "$@"; do printf '%s\n  %s' "$sep" "$i"; sep=","; done
    printf '\n]}\n'
  } > "$tmp" && mv "$tmp" "$OUT/steps.json"
}

record() {  # NAME VERDICT SECONDS CAP NOTE
  printf '{"name": %s, "verdict": %s, "seconds": %d, "cap_s": %d, "log": %s, "note": %s}' \
    "$(json_str "$1")" "$(json_str "$2")" "$3" "$4" "$(json_str "$1.log")" "$(json_str "$5")"
}

# step NAME CAP_S COMMAND...: runs COMMAND with the smaller of CAP_S and the time left
# (CAP_S 0: all of it), output to the terminal and $OUT/NAME.log, then prints and
# records its verdict.
step() {
  local name=$1 cap=$2; shift 2
  if [ -n "$ONLY" ] && [ "$name" != env ] && [[ "$ONLY" != *",$name,"* ]]; then return; fi
  local left; left=$(remaining)
  (( cap == 0 || cap > left )) && cap=$left
  echo "=== $name (cap ${cap} s, $(( $(date +%s) - START )) s into the run) ==="
  if (( cap <= 0 )) || { [ "$name" = bench ] && (( cap < BENCH_MIN_S )); }; then
    echo "--- $name: SKIPPED (out of time: ${left} s left)"
    FAILED+=("$name (no time left)")
    SUMMARY+=("$(printf '%-10s SKIPPED  out of time' "$name")")
    RECORDS+=("$(record "$name" SKIPPED 0 "$cap" "out of time")"); write_steps
    return
  fi
  write_steps "$(record "$name" RUNNING 0 "$cap" "")"
  local t0 rc verdict note=""
  t0=$(date +%s)
  # The steps are shell functions: timeout runs them in a child bash (export -f below).
  timeout --kill-after=5 "$cap" bash -c '"$@"' step "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  local secs=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then verdict=PASS
  elif (( rc == SKIP_RC )); then verdict=SKIPPED; note=$(grep -m1 '^skipped: ' "$OUT/$name.log" || true)
  elif (( rc == 124 || rc == 137 )); then verdict=FAIL; note="timed out after ${cap} s"
  else verdict=FAIL; note="exit $rc"; fi
  [ "$verdict" = FAIL ] && FAILED+=("$name ($note)")
  echo "--- $name: $verdict in ${secs} s${note:+ ($note)}"
  SUMMARY+=("$(printf '%-10s %-8s %4d s of %4d s  %s' "$name" "$verdict" "$secs" "$cap" "$note")")
  RECORDS+=("$(record "$name" "$verdict" "$secs" "$cap" "$note")"); write_steps
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
  local n; n=$(find_nvcc)
  echo "nvcc: ${n:-not found}"
  [ -n "$n" ] && "$n" --version | tail -1
  local cs; cs=$(find_sanitizer)
  echo "compute-sanitizer: ${cs:-not found (PATH, beside nvcc, CUDA_HOME, /usr/local/cuda)}"
  echo "cores: $(nproc)"
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

# -P: the installed palfast in a dry run, not the source tree in the current folder.
sanitize() {
  local tool=$1
  if (( HAVE_GPU )); then
    local cs; cs=$(find_sanitizer)
    [ -n "$cs" ] || { echo "compute-sanitizer not found (PATH, beside nvcc, CUDA_HOME, /usr/local/cuda)"; return 1; }
    # Caching allocator off: memcheck and initcheck then see each tensor's real bounds.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 pyenv "$cs" --tool "$tool" --error-exitcode 1 \
      "$PY" -P tools/gpu_bench.py workload --device cuda
  elif [ "$tool" = memcheck ]; then
    no_gpu "compute-sanitizer --tool $tool; the workload runs on the CPU once, here"
    pyenv "$PY" -P tools/gpu_bench.py workload --device cpu || return
    return "$SKIP_RC"
  else
    no_gpu "compute-sanitizer --tool $tool; the workload ran on the CPU under memcheck"
    return "$SKIP_RC"
  fi
}

tests() {
  if (( HAVE_GPU )); then
    pyenv "$PY" -P tools/gpu_bench.py tests
  else
    no_gpu "CUDA tests; their ids are collected instead"
    pyenv "$PY" -P tools/gpu_bench.py tests --collect-only || return
    return "$SKIP_RC"
  fi
}

bench() {
  if (( HAVE_GPU )); then
    pyenv "$PY" -P -m palfast.cli bench --device cuda --only info_nce --repeats 10 --min-time 0.3 \
      --out "$BENCH_DIR"
  else
    no_gpu "benchmark at N=4096..65536 on CUDA; one small CPU case instead"
    pyenv "$PY" -P -m palfast.cli bench --device cpu --only info_nce --quick --filter "N=1024" \
      --repeats 1 --no-memory --out "$BENCH_DIR"
  fi
  local f
  for f in "$BENCH_DIR"/bench_*.json; do [ -f "$f" ] && cp "$f" "$OUT/"; done
  return 0
}

export DRY_RUN HAVE_GPU DEVICE OUT PY JOBS SITE BENCH_DIR SKIP_RC
export -f find_nvcc find_sanitizer no_gpu pyenv install_wheels env_info build sanitize tests bench
echo "gpu_session: dry_run=$DRY_RUN gpu=$HAVE_GPU out=$OUT total=${TOTAL_S} s"
for s in "${STEPS[@]}"; do
  name=${s%%:*} cap=${s##*:}
  case "$name" in
    env) step env "$cap" env_info ;;
    build) step build "$cap" build ;;
    memcheck|racecheck|synccheck|initcheck) step "$name" "$cap" sanitize "$name" ;;
    tests) step tests "$cap" tests ;;
    bench) step bench "$cap" bench ;;
  esac
done

echo "=== summary ($(( $(date +%s) - START )) s) ==="
# The benchmark's JSON again: a bench step cut off by its cap copied nothing.
for f in "$BENCH_DIR"/bench_*.json; do [ -f "$f" ] && cp "$f" "$OUT/"; done
if [ -z "$ONLY" ] || [[ "$ONLY" == *",bench,"* ]]; then
  pyenv "$PY" -P tools/gpu_bench.py table --out "$BENCH_DIR" || FAILED+=("bench (no results)")
fi
printf '%s\n' "${SUMMARY[@]}"
write_steps
if (( ${#FAILED[@]} )); then printf 'FAILED: %s\n' "${FAILED[@]}"; exit 1; fi
echo "all steps passed or were skipped for want of a GPU"
