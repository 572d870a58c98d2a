"""``compressor::llama_layer``: one decoder block of a llama-architecture model in one op.

    llama_layer(Tensor x, Tensor(a!) k_cache, Tensor(b!) v_cache, int pos, Tensor cos, Tensor sin,
                Tensor ln1, Tensor ln2, Tensor?[] w, int[] meta, float eps, float scale) -> Tensor

computes, for ``x`` float32 ``(B, T, hidden)`` at positions ``pos .. pos+T-1`` (the same for every
row of the batch), HF's ``LlamaDecoderLayer`` (also Mistral's and Qwen2's)::

    h = x + o(attention(rope(qkv(rms_norm(x, ln1)))))      # writes k, v into the caches at pos..pos+T-1
    y = h + down(silu(gate(n)) * up(n)),  n = rms_norm(h, ln2)

* ``k_cache``, ``v_cache``: float32 or float16 (both the same) ``(B, kv_heads, S, head_dim)``, updated
  in place; attention reads positions ``< pos + T``, causally, in fp32. An fp16 cache holds the keys and
  values rounded to fp16 (half the bytes attention reads); a prompt (``pos == 0``) still attends to its
  own keys and values unrounded.
* ``cos``, ``sin``: float32 ``(>= pos + T, head_dim)``, the rotary tables of HF's rotary module
  (rotate-half convention, any rope scaling already applied).
* ``w``: 20 tensors, five per projection in the order qkv (q, k and v fused along the output),
  o, gate_up (gate then up), down: ``qweight, scales, zeros, perm, bias`` in the layout of
  `compressor.kernels.ops` (zeros, perm, bias may be None).
* ``meta``: ``bits, group_size, out_features`` of the four projections, then ``heads, kv_heads,
  head_dim``. ``eps``: the norms' epsilon; ``scale``: the attention's softmax scale.

`reference` below is the pure-PyTorch oracle, registered for every device; the CPU kernel
(csrc/cpu/layer.cpp) replaces it on CPU. `compressor.nn.decoder` drives it.

    llama_stack(Tensor x, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, int pos, Tensor cos, Tensor sin,
                Tensor[] norms, Tensor?[] w, int[] meta, float eps, float[] scales) -> Tensor

is ``llama_layer`` over n blocks in one call (block l: caches ``[l]``, norms ``[2l], [2l+1]``, w
``[20l : 20l+20]``, meta ``[15l : 15l+15]``, scale ``[l]``), each block's output the next one's input;
on CPU a decode step runs every block in one parallel region. `stack_reference` is its oracle.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["SCHEMA", "STACK_SCHEMA", "define", "reference", "stack_reference", "N_LINEARS", "PER_LINEAR"]

STACK_SCHEMA = ("llama_stack(Tensor x, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, int pos, Tensor cos, Tensor sin, "
                "Tensor[] norms, Tensor?[] w, int[] meta, float eps, float[] scales) -> Tensor")
SCHEMA = ("llama_layer(Tensor x, Tensor(a!) k_cache, Tensor(b!) v_cache, int pos, Tensor cos, Tensor sin, "
          "Tensor ln1, Tensor ln2, Tensor?[] w, int[] meta, float eps, float scale) -> Tensor")
N_LINEARS, PER_LINEAR = 4, 5


def _rms(t: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    h = t.shape[-1] // 2
    return torch.cat((-t[..., h:], t[..., :h]), dim=-1)


def reference(x, k_cache, v_cache, pos, cos, sin, ln1, ln2, w, meta, eps, scale, *, linear=None):
    """The block in plain PyTorch. `linear` (default `compressor.kernels.ops.reference`) computes each
    projection; tests pass `int8_activation_reference` where the CPU kernels take int8 activations."""
    from .ops import reference as linear_ref
    linear_ref = linear or linear_ref

    def lin(i: int, t: torch.Tensor) -> torch.Tensor:
        qw, sc, zp, perm, bias = w[PER_LINEAR * i:PER_LINEAR * (i + 1)]
        bits, group, n = meta[3 * i:3 * i + 3]
        return linear_ref(t, qw, sc, zp, perm, bias, group, n, bits=bits)

    b, t, _ = x.shape
    nh, nkv, hd = meta[12:15]
    nq, nk = nh * hd, nkv * hd
    qkv = lin(0, _rms(x, ln1, eps))
    q = qkv[..., :nq].reshape(b, t, nh, hd).transpose(1, 2)
    k = qkv[..., nq:nq + nk].reshape(b, t, nkv, hd).transpose(1, 2)
    v = qkv[..., nq + nk:].reshape(b, t, nkv, hd).transpose(1, 2)
    c, s = cos[pos:pos + t], sin[pos:pos + t]
    q, k = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
    k_cache[:, :, pos:pos + t] = k
    v_cache[:, :, pos:pos + t] = v
    length = pos + t
    kk, vv = (k, v) if pos == 0 else (k_cache[:, :, :length].float(), v_cache[:, :, :length].float())
    kk, vv = kk.repeat_interleave(nh // nkv, 1), vv.repeat_interleave(nh // nkv, 1)
    mask = torch.arange(length) <= torch.arange(pos, length).unsqueeze(1)
    attn = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale)
    h = x + lin(1, attn.transpose(1, 2).reshape(b, t, nq))
    gu = lin(2, _rms(h, ln2, eps))
    inter = gu.shape[-1] // 2
    return h + lin(3, F.silu(gu[..., :inter]) * gu[..., inter:])


def stack_reference(x, k_caches, v_caches, pos, cos, sin, norms, w, meta, eps, scales, *, linear=None):
    """`reference` block after block."""
    per_w, per_m = N_LINEARS * PER_LINEAR, 3 * N_LINEARS + 3
    for i, scale in enumerate(scales):
        x = reference(x, k_caches[i], v_caches[i], pos, cos, sin, norms[2 * i], norms[2 * i + 1],
                      w[per_w * i:per_w * (i + 1)], meta[per_m * i:per_m * (i + 1)], eps, scale, linear=linear)
    return x


def _fake(x, k_cache, v_cache, pos, cos, sin, ln1, ln2, w, meta, eps, scale):
    return torch.empty_like(x)


def _stack_fake(x, k_caches, v_caches, pos, cos, sin, norms, w, meta, eps, scales):
    return torch.empty_like(x)


def define(lib: torch.library.Library) -> None:
    """Define the ops, their fakes and references in `lib` (before the CPU extension registers its kernel)."""
    lib.define(SCHEMA)
    torch.library.register_fake("compressor::llama_layer", _fake, lib=lib)
    lib.impl("llama_layer", reference, "CompositeExplicitAutograd")
    lib.define(STACK_SCHEMA)
    torch.library.register_fake("compressor::llama_stack", _stack_fake, lib=lib)
    lib.impl("llama_stack", stack_reference, "CompositeExplicitAutograd")
