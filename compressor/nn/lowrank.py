"""`LowRankLinear`: a Linear W (out x in) stored as two thin ones, ``y = B (A x) + bias``.

``a`` is an ``nn.Linear(in, rank, bias=False)`` (A, rank x in) and ``b`` an ``nn.Linear(rank, out)``
(B, out x rank, with the original bias). Both are plain Linears, so every later pass that takes float
Linears sees them as two layers: ``rtn``/``gptq`` quantize each factor (``lowrank -> gptq``),
``distill`` trains them, and the layer-wise loop calibrates ``b`` on the rank-r activations ``A x``.

Checkpoint format (type ``low-rank``): compression.json's ``modules`` records ``in_features``,
``out_features``, ``rank`` and ``bias``; the tensors are the factors' own, ``NAME.a.weight`` and
``NAME.b.weight`` (+ ``NAME.b.bias``), or the factor's quantized format when a later pass quantized
it (its own entry, ``NAME.a`` / ``NAME.b``, follows this one and is swapped in after it).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .formats import register_module

__all__ = ["LowRankLinear"]


@register_module("low-rank")
class LowRankLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None,
                 dtype=None):
        super().__init__()
        if not 0 < rank <= min(in_features, out_features):
            raise ValueError(f"rank={rank} must be in [1, min(in, out) = {min(in_features, out_features)}]")
        self.in_features, self.out_features, self.rank, self.has_bias = in_features, out_features, rank, bias
        self.a = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.b = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.float32) -> "LowRankLinear":
        """From A (rank x in) and B (out x rank); the factors are kept as given, in `dtype`."""
        r, k = A.shape
        n = B.shape[0]
        if B.shape[1] != r:
            raise ValueError(f"factor shapes do not chain: A {tuple(A.shape)}, B {tuple(B.shape)}")
        out = cls(k, n, r, bias=bias is not None, device="meta")
        out.a.weight = nn.Parameter(A.detach().to(dtype).contiguous(), requires_grad=False)
        out.b.weight = nn.Parameter(B.detach().to(dtype).contiguous(), requires_grad=False)
        if bias is not None:
            out.b.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))

    @property
    def weight(self) -> torch.Tensor:
        """The dense product B A (out x in) in fp32, for inspection; a quantized factor is dequantized."""
        return _dense(self.b, "b") @ _dense(self.a, "a")

    @property
    def n_params(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    def spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.has_bias}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "LowRankLinear":
        return cls(spec["in_features"], spec["out_features"], spec["rank"], bias=spec["bias"], device="meta")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _dense(factor: nn.Module, name: str) -> torch.Tensor:
    if hasattr(factor, "dequantized_weight"):                  # QuantLinear, after lowrank -> gptq / rtn
        return factor.dequantized_weight(torch.float32)
    w = getattr(factor, "weight", None)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"LowRankLinear.{name} is a {type(factor).__name__} without a float or dequantizable weight")
    return w.float()
