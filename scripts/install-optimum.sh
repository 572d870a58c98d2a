#!/usr/bin/env bash
# Install optimum's ONNX Runtime models (optimum-onnx: ORTModelForCausalLM) into a venv of its own, to check
# that `compress export onnx` directories load and generate there (tests/export/test_to_onnx.py).
#
# Why a venv: optimum-onnx 0.1.0, the newest, pins transformers < 4.58 (it imports names transformers 5
# removed, e.g. modeling_utils.get_parameter_dtype), while compressor runs on transformers 5. The venv sees
# the main environment's torch and onnxruntime (--system-site-packages) and adds transformers 4.57 and the
# optimum packages, which shadow the main ones inside it only. Use it as VENV/bin/python:
#   COMPRESSOR_OPTIMUM_PYTHON=VENV/bin/python python -m pytest tests/export/test_to_onnx.py
# Usage: scripts/install-optimum.sh VENV   (PYTHON=... picks the base interpreter)
set -euo pipefail
venv=${1:?usage: scripts/install-optimum.sh VENV}
${PYTHON:-python} -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check \
    "transformers==4.57.6" "huggingface-hub<1.0" "optimum==2.1.0" "optimum-onnx==0.1.0" "onnxruntime==1.32.0"
"$venv/bin/python" -c "from optimum.onnxruntime import ORTModelForCausalLM; import transformers; \
print('optimum-onnx with transformers', transformers.__version__, 'in', '$venv')"
