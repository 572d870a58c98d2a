"""Where the CUDA kernels (cuda/) come from: the extension setup.py built, when torch has CUDA and nvcc was found.

`load_cuda_extension()` returns (module, where it came from) or (None, why not), and never raises:
* ``COMPRESSOR_NO_EXT=1``: none;
* a torch without CUDA (the CPU build): none, and nothing to build against;
* ``import compressor._C_cuda``: built by setup.py (`setup.py` `_cuda_extension`); importing it registers
  ``compressor::int4_linear`` / ``int8_linear`` for the CUDA dispatch key (cuda/ops.cu).
Without it, CUDA tensors run the Triton kernels when triton is installed (`compressor.kernels.ops`), else the
reference.
"""
from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

import torch

__all__ = ["load_cuda_extension"]

log = logging.getLogger(__name__)


def load_cuda_extension() -> tuple[ModuleType | None, str]:
    if os.environ.get("COMPRESSOR_NO_EXT") == "1":
        return None, "disabled by COMPRESSOR_NO_EXT=1"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} has no CUDA"
    try:
        return importlib.import_module("compressor._C_cuda"), "compiled, setup.py build"
    except ModuleNotFoundError:
        return None, ("compressor._C_cuda was not built (setup.py builds it when torch has CUDA and nvcc is on "
                      "PATH: `pip install --no-build-isolation .`)")
    except (ImportError, OSError) as e:   # built against another torch or CUDA
        log.warning("compressor._C_cuda does not import (%s)", e)
        return None, f"compressor._C_cuda does not import ({e})"
