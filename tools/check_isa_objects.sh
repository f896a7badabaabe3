#!/usr/bin/env bash
# Checks that each ISA pass of the CPU kernels uses no instruction above its ISA: no ymm/zmm register in
# the DEFAULT objects, no zmm in the AVX2 objects (a flag or an intrinsic leaking across passes would
# crash with SIGILL on a CPU without that ISA). Reads the objects of the CMake build (make test-cpp).
#
# Usage: tools/check_isa_objects.sh [cmake-build]
set -euo pipefail

BUILD="${1:-cmake-build}"
OBJ_DIR="$BUILD/CMakeFiles"
command -v objdump >/dev/null 2>&1 || { echo "check_isa_objects: skipped, toolchain missing: objdump not found"; exit 0; }
[ -d "$OBJ_DIR" ] || { echo "check_isa_objects: no CMake build in $BUILD (run make test-cpp first)" >&2; exit 2; }

status=0
check() {  # check <pass> <object dir> <forbidden register regex>
  local pass="$1" dir="$2" forbidden="$3" found=0
  shopt -s nullglob
  local objects=("$dir"/*.o)
  [ ${#objects[@]} -gt 0 ] || { echo "check_isa_objects: no objects in $dir" >&2; status=1; return; }
  for obj in "${objects[@]}"; do
    local n
    n=$(objdump -d --no-show-raw-insn "$obj" | grep -cE "$forbidden" || true)
    if [ "$n" -ne 0 ]; then
      echo "$pass pass: $(basename "$obj") has $n instructions on registers matching /$forbidden/" >&2
      found=1
    fi
  done
  [ $found -eq 0 ] && echo "$pass pass: ${#objects[@]} objects, no instruction above $pass"
  [ $found -eq 0 ] || status=1
}

check DEFAULT "$OBJ_DIR/medattn_kernels.dir/csrc/cpu" '%[yz]mm'
check DEFAULT "$OBJ_DIR/medattn_kernels.dir/csrc" '%[yz]mm'
if [ -d "$OBJ_DIR/medattn_kernels_AVX2.dir" ]; then
  check AVX2 "$OBJ_DIR/medattn_kernels_AVX2.dir/csrc/cpu" '%zmm|%k[0-7]\b'
fi
exit $status
