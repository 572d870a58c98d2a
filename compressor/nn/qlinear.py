"""`QuantLinear`: a Linear whose weight is stored packed in the GPTQ int32 layout.

Buffers (K = in_features, N = out_features, G = number of groups; see `compressor.quant.packing`):
  * ``qweight`` int32 (K*bits/32, N)   * ``qzeros`` int32 (G, N*bits/32)
  * ``scales``  fp16  (G, N)           * ``g_idx``  int32 (K,)        * ``bias`` (N,) optional

The state-dict names are exactly auto-gptq's, so the saved file is a GPTQ checkpoint.
`forward` calls the ``compressor::gptq_linear`` dispatch in `compressor.kernels`, which uses the
compiled CPU kernel when present and the pure-PyTorch reference (dequantize, then ``F.linear``)
otherwise.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant.packing import pack_gptq, unpack_gptq

__all__ = ["QuantLinear"]


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 bias: bool = False, device=None, dtype=torch.float32):
        super().__init__()
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"bits={bits}: QuantLinear supports 2, 3, 4 and 8")
        g = in_features if group_size == -1 else group_size
        if in_features % g:
            raise ValueError(f"group_size={group_size} does not divide in_features={in_features}")
        run = 32 if bits == 3 else 32 // bits
        if in_features % run or out_features % run:
            raise ValueError(f"{bits}-bit GPTQ packing needs in/out features divisible by {run}, "
                             f"got ({in_features}, {out_features})")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        n_groups = in_features // g
        self.register_buffer("qweight", torch.empty(in_features * bits // 32, out_features, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.empty(n_groups, out_features * bits // 32, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.empty(n_groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32, device=device))
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self._kernel_state = None  # repacked layout built lazily by compressor.kernels

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
                   g_idx: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> "QuantLinear":
        """Build from (N, K) codes and (N, G) qparams as returned by `compressor.quant.primitives`."""
        n, k = q.shape
        g = k if group_size == -1 else group_size
        if g_idx is None:
            g_idx = torch.arange(k, dtype=torch.int32) // g
        m = cls(k, n, bits, group_size, bias=bias is not None, device="cpu",
                dtype=bias.dtype if bias is not None else torch.float32)
        for name, t in pack_gptq(q, scale, zero, bits, g_idx).items():
            getattr(m, name).copy_(t)
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q (N, K), scale (N, G), zero (N, G), g_idx (K,))."""
        return unpack_gptq({"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales,
                            "g_idx": self.g_idx}, self.bits)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """(N, K) float weight: ``(q - zero[g_idx]) * scale[g_idx]``."""
        q, scale, zero, g_idx = self.codes()
        g = g_idx.long()
        w = (q.float() - zero[:, g]) * scale[:, g]
        return w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .. import kernels
        return kernels.quant_linear(x, self)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
