"""`SparseLinear`: a float Linear with pruned (exactly zero) weights, stored as a bitmask plus kept values.

In memory it is a plain ``nn.Linear`` (a dense weight holding the zeros), so it runs at dense
speed, every later pass that takes float Linears (rtn, gptq, lora, ...) treats it like one, and
a pass that trains it keeps its zeros through `mask`. Its kept values are fp16-exact (`from_linear`
rounds them), because that is how they are stored.

Checkpoint format (type ``sparse-bitmask``), compressed-tensors' sparse-bitmask layout
(`compressor.sparsity.pack_bitmask`): for a module ``NAME`` the file holds

    NAME.weight.bitmask      (out, ceil(in / 8)) uint8, bit j % 8 of byte j // 8 set where weight j is kept
    NAME.weight.compressed   (nnz,) float16, the kept weights in row-major order
    NAME.weight.row_offsets  (out,) int64, index in ``compressed`` of each row's first kept weight
    NAME.bias                (out,) as a dense Linear's, when there is one

and compression.json's ``modules`` records ``in_features``, ``out_features``, ``bias``, ``nnz`` and
the ``pattern`` (``"2:4"``, or null for unstructured). At 50% sparsity that is 9/16 of the fp16
dense bytes; the reload gives back exactly the same weights.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..sparsity import pack_bitmask, unpack_bitmask
from .formats import register_module

__all__ = ["SparseLinear"]

_KEYS = ("weight.bitmask", "weight.compressed", "weight.row_offsets")


@register_module("sparse-bitmask")
class SparseLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 nnz: int | None = None, pattern: str | None = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.pattern = pattern
        self._nnz = nnz                    # for an empty skeleton (load); else counted from the weight

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor | None = None,
                    pattern: str | None = None) -> "SparseLinear":
        """A SparseLinear with `linear`'s weight where `mask` is True (all of it if None), rounded to fp16."""
        out = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                  pattern=pattern)
        w = linear.weight.data
        if mask is not None:
            w = w * mask
        out.weight = nn.Parameter(w.to(torch.float16).to(w.dtype), requires_grad=linear.weight.requires_grad)
        if linear.bias is not None:
            out.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=linear.bias.requires_grad)
        return out

    @property
    def mask(self) -> torch.Tensor:
        """True where a weight is kept (nonzero)."""
        return self.weight != 0

    @property
    def nnz(self) -> int:
        return self._nnz if self.weight.is_meta else int(torch.count_nonzero(self.weight))

    def spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "nnz": self.nnz, "pattern": self.pattern}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "SparseLinear":
        return cls(spec["in_features"], spec["out_features"], bias=spec["bias"], device="meta",
                   nnz=spec["nnz"], pattern=spec.get("pattern"))

    # --- the state dict holds the compact form ---------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        n, k = self.out_features, self.in_features
        if self.weight.is_meta:
            t = (torch.empty(n, (k + 7) // 8, dtype=torch.uint8, device="meta"),
                 torch.empty(self._nnz, dtype=torch.float16, device="meta"),
                 torch.empty(n, dtype=torch.int64, device="meta"))
        else:
            bitmask, values, offsets = pack_bitmask(self.weight.detach())
            t = (bitmask, values.to(torch.float16), offsets)
        for key, v in zip(_KEYS, t):
            destination[prefix + key] = v
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        names = [prefix + k for k in _KEYS] + ([prefix + "bias"] if self.bias is not None else [])
        absent = [k for k in names if k not in state_dict]
        if absent:
            missing_keys.extend(absent)
            return
        bitmask, values, _ = (state_dict[prefix + k] for k in _KEYS)
        try:
            dense = unpack_bitmask(bitmask, values, (self.out_features, self.in_features))
        except ValueError as e:
            error_msgs.append(f"{prefix[:-1]}: {e}")
            return
        self.weight = nn.Parameter(dense, requires_grad=False)
        self._nnz = None
        if self.bias is not None:
            self.bias = nn.Parameter(state_dict[prefix + "bias"], requires_grad=False)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", pattern={self.pattern}" if self.pattern else "")
