#!/usr/bin/env bash
# Compile-only check of the CUDA kernels: builds every csrc/cuda/*.cu to an object file with nvcc, using the same
# flags torch.utils.cpp_extension.CUDAExtension passes (its COMMON_NVCC_FLAGS, -fPIC, the extension defines and the
# torch include dirs) plus setup.py's -O3 -std=c++20 -lineinfo, for sm_90 (H100) and sm_80. Needs no GPU, and works
# against the headers of a CPU-only torch wheel, which ship the ATen/c10 CUDA headers.
#
# Usage, from the repository root:  PYTHON=.venv/bin/python bash tools/cuda_check.sh
# Env: PYTHON (default python3) must import torch; NVCC (default nvcc); CUDA_CHECK_FLAGS adds nvcc flags.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
NVCC="${NVCC:-nvcc}"

if [[ ! -d csrc/cuda ]]; then
  echo "cuda_check: run from the repository root (no csrc/cuda here: $(pwd))" >&2
  exit 2
fi
command -v "$NVCC" >/dev/null || { echo "cuda_check: $NVCC not found" >&2; exit 2; }

# One flag per line: torch's and Python's include dirs, torch's own nvcc flags and its C++ ABI define.
mapfile -t TORCH_FLAGS < <("$PYTHON" - <<'PY'
import os
import sysconfig

import torch
import torch.utils.cpp_extension as c

# System include dirs (nvcc's -isystem) rather than -I: warnings inside torch's headers are not ours to fix (recent
# torch headers use C++20 features that C++17 mode warns about), while -Werror below keeps our own code clean.
for path in c.include_paths():
    print(f"--system-include={path}")
print("--system-include=" + sysconfig.get_paths()["include"])
for flag in c.COMMON_NVCC_FLAGS:
    print(flag)
print(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
# A CPU-only wheel lacks the cmake-generated c10/cuda/impl/cuda_cmake_macros.h (it only says whether c10_cuda is a
# shared library, which matters for Windows exports alone); tell CUDAMacros.h to skip it, as the HIP build does.
if not any(os.path.exists(os.path.join(p, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for p in c.include_paths()):
    print("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
PY
)
[[ ${#TORCH_FLAGS[@]} -gt 0 ]] || { echo "cuda_check: $PYTHON could not report torch's build flags" >&2; exit 2; }

FLAGS=(
  -std=c++20 -O3 -lineinfo
  -gencode arch=compute_90,code=sm_90
  -gencode arch=compute_80,code=sm_80
  --compiler-options -fPIC,-Wall
  -Werror all-warnings  # nvcc's own diagnostics and (through -Werror) the host compiler's
  -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
  "${TORCH_FLAGS[@]}"
  -I csrc
)
# shellcheck disable=SC2206  # word splitting of the user's extra flags is intended
FLAGS+=(${CUDA_CHECK_FLAGS:-})

OUT_DIR="$(mktemp -d)"
trap 'rm -rf "$OUT_DIR"' EXIT

shopt -s nullglob
SOURCES=(csrc/cuda/*.cu)
[[ ${#SOURCES[@]} -gt 0 ]] || { echo "cuda_check: no csrc/cuda/*.cu files" >&2; exit 1; }

# The sources compile in parallel (each includes torch/extension.h for its pybind11 binding: minutes apiece).
compile_one() {
  local src=$1 obj start=$SECONDS
  obj="$OUT_DIR/$(basename "${src%.cu}").o"
  "$NVCC" "${FLAGS[@]}" -c "$src" -o "$obj" || return 1
  echo "compiled $src ($(stat -c %s "$obj") bytes, $((SECONDS - start)) s)"
}
pids=()
for src in "${SOURCES[@]}"; do
  compile_one "$src" &
  pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do
  wait "$pid" || failed=$((failed + 1))
done
[[ $failed -eq 0 ]] || { echo "cuda_check: $failed CUDA source(s) failed to compile (nvcc's errors above)" >&2; exit 1; }
version="$("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
echo "OK: ${#SOURCES[@]} CUDA source(s) compile for sm_90 and sm_80 with nvcc $version"
