#!/usr/bin/env bash
# Compile-only check of every CUDA source (csrc/cuda/*.cu) against the installed torch's headers, for
# machines without a GPU (the CPU torch wheel ships the ATen/c10 CUDA headers). Objects go to a temporary
# directory that is removed afterwards; the script exits non-zero on the first compile error.
#
# Usage: tools/nvcc_check.sh            (env: PYTHON=python to use, NVCC=nvcc, NVCC_ARCH=sm_90 or a
#                                       space-separated list "sm_80 sm_90 sm_100", NVCC_FLAGS: extra
#                                       flags, e.g. "-Xptxas -v" for the resource report of gpu_check)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
NVCC="${NVCC:-nvcc}"
ARCH="${NVCC_ARCH:-sm_90}"
read -r -a EXTRA_FLAGS <<< "${NVCC_FLAGS:-}"
ARCH_FLAGS=()
for arch in $ARCH; do ARCH_FLAGS+=(-gencode "arch=compute_${arch#sm_},code=$arch"); done

command -v "$NVCC" >/dev/null 2>&1 || { echo "nvcc_check: $NVCC not found" >&2; exit 2; }

shopt -s nullglob
SOURCES=("$ROOT"/csrc/cuda/*.cu)
if [ ${#SOURCES[@]} -eq 0 ]; then echo "nvcc_check: no csrc/cuda/*.cu sources"; exit 0; fi

# torch's include directories (include/, include/torch/csrc/api/include, ...) as -I flags.
mapfile -t TORCH_INCLUDES < <("$PYTHON" -c \
  "from torch.utils.cpp_extension import include_paths; print('\n'.join(include_paths()))")
INCLUDE_FLAGS=(-I"$ROOT/csrc/include")
for dir in "${TORCH_INCLUDES[@]}"; do INCLUDE_FLAGS+=(-I"$dir"); done
# The torch ABI flag must match the wheel for the headers' inline code to compile the same way.
ABI="$("$PYTHON" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")"

# nvcc 13 supports C++20 with a recent host compiler; fall back to C++17 when it does not.
STD=c++20
if ! echo 'int main(){}' | "$NVCC" -std=c++20 -x cu -c -o /dev/null - >/dev/null 2>&1; then STD=c++17; fi

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
# The CPU wheel ships c10/cuda headers but not the header CMake generates for a CUDA build
# (c10/cuda/impl/cuda_cmake_macros.h, one #define): supply the CUDA build's content when it is missing.
if ! "$PYTHON" - <<'PY'
import os, sys
from torch.utils.cpp_extension import include_paths
sys.exit(0 if any(os.path.exists(os.path.join(d, "c10/cuda/impl/cuda_cmake_macros.h")) for d in include_paths()) else 1)
PY
then
  mkdir -p "$OUT/include/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$OUT/include/c10/cuda/impl/cuda_cmake_macros.h"
  INCLUDE_FLAGS+=(-I"$OUT/include")
fi
status=0
for src in "${SOURCES[@]}"; do
  obj="$OUT/$(basename "${src%.cu}").o"
  echo "nvcc_check: $NVCC ($ARCH) -std=$STD -c ${src#$ROOT/}"
  if ! "$NVCC" -c "$src" -o "$obj" "${ARCH_FLAGS[@]}" -std="$STD" -O3 -Xcompiler -fPIC "${EXTRA_FLAGS[@]}" \
      -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI="$ABI" \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr "${INCLUDE_FLAGS[@]}"; then
    echo "nvcc_check: FAILED ${src#$ROOT/}" >&2
    status=1
  fi
done
[ $status -eq 0 ] && echo "nvcc_check: all ${#SOURCES[@]} CUDA source(s) compile"
exit $status
