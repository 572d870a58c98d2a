"""`TiedQuantEmbedding`: the input embedding of a model whose tied output head is quantized.

With tied embeddings the input embedding and the output head are one (vocab, hidden) matrix. Once
the head is a `QuantLinear` (the ``head`` pass), the embedding reads the same packed rows: a lookup
gathers the codes and qparams of the requested tokens and dequantizes just those rows, so the tie
survives and the matrix is stored once, under the head's name.

The module holds no tensors of its own: its checkpoint spec names the head (``tied_to``), and
`compressor.checkpoint.load` re-ties it after loading (`tie_`).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .formats import register_module
from .qlinear import QuantLinear

__all__ = ["TiedQuantEmbedding", "tie_quant_embeddings_"]


@register_module("gptq-tied-embedding")
class TiedQuantEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, tied_to: str):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.tied_to = num_embeddings, embedding_dim, tied_to
        self.__dict__["head"] = None          # not a submodule: its tensors belong to the head

    def spec(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "tied_to": self.tied_to}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "TiedQuantEmbedding":
        return cls(spec["num_embeddings"], spec["embedding_dim"], spec["tied_to"])

    def tie_(self, model: nn.Module) -> "TiedQuantEmbedding":
        """Point at the model's quantized head (`tied_to`); ValueError if it is not a matching QuantLinear."""
        try:
            head = model.get_submodule(self.tied_to)
        except AttributeError:
            head = None
        if not isinstance(head, QuantLinear) or (head.out_features, head.in_features) != (self.num_embeddings,
                                                                                         self.embedding_dim):
            raise ValueError(f"embedding tied to {self.tied_to!r}: that is {type(head).__name__}, not a quantized "
                             f"({self.num_embeddings}, {self.embedding_dim}) head")
        self.__dict__["head"] = head
        return self

    @property
    def weight(self) -> torch.Tensor:
        """The whole (vocab, hidden) float matrix, dequantized (for code that inspects it; large)."""
        return self._head().dequantized_weight()

    def _head(self) -> QuantLinear:
        if self.head is None:
            raise RuntimeError(f"embedding tied to {self.tied_to!r} is not tied yet (tie_(model))")
        return self.head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the head's weight, ``(q - zero) * scale``, in float32, shape ``ids.shape + (hidden,)``."""
        h = self._head()
        if h._released:
            return self._from_kernel_layout(h, ids)
        bits, per = h.bits, 32 // h.bits
        cols = ids.reshape(-1).long()
        mask = (1 << bits) - 1
        words = h.qweight.index_select(1, cols)                                     # (K / per, n)
        shifts = torch.arange(per, dtype=torch.int32).view(1, per, 1) * bits
        q = ((words.unsqueeze(1) >> shifts) & mask).reshape(-1, cols.numel())        # (K, n)
        zw = h.qzeros.index_select(1, torch.div(cols, per, rounding_mode="floor"))   # (G, n)
        zero = ((zw >> ((cols % per).to(torch.int32) * bits)) & mask) + 1            # GPTQ v1 stores zero - 1
        scale = h.scales.index_select(1, cols).float()                               # (G, n)
        g = h.g_idx.long()
        w = (q.float() - zero.float()[g]) * scale[g]                                 # (K, n)
        return w.t().contiguous().view(*ids.shape, h.in_features)

    @staticmethod
    def _from_kernel_layout(h: QuantLinear, ids: torch.Tensor) -> torch.Tensor:
        """The same rows gathered from the head's kernel layout (`compressor.kernels.ops`), when the
        GPTQ buffers were released for inference."""
        from ..kernels.ops import layout_codes
        pw = h.packed()
        k = h.in_features
        q, s, z = layout_codes(pw.qweight, pw.scales, pw.zeros, h.bits, h.out_features, rows=ids.reshape(-1).long())
        g = s.shape[1]
        w = ((q.view(-1, g, k // g).float() - z[..., None]) * s[..., None]).view(-1, k)
        if pw.perm is not None:                    # packed order -> the checkpoint's channel order
            out = torch.empty_like(w)
            out[:, pw.perm] = w
            w = out
        return w.view(*ids.shape, k)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tied_to={self.tied_to!r}"


def tie_quant_embeddings_(model: nn.Module) -> nn.Module:
    """Tie every `TiedQuantEmbedding` of `model` to its head (after loading)."""
    for m in model.modules():
        if isinstance(m, TiedQuantEmbedding):
            m.tie_(model)
    return model
