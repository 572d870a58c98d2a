"""PEQA: train only the per-group scales of an integer-quantized model, keeping its integer codes.

Kim, Lee, Kim, Park, Yoo, Kwon, Lee. "Memory-Efficient Fine-Tuning of Compressed Large Language
Models via sub-4-bit Integer Quantization", NeurIPS 2023 (arXiv:2305.14152).

A GPTQ or RTN layer stands for ``W = (q - z) * s`` per group: integer codes q (N, K), integer zero
points z and float scales s (N, G). This pass freezes q and z and trains s by distillation from the
uncompressed model (or with a causal-LM loss), on the training text. The checkpoint layout does not
change (scales stay fp16 in the GPTQ format), so it is a free recovery step after a quantize pass;
for example after re-quantizing a merged QLoRA model, where GPTQ's rounding error comes on top of
the adapter's. Each scale is trained as ``s = s0 * exp(g)`` with g starting at 0, so `lr` is a
relative step and means the same for every layer.

Costs a training run like ``lora`` does; trains N * K / group_size numbers (1.7 M for SmolLM2-135M
at g64), and needs the weight gradient of every layer.

Sample recipe::

    calibration: {samples: 64, seqlen: 512}
    passes:
      - gptq: {bits: 4, group_size: 64, sym: false, act_order: true}
      - peqa: {steps: 64, lr: 2.0e-3, batch_size: 4, seqlen: 256, teacher: original, autocast: bfloat16}
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.qlinear import QuantLinear
from .base import Context, State, register_pass, select_linears
from .training import TrainingConfig

__all__ = ["grouped_weight", "ScaleTunedLinear", "PEQAConfig", "swap_in_scale_tuned", "swap_back"]


# ------------------------------------------------------------------------------------------------
# the math: pure tensor functions
# ------------------------------------------------------------------------------------------------

def grouped_weight(d: torch.Tensor, scale: torch.Tensor, g_idx: torch.Tensor | None) -> torch.Tensor:
    """``W[:, k] = d[:, k] * scale[:, g_idx[k]]``.

    Args: d (N, K) float, the centred codes q - z[g_idx]; scale (N, G); g_idx (K,) long, or None when
    channel k is in group k // (K / G) (no act-order), which lets a reshape replace the gather.
    """
    N, K = d.shape
    if g_idx is None:
        return (d.view(N, scale.shape[1], -1) * scale.unsqueeze(-1)).view(N, K)
    return d * _ExpandGroups.apply(scale, g_idx)


class _ExpandGroups(torch.autograd.Function):
    """``scale[:, g_idx]`` whose backward sums each group's gradient with ``index_add_`` along dim 1.

    Autograd's own backward for the gather is an accumulating ``index_put_``, which on CPU cost 3.7 ms
    a layer on SmolLM2 (0.78 s of a 6.4 s bf16 PEQA step; ``index_add_`` takes 0.1 s in all)."""

    @staticmethod
    def forward(ctx, scale: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g_idx)
        ctx.groups = scale.shape[1]
        return scale[:, g_idx]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (g_idx,) = ctx.saved_tensors
        return grad.new_zeros(grad.shape[0], ctx.groups).index_add_(1, g_idx, grad), None


# ------------------------------------------------------------------------------------------------
# the module that trains, and the wiring
# ------------------------------------------------------------------------------------------------

class ScaleTunedLinear(nn.Module):
    """A `QuantLinear`'s codes with trainable scales; `to_quant_linear` packs it back.

    Buffers: ``d`` (N, K) fp32 centred codes q - z[g_idx] (exact small integers), ``scale0`` (N, G)
    the original scales; parameter ``log_gain`` (N, G), zero at the start.
    """

    def __init__(self, qlin: QuantLinear):
        super().__init__()
        q, scale, zero, g_idx = qlin.codes()
        g = g_idx.long()
        self.bits, self.group_size = qlin.bits, qlin.group_size
        self.sym, self.desc_act = qlin.is_sym(), qlin.desc_act()
        self.in_features, self.out_features = qlin.in_features, qlin.out_features
        k = q.shape[1]
        trivial = torch.equal(g, torch.arange(k) // (k // scale.shape[1]))
        self.register_buffer("q", q)
        self.register_buffer("zero", zero.float())
        self.register_buffer("g_idx", g)
        self.register_buffer("d", q.float() - zero.float()[:, g])
        self.register_buffer("scale0", scale.float())
        self.register_buffer("bias", None if qlin.bias is None else qlin.bias.detach().clone())
        self._gather = None if trivial else g
        self.log_gain = nn.Parameter(torch.zeros_like(self.scale0))

    def scale(self) -> torch.Tensor:
        return self.scale0 * torch.exp(self.log_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, grouped_weight(self.d, self.scale(), self._gather).to(x.dtype), self.bias)

    @torch.no_grad()
    def to_quant_linear(self) -> QuantLinear:
        scale = self.scale().half().float()                 # what the checkpoint stores
        return QuantLinear.from_codes(self.q, scale, self.zero, self.bits, self.group_size,
                                      g_idx=self.g_idx.to(torch.int32), bias=self.bias, sym=self.sym,
                                      desc_act=self.desc_act)


@register_pass("peqa")
@dataclass(frozen=True)
class PEQAConfig(TrainingConfig):
    """Trains the scales of the integer-quantized Linears (rtn / gptq) that match targets/ignore.

    The training fields (steps, lr, teacher, ...) are `TrainingConfig`'s; lr is relative (see the
    module docstring). Takes an integer-quantized model (checked in `check_order`).
    """
    accepts = frozenset({State.INT})
    lr: float = 2e-3
    norms: bool = False      # also train the weights of the normalization layers (norm tweaking)

    def quantized(self, model: nn.Module) -> dict[str, QuantLinear]:
        return select_linears(model, self.targets, self.ignore, kinds=(QuantLinear,))

    def __post_init__(self):
        super().__post_init__()
        self.check_bools("norms")

    @staticmethod
    def norm_weights(model: nn.Module) -> list[nn.Parameter]:
        """The (float, per-channel) weights of every normalization layer (RMSNorm, LayerNorm)."""
        return [p for m in model.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(recurse=False)]

    def check(self, model: nn.Module, ctx: Context) -> None:
        super().check(model, ctx)
        if not self.quantized(model):
            raise ValueError(f"peqa: no quantized layer matches targets={list(self.targets)} minus "
                             f"ignore={list(self.ignore)}")

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        mods = self.quantized(model)
        ctx.measure(model, " + ".join(ctx.applied))       # before training, e.g. 'nf4 + lora + gptq'
        model.requires_grad_(False)
        swapped = swap_in_scale_tuned(model, set(mods))
        params = [swapped[n].log_gain for n in mods]
        if self.norms:
            norms = self.norm_weights(model)
            for p in norms:
                p.requires_grad_(True)
            params += norms
        self.fit(model, params, ctx)
        model.requires_grad_(False)
        swap_back(model, swapped, ctx, trained=set(mods))
        return model


def swap_in_scale_tuned(model: nn.Module, trained: set[str]) -> dict[str, ScaleTunedLinear]:
    """Replace every `QuantLinear` of `model` by a `ScaleTunedLinear`; the scales of those named in
    `trained` require grad. Every one is swapped, trained or not: the packed kernels have no
    backward, and gradients must flow through all layers above the first trained one."""
    swapped = {n: ScaleTunedLinear(m) for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, m in swapped.items():
        m.log_gain.requires_grad_(name in trained)
        model.set_submodule(name, m)
    return swapped


def swap_back(model: nn.Module, swapped: dict[str, ScaleTunedLinear], ctx: Context, trained: set[str]) -> None:
    """Pack each `ScaleTunedLinear` back into a `QuantLinear`, recording how far the trained scales moved."""
    for name, m in swapped.items():
        if name in trained:
            gain = m.log_gain.detach().abs()
            ctx.record(name, peqa_mean_abs_log_gain=round(float(gain.mean()), 6),
                       peqa_max_abs_log_gain=round(float(gain.max()), 6))
        model.set_submodule(name, m.to_quant_linear())
