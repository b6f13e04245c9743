#!/usr/bin/env bash
# Repair one palfast wheel to a manylinux tag and check what it carries.
#   bash tools/repair_wheel.sh WHEEL DEST_DIR
# Used by tools/build_wheels.sh and by cibuildwheel (pyproject.toml).
#
# palfast._C links to libtorch and, in a CUDA build, to the CUDA runtime. The
# torch wheel already installs all of them (torch/lib, nvidia/*/lib) and torch is
# imported before _C, so they are excluded, never vendored: a second copy would
# be a second libtorch / CUDA runtime in the process. auditwheel still checks
# palfast's own symbol versions against the manylinux policy and sets the tag.
set -euo pipefail

wheel=$1
dest=$2
auditwheel=${AUDITWHEEL:-auditwheel}

provided_by_torch=(
  'libtorch*.so*' 'libc10*.so*' 'libshm*.so*' 'libgomp*.so*'
  'libcuda*.so*' 'libcublas*.so*' 'libcusparse*.so*' 'libcusolver*.so*' 'libcufft*.so*'
  'libcurand*.so*' 'libcudnn*.so*' 'libnccl*.so*' 'libnvrtc*.so*' 'libnvJitLink*.so*'
  'libnvToolsExt*.so*' 'libcupti*.so*'
)
exclude_args=()
for lib in "${provided_by_torch[@]}"; do
  exclude_args+=(--exclude "$lib")
done

# Repair into an empty folder, so the one wheel in it is the one just made.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$auditwheel" repair --wheel-dir "$tmp" "${exclude_args[@]}" "$wheel"
repaired=$(echo "$tmp"/*.whl)

case "$repaired" in
  *manylinux*) ;;
  *) echo "repair_wheel: $repaired has no manylinux tag" >&2; exit 1 ;;
esac
# The only shared object in the wheel must be palfast's own extension.
extension='^palfast/_C\.[^/]*\.so$'
names=$(python3 -m zipfile -l "$repaired" | awk 'NR > 1 {print $1}')
echo "$names" | grep -qE "$extension" || { echo "repair_wheel: no palfast/_C*.so in $repaired" >&2; exit 1; }
vendored=$(echo "$names" | grep -E '\.so(\.|$)' | grep -vE "$extension" || true)
[ -z "$vendored" ] || { echo "repair_wheel: $repaired vendors libraries: $vendored" >&2; exit 1; }
"$auditwheel" show "$repaired"
mkdir -p "$dest"
mv -f "$repaired" "$dest/"
echo "repaired: $dest/$(basename "$repaired")"
