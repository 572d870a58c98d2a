"""Bit packing, including the GPTQ (auto-gptq v1) int32 checkpoint layout.

The GPTQ layout packs integer codes into int32 words as a little-endian bit stream: code ``j`` of
a run of 32 codes occupies bits ``[bits*j, bits*(j+1))`` of the 32*bits-bit block. For 2, 4 and 8
bits no code crosses a word; for 3 bits, 32 codes fill exactly 3 words and codes 10 and 21 straddle
word boundaries (this is what auto-gptq's hand-written 3-bit loop produces).

Tensors of a GPTQ ``QuantLinear`` with ``K = in_features``, ``N = out_features``, ``G = K / group``:
  * ``qweight``: int32 ``(K * bits / 32, N)``, packed along ``in_features`` (dim 0).
  * ``qzeros``:  int32 ``(G, N * bits / 32)``, packed along ``out_features`` (dim 1), storing
    ``zero - 1`` (the v1 convention; loaders add 1 back).
  * ``scales``:  fp16 ``(G, N)``.
  * ``g_idx``:   int32 ``(K,)``, the group of each input channel (``i // group`` without act-order).
"""
from __future__ import annotations

import sys

import torch

__all__ = ["pack_bits", "unpack_bits", "pack_gptq", "unpack_gptq"]


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 holding values in [0, 2**32) -> int32 with the same bit pattern."""
    x = x & 0xFFFFFFFF
    return torch.where(x >= 2 ** 31, x - 2 ** 32, x).to(torch.int32)


_LITTLE = sys.byteorder == "little"


def _pack_bytes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """4 and 8 bits on a little-endian host: the bit stream is the codes' bytes (two 4-bit codes per byte, the
    first in the low nibble) read as int32 words; uint8 work instead of int64 shifts. q: (n, ...), range-checked."""
    q = q.to(torch.uint8)
    if bits == 4:
        q = q[0::2] | (q[1::2] << 4)                # (n/2, ...) bytes
    rest = q.shape[1:]
    words = q.shape[0] // 4
    b = q.reshape(words, 4, -1).permute(0, 2, 1).reshape(-1)              # (words, cols, 4 bytes), flat
    return b.view(torch.int32).reshape(words, *rest)


def _unpack_bytes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `_pack_bytes`: int32 words (w, ...) -> uint8 codes (w * 32 / bits, ...)."""
    rest = packed.shape[1:]
    b = packed.contiguous().reshape(-1).view(torch.uint8).reshape(packed.shape[0], -1, 4)   # (words, cols, 4 bytes)
    b = b.permute(0, 2, 1).reshape(packed.shape[0] * 4, *rest)
    if bits == 8:
        return b.contiguous()
    out = torch.empty(b.shape[0] * 2, *rest, dtype=torch.uint8)
    out[0::2], out[1::2] = b & 15, b >> 4
    return out


def pack_bits(q: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack integer codes along `dim` into int32 words (GPTQ bit stream).

    Args:
        q: integer tensor with values in [0, 2**bits); its size along `dim` must be a multiple of
           32 for 3 bits and of 32 // bits otherwise (callers pad awkward shapes).
    Returns:
        int32 tensor with size ``n * bits / 32`` along `dim`.
    """
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits={bits} is not supported; use 2, 3, 4 or 8")
    q = q.movedim(dim, 0)
    n = q.shape[0]
    run = 32 if bits == 3 else 32 // bits        # codes per self-contained run of words
    if n % run:
        raise ValueError(f"cannot pack {n} codes of {bits} bits along dim {dim}: need a multiple of {run}")
    if q.numel():
        lo, hi = (int(v) for v in torch.aminmax(q))       # as ints: a uint8 255 >= 256 would wrap
        if lo < 0 or hi >= 2 ** bits:
            raise ValueError(f"codes out of range for {bits} bits: [{int(lo)}, {int(hi)}]")
    if bits in (4, 8) and _LITTLE:
        return _pack_bytes(q, bits).movedim(0, dim).contiguous()
    q = q.to(torch.int64)
    words_per_run = run * bits // 32
    q = q.reshape(n // run, run, *q.shape[1:])
    out = torch.zeros(n // run, words_per_run, *q.shape[2:], dtype=torch.int64)
    for j in range(run):
        off = bits * j
        w, s = divmod(off, 32)
        out[:, w] |= (q[:, j] << s) & 0xFFFFFFFF
        if s + bits > 32:                         # 3-bit codes straddling a word boundary
            out[:, w + 1] |= q[:, j] >> (32 - s)
    out = out.reshape(n * bits // 32, *q.shape[2:])
    return _to_int32(out).movedim(0, dim).contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Inverse of `pack_bits`: int32 words -> uint8 codes along `dim`."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits={bits} is not supported; use 2, 3, 4 or 8")
    if bits in (4, 8) and _LITTLE:
        return _unpack_bytes(packed.movedim(dim, 0).to(torch.int32), bits).movedim(0, dim).contiguous()
    p = packed.movedim(dim, 0).to(torch.int64) & 0xFFFFFFFF
    run = 32 if bits == 3 else 32 // bits
    words_per_run = run * bits // 32
    if p.shape[0] % words_per_run:
        raise ValueError(f"{p.shape[0]} words along dim {dim} is not a whole number of {bits}-bit runs")
    p = p.reshape(p.shape[0] // words_per_run, words_per_run, *p.shape[1:])
    mask = 2 ** bits - 1
    codes = []
    for j in range(run):
        w, s = divmod(bits * j, 32)
        c = p[:, w] >> s
        if s + bits > 32:
            c = c | (p[:, w + 1] << (32 - s))
        codes.append((c & mask).to(torch.uint8))     # uint8 before the stack: no (N, K) int64 temporaries
    q = torch.stack(codes, dim=1).reshape(-1, *p.shape[2:])
    return q.movedim(0, dim).contiguous()


def pack_gptq(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
              g_idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Codes and qparams in primitive layout -> GPTQ checkpoint tensors.

    Args:
        q: (N, K) uint8 codes, in the model's input-channel order.
        scale, zero: (N, G) float; zero holds integers in [1, 2**bits - 1].
        g_idx: (K,) int32 group of each input channel.
    """
    n, k = q.shape
    if zero.numel() and zero.min() < 1:
        raise ValueError("GPTQ v1 layout stores zero - 1 and cannot hold a zero point of 0")
    return {
        "qweight": torch.cat([pack_bits(q[lo:lo + 1024].t(), bits, dim=0)     # (K*bits/32, N), in column
                              for lo in range(0, max(n, 1), 1024)], dim=1),       # slices: small int64 temporaries
        "qzeros": pack_bits((zero.t().round().to(torch.int64) - 1), bits, dim=1),  # (G, N*bits/32)
        "scales": scale.t().contiguous().to(torch.float16),                     # (G, N)
        "g_idx": g_idx.to(torch.int32).contiguous(),                            # (K,)
    }


def unpack_gptq(t: dict[str, torch.Tensor], bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ tensors -> (q (N, K) uint8, scale (N, G) fp32, zero (N, G) fp32, g_idx (K,))."""
    q = unpack_bits(t["qweight"], bits, dim=0).t().contiguous()
    zero = (unpack_bits(t["qzeros"], bits, dim=1).to(torch.float32) + 1).t().contiguous()
    scale = t["scales"].to(torch.float32).t().contiguous()
    return q, scale, zero, t["g_idx"]
