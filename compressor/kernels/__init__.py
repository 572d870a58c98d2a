"""Dequant-matmul dispatch for `QuantLinear`.

Until the compiled CPU kernels land, every call takes the pure-PyTorch reference:
dequantize the packed weight, then ``F.linear``.
"""
from __future__ import annotations

import torch

__all__ = ["quant_linear"]


def quant_linear(x: torch.Tensor, module) -> torch.Tensor:
    return module.reference_forward(x)
