"""A random quantized layer and its float weight: the shared input of the CUDA and Triton kernel tests
(imported by them, and by test_triton_gptq.py when it runs as the interpreter script)."""
from __future__ import annotations

import torch


def packed_layer(n: int, k: int, bits: int, group: int, sym: bool, act: bool, seed: int):
    """(`PackedWeight` in the kernels' tile layout, (N, K) fp32 weight in the original channel order).

    Any N, odd too: the tile layout pads N (the GPTQ checkpoint layout cannot)."""
    from compressor.kernels import pack
    g = torch.Generator().manual_seed(seed)
    gs = k if group == -1 else group
    q = torch.randint(0, 2 ** bits, (n, k), generator=g)
    scale = (torch.rand(n, k // gs, generator=g) * 0.02 + 0.001).half().float()
    zero = (torch.full((n, k // gs), 2.0 ** (bits - 1)) if sym
            else torch.randint(1, 2 ** bits, (n, k // gs), generator=g).float())
    g_idx = (torch.randperm(k, generator=g) // gs if act else torch.arange(k) // gs).to(torch.int32)
    return pack(q, scale, zero, bits, group, g_idx), (q.float() - zero[:, g_idx.long()]) * scale[:, g_idx.long()]
