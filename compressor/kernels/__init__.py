"""Dequant-matmul dispatch for `QuantLinear`: compiled CPU kernels with a pure-PyTorch fallback.

`quant_linear(x, module)` is what `QuantLinear.forward` calls. For a 4- or 8-bit module on CPU with
float32 or bfloat16 activations it repacks the GPTQ buffers once (`repack.pack_module`, cached in
``module._kernel_state``) and calls ``compressor::int4_linear`` / ``compressor::int8_linear``
(`ops`). Everything else (2/3-bit, other devices or dtypes, act-order with unequal groups) takes
``module.reference_forward``: dequantize, then ``F.linear``.

The ops run the C++ kernels of `compressor._C` (csrc/: AVX-512 or AVX2 chosen at run time) when
the extension imports and ``COMPRESSOR_NO_EXT`` is not ``1``; otherwise their CPU kernel is the
PyTorch reference in `ops`. Batch-1 decoding is bound by reading the weights, so the kernels stream
the 4-bit codes once per token and apply scale and zero once per group, as GPU kernels such as
Marlin (Frantar et al., 2024) do for the GPTQ format (Frantar et al., 2022). On AVX-512 VNNI the
products run on the integer dot-product unit, with the fp32 activations split into three int8
slices per block (exact to ~2^-21 of the block's largest entry, measured error <= 3e-6 relative:
not a lossy int8-activation mode), the error-free splitting of Ozaki et al. (2012) that emulates
high-precision GEMM on integer units.
"""
from __future__ import annotations

import torch

from .ops import OPS, extension, reference
from .repack import PackedWeight, pack, pack_module

__all__ = ["quant_linear", "prepare_", "pack", "pack_module", "PackedWeight", "OPS", "reference", "extension",
           "backend"]


def backend() -> str:
    """The CPU kernels the ops run on: the compiled ISA ('avx512', 'avx2', 'scalar') or the reference."""
    return f"{extension.isa()} (compiled)" if extension is not None else "pytorch reference"

_DTYPES = (torch.float32, torch.bfloat16)


class _KernelState:
    """A module's packed weight plus the buffers (and their versions) it was built from."""
    __slots__ = ("packed", "sources", "versions")

    def __init__(self, packed: PackedWeight | None, sources: tuple, versions: tuple):
        self.packed, self.sources, self.versions = packed, sources, versions


def _sources(module) -> tuple:
    return (module.qweight, module.scales, module.qzeros, module.g_idx)


def _versions(sources) -> tuple:
    # load_state_dict copies into qweight and scales alongside the rest; inference tensors have
    # no version counter, so for them only replacing the tensor is noticed.
    return tuple(-1 if t.is_inference() else t._version for t in sources[:2])


def _state(module) -> _KernelState:
    """The cached state, rebuilt when the buffers were replaced (assign=True) or written (copy_)."""
    state = module._kernel_state
    if torch.compiler.is_compiling():   # built eagerly by `prepare_` or an earlier call
        return state
    if state is not None:
        src = state.sources
        if (module.qweight is src[0] and module.scales is src[1] and module.qzeros is src[2]
                and module.g_idx is src[3] and _versions(src) == state.versions):
            return state
    packed = None
    if module.bits in OPS and module.qweight.device.type == "cpu":
        try:
            packed = pack_module(module)
        except ValueError:               # e.g. act-order with unequal groups
            packed = None
    src = _sources(module)
    state = module._kernel_state = _KernelState(packed, src, _versions(src))
    return state


def quant_linear(x: torch.Tensor, module) -> torch.Tensor:
    """``module(x)`` for a `QuantLinear`; x is (..., in_features)."""
    packed = _state(module).packed
    if packed is None or x.dtype not in _DTYPES or x.device.type != "cpu":
        return module.reference_forward(x)
    return OPS[packed.bits](x, packed.qweight, packed.scales, packed.zeros, packed.perm, module.bias,
                            packed.group_size, packed.out_features)


def prepare_(model: torch.nn.Module, half_lm_head: bool = True) -> torch.nn.Module:
    """Make `model` ready for fast inference, in place: repack every `QuantLinear` now rather than
    on its first forward, and (`half_lm_head`) swap a float ``lm_head`` whose weight fp16 holds
    exactly (as after loading a checkpoint, which stores the tied embedding in fp16) for a
    `HalfLinear`, which reads half the bytes and gives the same logits up to summation order.

    Call it before ``torch.compile`` so the traced graph sees the packed tensors. The result is
    for inference: the fp16 head has no weight gradient.
    """
    from ..nn import HalfLinear, QuantLinear
    for m in model.modules():
        if isinstance(m, QuantLinear):
            _state(m)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if half_lm_head and isinstance(head, torch.nn.Linear) and extension is not None:
        half = HalfLinear.from_linear(head)
        if half is not None:
            model.set_output_embeddings(half)
    return model
