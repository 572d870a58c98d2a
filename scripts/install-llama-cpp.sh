#!/usr/bin/env bash
# Install the `llama` extra's engine, llama-cpp-python, built for this CPU without ggml's AMX path.
#
# Why not a plain `pip install llama-cpp-python`: its source build uses -march=native, and on Xeons
# with AMX, ggml's AMX matmul (ggml_backend_amx_mul_mat) crashes with SIGSEGV on the first forward
# (seen with llama-cpp-python 0.3.36 on SmolLM2, whose K = 576). This script turns -march=native
# off and enables the ISA extensions /proc/cpuinfo lists instead, AMX left out, so the build still
# uses AVX-512 VNNI/BF16 where the CPU has them and AVX2 where it has only that.
# Usage: scripts/install-llama-cpp.sh [pip args...]   (e.g. the python's pip: PIP="python -m pip")
set -euo pipefail
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
has() { [[ " $flags " == *" $1 "* ]]; }
args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
has avx && args+=" -DGGML_AVX=ON"
has avx2 && args+=" -DGGML_AVX2=ON"
has fma && args+=" -DGGML_FMA=ON"
has f16c && args+=" -DGGML_F16C=ON"
has bmi2 && args+=" -DGGML_BMI2=ON"
has avx_vnni && args+=" -DGGML_AVX_VNNI=ON"
has avx512f && args+=" -DGGML_AVX512=ON"
has avx512_vbmi && args+=" -DGGML_AVX512_VBMI=ON"
has avx512_vnni && args+=" -DGGML_AVX512_VNNI=ON"
has avx512_bf16 && args+=" -DGGML_AVX512_BF16=ON"
echo "llama-cpp-python: CMAKE_ARGS=$args"
CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    ${PIP:-python -m pip} install --no-cache-dir --force-reinstall --no-deps "$@" "llama-cpp-python==0.3.36"
