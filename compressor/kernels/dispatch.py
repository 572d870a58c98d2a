"""Which kernel runs a `PackedWeight` call: the registered op by default, or one named per call or per scope.

    packed(x, bias)                       # "auto": compressor::int4_linear / int8_linear, the device's fastest
    packed(x, bias, backend="triton")     # one call
    with kernels.use_backend("triton"):   # every QuantLinear call in the block (per thread / task)
        model.generate(...)

Backends:
* ``auto``: the op. On CPU, the C++ kernels (csrc/cpu/) or the reference; on CUDA, the CUDA kernels (cuda/)
  when the extension is built, else the Triton kernels when triton imports, else the reference
  (`compressor.kernels.ops` registers them in that order).
* ``cuda``: the CUDA extension's kernels; ValueError when x is not on a CUDA device or the extension is not
  built.
* ``triton``: `compressor.kernels.triton_gptq.triton_linear` (needs x on a CUDA device, or
  ``TRITON_INTERPRET=1``).
* ``reference``: `compressor.kernels.ops.reference`, the pure-PyTorch oracle.

``COMPRESSOR_BACKEND`` sets the default for the process. A `torch.compile`d model keeps the backend that was
in force when it was traced.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os

import torch

__all__ = ["BACKENDS", "current_backend", "use_backend", "unavailable", "run"]

BACKENDS = ("auto", "cuda", "triton", "reference")


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: choose one of {', '.join(BACKENDS)}")
    return name


_current: contextvars.ContextVar[str] = contextvars.ContextVar("compressor_kernel_backend", default="")


def current_backend() -> str:
    """The backend of calls that name none: `use_backend`'s, else ``$COMPRESSOR_BACKEND``, else ``auto``.
    Under `torch.compile` it is read once, when the graph is traced, and the graph keeps it."""
    return _current.get() or _checked(os.environ.get("COMPRESSOR_BACKEND", "auto") or "auto")


# What ``@torch.compiler.assume_constant_result`` does, without its ``import torch._dynamo``: that import (with
# sympy and triton) is ~145 MiB of RSS and ~1 s, paid by every process that loads a model, compiling or not.
# tests/nn/test_dispatch.py checks that the decorator still comes down to this flag.
current_backend._dynamo_marked_constant = True


@contextlib.contextmanager
def use_backend(name: str):
    """Run the calls in this block (this thread or task only) on backend `name`."""
    token = _current.set(_checked(name))
    try:
        yield
    finally:
        _current.reset(token)


def unavailable(name: str, device: str | torch.device = "cuda") -> str | None:
    """Why backend `name` cannot run on `device`, or None when it can."""
    from .ops import cuda_extension, cuda_extension_source
    dev = torch.device(device).type
    if _checked(name) in ("auto", "reference"):
        return None
    if name == "cuda":
        if dev != "cuda":
            return f"the CUDA kernels run on CUDA tensors, not {dev}"
        if cuda_extension is None:
            return f"the CUDA extension is not loaded ({cuda_extension_source})"
        return None
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (`pip install 'compressor[triton]'`)"
    if dev != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"the Triton kernels run on CUDA tensors (or under TRITON_INTERPRET=1), not {dev}"
    return None


def run(packed, x: torch.Tensor, bias: torch.Tensor | None, backend: str | None) -> torch.Tensor:
    """``packed(x, bias)`` on `backend` (None: `current_backend()`)."""
    from .ops import OPS, reference
    name = _checked(backend) if backend else current_backend()
    args = packed.args(bias)
    if name == "auto":
        return OPS[packed.bits](x, *args)
    if name == "reference":
        return reference(x, *args, bits=packed.bits)
    why = unavailable(name, x.device)
    if why is not None:
        raise ValueError(f"backend={name!r} cannot run here: {why}; use backend='auto'")
    if name == "cuda":
        return OPS[packed.bits](x, *args)      # on CUDA tensors the op is the extension's kernel
    from .triton_gptq import triton_linear
    return triton_linear(x, packed, bias)
