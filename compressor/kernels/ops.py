"""`compressor::int4_linear` and `compressor::int8_linear`: group-wise dequant-matmul custom ops.

Both compute ``y = x @ W.T + bias`` with ``W[n, k] = (q[n, k] - zero[n, g]) * scale[n, g]`` and
``g = k // group_size`` (the affine grid of `compressor.quant.primitives`), reading the packed
codes in the kernel layout built by `compressor.kernels.repack`. Schema (same for both)::

    (Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? perm, Tensor? bias,
     int group_size, int out_features) -> Tensor

With K = in_features, N = out_features, P = 32 / bits, T = `TILE_N` (32), Nt = ceil(N / T),
G = K / group_size (1 for ``group_size=-1``, per-channel):

* ``x``: float32 or bfloat16 ``(..., K)``, any leading shape; the output has x's dtype and
  shape ``(..., N)``.
* ``qweight``: int32 ``(Nt, K / P, T)``; word ``[t, w, c]`` holds codes of input channels
  ``P*w .. P*w+P-1`` of output column ``T*t + c``, code ``j`` in bits ``[bits*j, bits*(j+1))``.
* ``scales``: float16 ``(Nt, G, T)``; columns past N have scale 0.
* ``zeros``: float16 ``(Nt, G, T)`` holding integers, or None for symmetric (zero ``2**(bits-1)``).
* ``perm``: int64 ``(K,)`` or None. Act-order checkpoints have their input channels sorted by
  group at repack time; the op gathers ``x[..., perm]`` so the packed order is contiguous per group.
* ``bias``: ``(N,)`` or None, added in the output dtype.

Constraints: K a multiple of P; group_size -1 or a multiple of P dividing K. N is free (the op
pads to whole tiles), unlike the GPTQ checkpoint layout, which needs N a multiple of 32 / bits.

``compressor::f16_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor`` is the float layer
left in a quantized model (the tied lm_head, which the checkpoint stores in fp16): ``weight`` fp16
``(N, K)``, x float32 or bfloat16, fp32 accumulation, so it equals ``F.linear`` with the weight
widened to fp32 while reading half the bytes.

The pure-PyTorch `reference` below is registered for every device; the compiled extension
`compressor._C` (csrc/cpu/) overrides it on CPU unless ``COMPRESSOR_NO_EXT=1``. The same
`reference` is the test oracle.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util

import torch
import torch.nn.functional as F

from .layer import define as _define_layer

__all__ = ["TILE_N", "OPS", "reference", "int8_activation_reference", "int8_activations", "quantize_activations",
           "activation_block",
           "f16_reference", "extension", "extension_source", "cuda_extension",
           "cuda_extension_source", "unpack_weight", "layout_codes"]

TILE_N = 32  # output columns per tile; must match kTileN in csrc/cpu/kernels.h

_SCHEMA = ("(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? perm, Tensor? bias, "
           "int group_size, int out_features) -> Tensor")
_BITS = {"int4_linear": 4, "int8_linear": 8}


def layout_codes(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                 out_features: int, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scale, zero) read back from the kernel layout, exactly, for output rows `rows` (a LongTensor;
    default all `out_features`), input channels in packed (possibly permuted) order: q int32 (n, K),
    scale and zero float32 (n, G). The one reader of the layout: `unpack_weight`, `QuantLinear.codes`
    of a released layer and `TiedQuantEmbedding`'s row gather use it."""
    nt, kw, t = qweight.shape
    per = 32 // bits
    if rows is None:
        cut = lambda a: a.permute(0, 2, 1).reshape(nt * t, a.shape[1])[:out_features]  # noqa: E731
    else:
        tile, lane = torch.div(rows, t, rounding_mode="floor"), rows % t
        cut = lambda a: a[tile, :, lane]  # noqa: E731
    words = cut(qweight)                                                      # (n, K / P)
    shifts = torch.arange(per, dtype=torch.int32, device=qweight.device) * bits
    q = ((words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(words.shape[0], kw * per)
    scale = cut(scales).float()
    zero = cut(zeros).float() if zeros is not None else torch.full_like(scale, float(2 ** (bits - 1)))
    return q, scale, zero


def unpack_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                  group_size: int, out_features: int) -> torch.Tensor:
    """Kernel layout -> (N, K) float32 weight in packed (possibly permuted) channel order."""
    q, s, z = layout_codes(qweight, scales, zeros, bits, out_features)
    n, k = q.shape
    g = s.shape[1]
    w = (q.float().view(n, g, k // g) - z.unsqueeze(-1)) * s.unsqueeze(-1)  # (N, G, group)
    return w.reshape(n, k)


def reference(x, qweight, scales, zeros, perm, bias, group_size, out_features, *, bits):
    """Plain PyTorch: dequantize to float32, round to x's dtype, then ``F.linear``."""
    w = unpack_weight(qweight, scales, zeros, bits, group_size, out_features)
    if perm is not None:
        x = x.index_select(-1, perm)
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def activation_block(group_size: int, in_features: int, bits: int) -> int:
    """Channels per activation block of the CPU decode kernels (``block`` in csrc/cpu/ops.cpp): the
    largest multiple of 32 / bits that is at most 256 and divides the group."""
    per = 32 // bits
    group = in_features if group_size == -1 else group_size
    block = min(group, 256) // per * per
    while group % block:
        block -= per
    return block


def quantize_activations(x: torch.Tensor, block: int, perm: torch.Tensor | None = None) -> torch.Tensor:
    """x as the CPU batch-decode kernels see it (PrepX1Fn in csrc/cpu/kernels.h), in fp32: per row and
    block of ``block`` channels (after the act-order gather ``perm``), ``d * round(x * (127 / amax))``
    with ``d = amax / 127``. A block with a NaN or infinity becomes NaN."""
    x = x.float()
    if perm is not None:
        x = x.index_select(-1, perm)
    xb = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    amax = xb.abs().amax(-1, keepdim=True)
    finite = torch.isfinite(xb).all(-1, keepdim=True)
    # torch.full_like(..) / amax, not 127.0 / amax: Tensor.__rtruediv__ is reciprocal() * 127, which can
    # differ from the correctly rounded quotient the kernel uses in the last bit (and flip a tie).
    inv = torch.where((amax > 0) & finite, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv)
    out = q * (amax / 127.0)
    return torch.where(finite, out, torch.full_like(out, float("nan"))).reshape(x.shape)


def int8_activation_reference(x, qweight, scales, zeros, perm, bias, group_size, out_features, *, bits):
    """The oracle of the batch-decode kernels (KernelSet::batch: 2-31 rows on AVX-512 VNNI, inside
    `int8_activations`), which take their activations as int8 per block: `reference` on
    `quantize_activations` of x, in fp32."""
    xq = quantize_activations(x, activation_block(group_size, x.shape[-1], bits), perm)
    return reference(xq, qweight, scales, zeros, None, bias, group_size, out_features, bits=bits)


def f16_reference(x, weight, bias):
    """`compressor::f16_linear` in plain PyTorch: widen the fp16 weight to fp32 (exact), ``F.linear``."""
    y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return y.to(x.dtype)


def _f16_fake(x, weight, bias):
    torch._check(x.shape[-1] == weight.shape[1],
                 lambda: f"x.shape[-1]={x.shape[-1]} does not match weight {tuple(weight.shape)}")
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _fake(x, qweight, scales, zeros, perm, bias, group_size, out_features, *, bits):
    torch._check(x.shape[-1] == qweight.shape[1] * (32 // bits),
                 lambda: f"x.shape[-1]={x.shape[-1]} does not match {bits}-bit qweight {tuple(qweight.shape)}")
    return x.new_empty(*x.shape[:-1], out_features)


def _load_extension():
    """(module, where it came from) or (None, why not), from `build.load_extension`.

    Called after the schemas and references below are registered, so the extension's CPU kernels
    override them; see `compressor.kernels.build` for the order (COMPRESSOR_NO_EXT=1, then
    `compressor._C`, then the sources compiled on first use and cached).
    """
    from .build import load_extension
    return load_extension()


_lib = torch.library.Library("compressor", "FRAGMENT")
for _name, _bits in _BITS.items():
    _lib.define(_name + _SCHEMA)
    torch.library.register_fake(f"compressor::{_name}", functools.partial(_fake, bits=_bits), lib=_lib)

_lib.define("f16_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
torch.library.register_fake("compressor::f16_linear", _f16_fake, lib=_lib)

# The references serve every device (CompositeExplicitAutograd: CPU, CUDA, ...). A compiled
# extension registers kernels for its own dispatch key (compressor._C: CPU), which take precedence
# there; every other device keeps the reference until it has kernels of its own.
for _name, _bits in _BITS.items():
    _lib.impl(_name, functools.partial(reference, bits=_bits), "CompositeExplicitAutograd")
_lib.impl("f16_linear", f16_reference, "CompositeExplicitAutograd")
_define_layer(_lib)          # compressor::llama_layer (compressor.kernels.layer)

extension, extension_source = _load_extension()


@contextlib.contextmanager
def int8_activations(enabled: bool = True):
    """Within the block, CPU kernel calls of 2-31 rows made on this thread round their activations to
    int8 per block (`quantize_activations` above; csrc/cpu/kernels.h, BatchGemv) where the kernel set has
    that path (AVX-512 VNNI): one ``vpdpbusd`` per 64 products instead of three, ~3x the speed of the
    exact kernel at 2-16 rows, at ~36 dB of output SQNR. Batch 1 and >= 32 rows stay exact, and so does
    every call outside the block. `compressor.nn.decoder.FastDecoder` uses it for its batched
    single-token steps. Yields whether calls of a few rows now take int8 activations."""
    if extension is None:
        yield False
        return
    prev = extension._set_int8_activations(bool(enabled))
    try:
        yield bool(enabled) and extension.int8_supported()
    finally:
        extension._set_int8_activations(prev)


def _triton_impl(x, qweight, scales, zeros, perm, bias, group_size, out_features, *, bits):
    """The CUDA kernel of the ops when the CUDA extension is not built: the Triton kernels."""
    from .repack import PackedWeight
    from .triton_gptq import triton_linear
    packed = PackedWeight(bits, qweight, scales, zeros, perm, group_size, x.shape[-1], out_features)
    return triton_linear(x, packed, bias)


def _register_cuda():
    """(extension, where it came from) or (None, why not) for the CUDA dispatch key: the CUDA extension
    (`compressor.kernels.cuda_build`), else the Triton kernels when triton is installed, else nothing (the
    reference serves CUDA tensors)."""
    from .cuda_build import load_cuda_extension
    ext, source = load_cuda_extension()
    if ext is None and torch.version.cuda is not None and importlib.util.find_spec("triton") is not None:
        for name, bits in _BITS.items():
            _lib.impl(name, functools.partial(_triton_impl, bits=bits), "CUDA")
        source += "; CUDA tensors run the Triton kernels"
    return ext, source


cuda_extension, cuda_extension_source = _register_cuda()

OPS = {4: torch.ops.compressor.int4_linear.default, 8: torch.ops.compressor.int8_linear.default}
