"""Wanda (Sun et al., *A Simple and Effective Pruning Approach for LLMs*, ICLR 2024).

Each weight scores |W_ij| · ‖X_j‖₂, its magnitude times the norm of its input channel over the
calibration tokens; the lowest scores of every output row are pruned (or of every M weights, for
N:M). No weight update. Through the shared layer-wise loop (`compressor.layerwise`): each decoder
block is pruned on inputs that went through the already-pruned blocks before it, and each group of
Linears inside a block (q/k/v, o, gate/up, down) on inputs through the already-pruned groups before
it. With ``allocation: owl`` the blocks' sparsities follow their outlier ratios (OWL).

Sample recipe::

    calibration: {samples: 64, seqlen: 512}
    passes:
      - wanda: {sparsity: 0.5}
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..layerwise import layerwise
from .base import Context, register_pass
from .pruning import PruneConfig, swap_in_sparse

__all__ = ["WandaConfig", "wanda_score"]


def wanda_score(W: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """|W| · ‖X_j‖ (W is (N, K), input_norm (K,))."""
    return W.abs().float() * input_norm.float().unsqueeze(0)


@register_pass("wanda")
@dataclass(frozen=True)
class WandaConfig(PruneConfig):
    """Wanda pruning: ``sparsity`` in [0, 0.9] or ``pattern: "N:M"``; see `PruneConfig`."""
    needs_calibration = True
    streams = True

    @torch.no_grad()
    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        targets = self.modules(model)
        score = lambda lin, norm: wanda_score(lin.weight.data, norm)  # noqa: E731
        sparsity = self.block_sparsities(model, ctx, targets, score, with_inputs=True)
        for blk in layerwise(model, ctx.calibration(), targets, ctx, f"wanda {self.pattern or self.sparsity}",
                             commit=True):
            masks = {}
            for grp in blk.groups:
                t0 = time.perf_counter()
                norm = blk.input_stats(grp).norm
                for name in grp:
                    lin = blk.linears[name]
                    m = self.mask(score(lin, norm), sparsity[blk.full_name(name)])
                    lin.weight.data = (lin.weight.data * m).half().to(lin.weight.dtype)   # as it will be stored
                    masks[name] = (lin, m, (time.perf_counter() - t0) / len(grp))
            blk.advance()
            for name, (lin, m, sec) in masks.items():
                swap_in_sparse(model, blk.full_name(name), lin, m, self, ctx, seconds=round(sec, 4))
        return model
