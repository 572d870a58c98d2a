"""Quantize the output head (``lm_head``) by rounding to nearest; a tied input embedding reads the same rows.

On a small model the head is a large share of what every token reads: SmolLM2-135M's is 49152 x 576,
56 MB in fp16, as much as all its 4-bit decoder layers. Rounded to int8 per output channel (the
default, int8 in groups of 64, symmetric) it is half that; 4-bit g64 a quarter. With tied embeddings the input embedding becomes a
`compressor.nn.TiedQuantEmbedding` over the same packed rows (a gather with dequantization), so
the tie survives and the matrix is stored once. The ppl each choice costs is in the README.

It runs after the passes that quantize the decoder (they ignore the head), on a float or already
quantized model. Sample recipe::

    passes:
      - gptq: {bits: 4, group_size: 64}
      - head: {bits: 8, group_size: 64}   # int8 g64 symmetric (the default): +0.02% ppl on SmolLM2
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..nn.qembedding import TiedQuantEmbedding
from ..quant.primitives import choose_qparams, quantize
from .base import FLOATS, Context, State, register_pass
from .weight_quant import WeightQuantConfig, swap_in_quantized

__all__ = ["HeadConfig"]

log = logging.getLogger("compressor")


@register_pass("head")
@dataclass(frozen=True)
class HeadConfig(WeightQuantConfig):
    """Round-to-nearest on the output head: bits in {4, 8}, group_size 64 (default), 32, 128 or -1 (per channel)."""

    accepts = FLOATS | {State.INT}
    streams = True      # `compress --stream`: the head lives in the stem, read here and committed with the pass

    bits: int = 8
    group_size: int = 64
    sym: bool = True
    targets: tuple[str, ...] = (r"(^|\.)lm_head$",)
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        if self.bits not in (4, 8):
            raise ValueError(f"head.bits={self.bits!r}: the head is quantized to 8 or 4 bits (kernels run both)")

    def check(self, model: nn.Module, ctx: Context) -> None:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if type(head) is not nn.Linear:
            raise ValueError(f"head: the model's output head is {type(head).__name__}, not a float Linear "
                             f"(already quantized, or a model without a language-model head)")

    def check_shapes(self, shapes: dict[str, tuple[int, int]]) -> None:
        """Nothing to refuse: a head these settings cannot pack stays float (`unfit`, logged by `apply`), so the
        shipped 4-bit recipes run on any vocabulary."""

    def unfit(self, head: nn.Linear) -> str | None:
        """Why this head cannot be packed with these settings, or None."""
        try:
            super().check_shapes({"lm_head": (head.in_features, head.out_features)})
        except ValueError as e:
            return str(e).split("; add them")[0].split("; group sizes")[0]
        return None

    def stream_refusal(self, model: nn.Module) -> str | None:
        return None

    @torch.no_grad()
    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        if ctx.stream is not None:
            ctx.stream.load_stem()          # the embedding (and a tied head) from the source shards
        head = model.get_output_embeddings()
        name = next(n for n, m in model.named_modules() if m is head)
        why = self.unfit(head)
        if why is not None:
            log.warning("head pass skipped, the output head stays float: %s", why)
            return model
        if head.weight.is_meta and ctx.stream is not None:     # an untied head: not part of the stem
            head.weight = nn.Parameter(ctx.stream.reader.get(name + ".weight", torch.float32), requires_grad=False)
        emb = model.get_input_embeddings()
        tied = isinstance(emb, nn.Embedding) and emb.weight.data_ptr() == head.weight.data_ptr()
        t0 = time.perf_counter()
        w = head.weight.data.float()
        scale, zero = choose_qparams(w, self.bits, self.group_size, self.sym)
        q = quantize(w, scale, zero, self.bits, self.group_size)
        swap_in_quantized(model, name, head, q, scale, zero, self, ctx, seconds=round(time.perf_counter() - t0, 4),
                          tied=tied)
        if tied:
            emb_name = next(n for n, m in model.named_modules() if m is emb)
            model.set_submodule(emb_name, TiedQuantEmbedding(emb.num_embeddings, emb.embedding_dim, name).tie_(model))
            # the tie is ours now (the embedding's spec): transformers must not try to tie two float weights
            model.config.tie_word_embeddings = False
            if hasattr(model.config, "get_text_config"):
                model.config.get_text_config().tie_word_embeddings = False
        return model
