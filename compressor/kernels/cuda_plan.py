"""Host side of the CUDA decode GEMV (`cuda/gptq_gemv.cu`), runnable without a GPU: the launch plan,
its checks, and an emulation of what the kernel computes, in its order and precision.

The kernel reads the GPTQ checkpoint layout as stored (see the .cu file). A launch covers
``THREADS * VEC`` = 512 columns and ``K_CHUNK`` = 128 rows of K per block; ``gridDim.y`` splits K and
the blocks' fp32 partial sums meet by atomicAdd in a zeroed (M, N) buffer, cast to the activation dtype
by a second launch. Rows come in tiles of 16, 8, 4, 2, 1 (the kernel's ``M`` template).

`emulate` runs the same arithmetic on the CPU: per block, per thread's 4 columns, the k of its chunk in
order, each step one fp32 fused multiply-add on ``(q - zero) * scale`` (fp32, from the fp16 scale); the
chunks' partial sums are added in block order (on a GPU the atomic order varies, by fp32 rounding only).
Tests compare it with the dequantize-then-matmul reference, so the tiling and dequantization are checked
here, where the CUDA code cannot run.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["THREADS", "VEC", "K_CHUNK", "ROW_TILES", "Launch", "plan", "emulate"]

THREADS, VEC, K_CHUNK = 128, 4, 128
ROW_TILES = (16, 8, 4, 2, 1)
MAX_ROWS = 16                       # above this the prefill GEMM serves


@dataclass(frozen=True)
class Launch:
    rows: int                       # the kernel's M template: rows [row0, row0 + rows) of x
    row0: int
    grid: tuple[int, int]           # (column blocks, K chunks)
    block: int = THREADS


def plan(m: int, k: int, n: int, bits: int, group: int, act_order: bool) -> list[Launch]:
    """The launches of one (m, k) x (k, n) product; ValueError naming the size the layout cannot take."""
    per = 32 // bits
    if bits not in (4, 8):
        raise ValueError(f"bits={bits}: the CUDA GEMV has 4- and 8-bit kernels")
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"M={m}: the decode GEMV serves 1..{MAX_ROWS} rows; larger M goes to the prefill GEMM")
    if k % per or n % per:
        raise ValueError(f"K={k}, N={n}: both must be multiples of {per} for the {bits}-bit GPTQ layout")
    g = k if group == -1 else group
    if not act_order and k % g:
        raise ValueError(f"K={k} is not a multiple of the group size {g}")
    grid = (-(-n // (THREADS * VEC)), -(-k // K_CHUNK))
    out, row0 = [], 0
    for t in ROW_TILES:
        while m - row0 >= t:
            out.append(Launch(t, row0, grid))
            row0 += t
    return out


def _codes(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int):
    """(K, N) codes and (G, N) zero points (stored zero + 1), unpacked as the kernel shifts them."""
    per, mask = 32 // bits, (1 << bits) - 1
    shifts = torch.arange(per, dtype=torch.int64) * bits
    q = ((qweight.to(torch.int64).unsqueeze(1) >> shifts.view(1, per, 1)) & mask).reshape(-1, qweight.shape[1])
    z = ((qzeros.to(torch.int64).unsqueeze(-1) >> shifts) & mask).reshape(qzeros.shape[0], -1) + 1
    return q, z


def emulate(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
            g_idx: torch.Tensor | None, group: int, bits: int) -> torch.Tensor:
    """(M, N) fp32 sums as the kernel's launches leave them in ``out_f32`` (cast to x.dtype afterwards).

    x (M, K) fp16/bf16; qweight (K*bits/32, N) int32; qzeros (G, N*bits/32) int32; scales (G, N) fp16;
    g_idx (K,) int32 for act-order, else None (groups of `group` consecutive k)."""
    m, k = x.shape
    n = qweight.shape[1]
    launches = plan(m, k, n, bits, group, g_idx is not None)
    q, z = _codes(qweight, qzeros, bits)                                   # (K, N), (G, N)
    g = g_idx.long() if g_idx is not None else torch.arange(k) // (k if group == -1 else group)
    w = (q.float() - z.float()[g]) * scales.float()[g]                     # (K, N) fp32: (q - zero) * scale
    xf = x.float()
    out = torch.zeros(m, n, dtype=torch.float32)
    for ln in launches:
        rows = slice(ln.row0, ln.row0 + ln.rows)
        for c in range(ln.grid[1]):                                        # blockIdx.y: one K chunk
            k0, k1 = c * K_CHUNK, min(k, (c + 1) * K_CHUNK)
            acc = torch.zeros(ln.rows, n, dtype=torch.float32)
            for kk in range(k0, k1):                                       # fmaf, one k at a time
                acc = (xf[rows, kk, None].double() * w[kk].double() + acc.double()).float()
            out[rows] = out[rows] + acc                                    # atomicAdd, in block order
    return out
