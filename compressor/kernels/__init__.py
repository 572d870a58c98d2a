"""Dequant-matmul kernels, keyed by device and layout: tensors in, tensors out (no modules here).

`pack_for(device, q, scale, zero, bits, group_size, g_idx)` turns integer codes and qparams into the
`PackedWeight` layout that `device`'s kernels read (`LAYOUTS`: the CPU tile layout of `repack`
today; a CUDA layout joins it when CUDA kernels exist), or None where the device has none. A
`PackedWeight` is callable as ``packed(x, bias)`` and runs ``compressor::int4_linear`` /
``compressor::int8_linear`` (`ops`), whose pure-PyTorch reference serves every device and is the
test oracle. The modules that hold compressed weights (`compressor.nn`) call these; this package
never imports them.

On CPU the ops run the C++ kernels (csrc/cpu/: AVX-512 or AVX2 chosen at run time), built by
setup.py or compiled on first use (`build`), unless ``COMPRESSOR_NO_EXT=1``; `backend()` says which. Batch-1 decoding is bound by reading the weights, so the kernels stream
the 4-bit codes once per token and apply scale and zero once per group, as GPU kernels such as
Marlin (Frantar et al., 2024) do for the GPTQ format (Frantar et al., 2022). On AVX-512 VNNI the
products run on the integer dot-product unit, with the fp32 activations split into three int8
slices per block (exact to ~2^-21 of the block's largest entry, measured error <= 3e-6 relative:
not a lossy int8-activation mode), the error-free splitting of Ozaki et al. (2012) that emulates
high-precision GEMM on integer units. Batched decoding (`compressor.nn.decoder.FastDecoder`, 2-31 rows of
one new token each) is bound by those products instead, and opts in to one int8 slice per block
(`int8_activations`), as llama.cpp's Q8 activations are.
"""
from __future__ import annotations

from typing import Callable

import torch

from .dispatch import BACKENDS, current_backend, unavailable, use_backend
from .ops import OPS, cuda_extension, extension, int8_activations, reference
from .repack import PackedWeight, pack, pack_gptq

__all__ = ["pack_for", "pack", "pack_gptq", "PackedWeight", "LAYOUTS", "DTYPES", "OPS", "reference", "extension", "backend",
           "int8_activations",
           "cuda_extension", "BACKENDS", "current_backend", "use_backend", "unavailable"]

# device type -> activation dtypes its kernels take (others go to the caller's reference path).
DTYPES: dict[str, tuple[torch.dtype, ...]] = {"cpu": (torch.float32, torch.bfloat16),
                                              "cuda": (torch.float16, torch.bfloat16)}


def _pack_cuda(q, scale, zero, bits, group_size, g_idx=None) -> PackedWeight:
    """The CPU tile layout, built on the CPU and moved: the CUDA and Triton kernels read the same one."""
    device = q.device
    if q.shape[1] % 8:
        raise ValueError(f"in_features={q.shape[1]}: the CUDA kernels read x in runs of 8")
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    return pack(cpu(q), cpu(scale), cpu(zero), bits, group_size, cpu(g_idx)).to(device)


# device type -> function packing codes into the layout that device's kernels read.
LAYOUTS: dict[str, Callable[..., PackedWeight]] = {"cpu": pack, "cuda": _pack_cuda}


def pack_for(device: str | torch.device, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
             group_size: int, g_idx: torch.Tensor | None = None) -> PackedWeight | None:
    """`q` (N, K) codes, `scale`/`zero` (N, G), `g_idx` (K,) -> the layout `device`'s kernels read,
    or None: no layout for that device, no op for `bits`, or a shape the layout cannot take (for
    example act-order with groups of unequal size)."""
    layout = LAYOUTS.get(torch.device(device).type)
    if layout is None or bits not in OPS:
        return None
    try:
        return layout(q, scale, zero, bits, group_size, g_idx)
    except ValueError:
        return None


def backend() -> str:
    """The CPU kernels the ops run on and where they came from, e.g. ``avx512 (compiled, setup.py
    build)``, ``avx2 (compiled on first use, cached in DIR)`` or ``pytorch reference (REASON)``."""
    from .ops import extension_source
    if extension is None:
        return f"pytorch reference ({extension_source})"
    return f"{extension.isa()} ({extension_source})"
