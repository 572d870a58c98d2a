"""`HalfLinear`: a float Linear whose weight is kept in fp16 and multiplied in fp32.

A quantized checkpoint stores its tied embedding in fp16, so once loaded, the fp32 ``lm_head`` holds
values that fp16 represents exactly. Batch-1 decoding reads that whole matrix for every token (113 MB
for SmolLM2's 49152 x 576 vocabulary), more than all its 4-bit layers together. `HalfLinear` keeps
the same values in half the bytes and calls ``compressor::f16_linear`` (fp32 accumulation), so its
output equals the fp32 layer's up to summation order. It is for inference: the weight is a buffer.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..kernels import ops  # noqa: F401  (registers compressor::f16_linear)

__all__ = ["HalfLinear", "HalfEmbedding"]


class HalfLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"HalfLinear needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach().to(torch.float16).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "HalfLinear | None":
        """A `HalfLinear` equal to `linear`, or None if its weight is not exactly fp16 (then nothing is lost)."""
        w = linear.weight.detach()
        if w.dtype == torch.float16 and w.device.type == "cpu":
            return cls(w, linear.bias)             # already fp16 (a checkpoint loaded for inference): shared
        if w.dtype != torch.float32 or w.device.type != "cpu":
            return None
        h = w.to(torch.float16)
        for i in range(0, w.shape[0], 4096):       # in row blocks: no fp32 copy of a 113 MB head
            if not torch.equal(h[i:i + 4096].float(), w[i:i + 4096]):
                return None
        return cls(h, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.compressor.f16_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class HalfEmbedding(nn.Module):
    """The input embedding tied to a `HalfLinear` head: rows of its fp16 weight, widened to fp32 (exact),
    so the tied matrix is held once, in fp16, instead of once per dtype."""

    def __init__(self, head: HalfLinear):
        super().__init__()
        self.num_embeddings, self.embedding_dim = head.weight.shape
        self.__dict__["head"] = head          # not a submodule: the tensor belongs to the head

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self.head.weight).float()
