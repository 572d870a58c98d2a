#!/usr/bin/env bash
# Install the `llama` extra's engine, llama-cpp-python, built for this CPU without ggml's AMX path.
#
# Why not a plain `pip install llama-cpp-python`: its source build uses -march=native, and on Xeons
# with AMX, ggml's AMX matmul (ggml_backend_amx_mul_mat) crashes with SIGSEGV on the first forward
# (seen with llama-cpp-python 0.3.36 on SmolLM2, whose K = 576). This script turns -march=native
# off and enables the ISA extensions /proc/cpuinfo lists instead, AMX left out, so the build still
# uses AVX-512 VNNI/BF16 where the CPU has them and AVX2 where it has only that.
# The wheel is built once per (version, build flags, Python) into ~/.cache/compressor/wheels/ (or
# $COMPRESSOR_CACHE/wheels/) and installed from there, so a second install, or CI on the same machine,
# takes seconds instead of the ~5 minutes of the build; a different CPU gives other flags, so another wheel.
# Usage: scripts/install-llama-cpp.sh [pip install args...]   (PYTHON=... picks the interpreter)
set -euo pipefail
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
has() { [[ " $flags " == *" $1 "* ]]; }
args="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
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
py=${PYTHON:-python}
version=0.3.36
key=$(echo "$version $args $($py -c 'import sys; print(sys.implementation.cache_tag)')" | sha256sum | cut -c1-16)
wheels="${COMPRESSOR_CACHE:-$HOME/.cache/compressor}/wheels/llama-cpp-python-$version-$key"
echo "llama-cpp-python: CMAKE_ARGS=$args"
if ! compgen -G "$wheels/*.whl" >/dev/null; then
    echo "llama-cpp-python: building the wheel into $wheels (about 5 minutes on 2 cores)"
    rm -rf "$wheels.tmp"
    CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
        $py -m pip wheel -q --disable-pip-version-check --no-cache-dir --no-deps -w "$wheels.tmp" \
        "llama-cpp-python==$version"
    mv "$wheels.tmp" "$wheels"                 # complete wheels only: a killed build leaves just .tmp
fi
$py -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$@" "$wheels"/*.whl
$py -m pip install -q --disable-pip-version-check "numpy>=1.20" "typing-extensions>=4.5" "diskcache>=5.6.1" \
    "jinja2>=2.11.3"                           # its dependencies, without letting pip rebuild it
