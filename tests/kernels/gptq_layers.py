"""A random GPTQ-layout layer and its float weight: the shared input of the CUDA and Triton kernel tests
(imported by them, and by test_triton_gptq.py when it runs as the interpreter script)."""
from __future__ import annotations

import torch

from compressor.quant.packing import pack_gptq


def gptq_layer(n: int, k: int, bits: int, group: int, sym: bool, act: bool, seed: int):
    """(GPTQ tensors, (N, K) fp32 weight they dequantize to). `act`: a random g_idx of equal-size groups."""
    g = torch.Generator().manual_seed(seed)
    gs = k if group == -1 else group
    q = torch.randint(0, 2 ** bits, (n, k), generator=g).to(torch.uint8)
    scale = (torch.rand(n, k // gs, generator=g) * 0.02 + 0.001).half().float()
    zero = (torch.full((n, k // gs), 2.0 ** (bits - 1)) if sym
            else torch.randint(1, 2 ** bits, (n, k // gs), generator=g).float())
    g_idx = (torch.randperm(k, generator=g) // gs if act else torch.arange(k) // gs).to(torch.int32)
    t = pack_gptq(q, scale, zero, bits, g_idx)
    return t, (q.float() - zero[:, g_idx.long()]) * scale[:, g_idx.long()]
