#!/usr/bin/env bash
# Compile-only check that the portable (DEFAULT) pass of the C++ sources builds for aarch64: no x86
# intrinsics or x86-only headers outside the AVX2/AVX512 passes (csrc/include/medattn/dispatch.h).
# Uses Debian's cross compiler (g++-aarch64-linux-gnu) against the installed torch's headers, -fsyntax-only.
#
# Usage: tools/aarch64_syntax_check.sh     (env: PYTHON=python to use, CXX_AARCH64=aarch64-linux-gnu-g++)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
CXX_AARCH64="${CXX_AARCH64:-aarch64-linux-gnu-g++}"

if ! command -v "$CXX_AARCH64" >/dev/null 2>&1; then
  echo "aarch64_syntax_check: skipped, toolchain missing: $CXX_AARCH64 not found (apt-get install g++-aarch64-linux-gnu)"
  exit 0
fi

mapfile -t TORCH_INCLUDES < <("$PYTHON" -c \
  "from torch.utils.cpp_extension import include_paths; print('\n'.join(include_paths()))")
FLAGS=(-std=c++20 -fsyntax-only -fopenmp -Wall -Wno-unused-function -I"$ROOT/csrc/include"
       -DCPU_CAPABILITY=DEFAULT -DCPU_CAPABILITY_DEFAULT)
for dir in "${TORCH_INCLUDES[@]}"; do FLAGS+=(-I"$dir"); done

status=0
for src in "$ROOT"/csrc/ops.cpp "$ROOT"/csrc/dispatch.cpp "$ROOT"/csrc/checks.cpp "$ROOT"/csrc/cpu/*.cpp; do
  if "$CXX_AARCH64" "${FLAGS[@]}" "$src"; then
    echo "aarch64 DEFAULT pass: ${src#"$ROOT"/} ok"
  else
    echo "aarch64 DEFAULT pass: ${src#"$ROOT"/} FAILED" >&2
    status=1
  fi
done
exit $status
