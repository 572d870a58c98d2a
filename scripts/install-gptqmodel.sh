#!/usr/bin/env bash
# Install GPTQModel (the `gptqmodel` engine of compressor.export.engines) into a venv of its own.
#
# Why a venv and --no-deps: gptqmodel 7.7.0 declares torch>=2.14.1, so a plain `pip install gptqmodel`
# replaces the CPU torch 2.13.0 with a multi-GB CUDA build. It imports and runs on torch 2.13 CPU
# (its torch kernels, TorchAtenLinear), so this venv sees the main environment's packages
# (--system-site-packages: torch, transformers, compressor itself) and adds gptqmodel and the small
# packages it imports (and optimum, which transformers requires to load GPTQ through it), nothing else. Use it as VENV/bin/python, e.g.
#   python benchmarks/engines.py --gptqmodel-python VENV/bin/python
#   COMPRESSOR_GPTQMODEL_PYTHON=VENV/bin/python python -m pytest tests/export
# Usage: scripts/install-gptqmodel.sh VENV   (PYTHON=... picks the base interpreter)
set -euo pipefail
venv=${1:?usage: scripts/install-gptqmodel.sh VENV}
${PYTHON:-python} -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
    "gptqmodel==7.7.0" "device-smi==0.5.7" "pypcre==0.6.4" "tokenicer==0.0.14" "logbar==0.4.15" \
    "defuser==0.0.28" dill threadpoolctl "optimum==2.3.0"   # optimum: transformers' GPTQ loader asks for it
"$venv/bin/python" -c "import gptqmodel; print('gptqmodel', gptqmodel.__version__, 'in', '$venv')"
