"""Round-to-nearest (RTN) weight-only quantization: the baseline every calibrated method must beat.

Each targeted Linear's weight is split into groups along in_features, given a scale and zero point
from its min/max (`compressor.quant.primitives.choose_qparams`), rounded, and packed in the GPTQ
layout. No data is needed.

Sample recipe::

    passes:
      - rtn: {bits: 4, group_size: 64, sym: false}
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..layerwise import blockwise, outside_blocks
from ..quant.primitives import choose_qparams, quantize
from .base import Context, register_pass
from .weight_quant import WeightQuantConfig, swap_in_quantized


@register_pass("rtn")
@dataclass(frozen=True)
class RTNConfig(WeightQuantConfig):
    """Round-to-nearest: bits in {3, 4, 8}, group_size in {-1, 32, 64, 128}, sym or asym."""

    streams = True

    @torch.no_grad()
    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        names = list(self.modules(model))
        for block_name, block in blockwise(model, ctx, f"rtn w{self.bits}g{self.group_size}"):
            for name in [n for n in names if n.startswith(block_name + ".")]:
                self._quantize(model, name, ctx)
        for name in outside_blocks(model, names):   # targets outside the blocks (an lm_head asked for)
            self._quantize(model, name, ctx)
        return model

    def _quantize(self, model: nn.Module, name: str, ctx: Context) -> None:
        t0 = time.perf_counter()
        lin = model.get_submodule(name)
        w = lin.weight.data
        scale, zero = choose_qparams(w, self.bits, self.group_size, self.sym)
        q = quantize(w, scale, zero, self.bits, self.group_size)
        swap_in_quantized(model, name, lin, q, scale, zero, self, ctx, seconds=round(time.perf_counter() - t0, 4))
