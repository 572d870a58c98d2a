"""Magnitude pruning: zero the smallest |W| of every output row (or of every M weights, for N:M).

The baseline every calibrated pruning method must beat: no data, seconds to run. With
``allocation: owl`` or ``sensitivity`` the per-block sparsities come from the weights' own
magnitudes (OWL's magnitude variant), so it still needs no data.

Sample recipe::

    passes:
      - magnitude: {sparsity: 0.5}
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..layerwise import blockwise, outside_blocks
from .base import Context, register_pass
from .pruning import PruneConfig, swap_in_sparse


@register_pass("magnitude")
@dataclass(frozen=True)
class MagnitudeConfig(PruneConfig):
    """Prune by |W|: ``sparsity`` in [0, 0.9] or ``pattern: "N:M"``; see `PruneConfig`."""

    streams = True

    @torch.no_grad()
    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        mods = self.modules(model)
        sparsity = self.block_sparsities(model, ctx, mods, lambda lin, _: lin.weight.data.abs(), with_inputs=False)
        for block_name, _ in blockwise(model, ctx, f"magnitude {self.pattern or self.sparsity}"):
            for name in [n for n in mods if n.startswith(block_name + ".")]:
                self._prune(model, name, sparsity[name], ctx)
        for name in outside_blocks(model, mods):    # targets outside the blocks
            self._prune(model, name, sparsity[name], ctx)
        return model

    def _prune(self, model: nn.Module, name: str, sparsity: float, ctx: Context) -> None:
        t0 = time.perf_counter()
        lin = model.get_submodule(name)
        mask = self.mask(lin.weight.data.abs(), sparsity)
        swap_in_sparse(model, name, lin, mask, self, ctx, seconds=round(time.perf_counter() - t0, 4))
