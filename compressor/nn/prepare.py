"""`prepare_`: make a loaded compressed model ready for fast inference, in place."""
from __future__ import annotations

import torch

from .. import kernels
from .half import HalfEmbedding, HalfLinear
from .qlinear import QuantLinear

__all__ = ["prepare_", "fold_act_order_"]

# MLPs that compute down(act(gate(x)) * up(x)), elementwise between the three projections
_GATED_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "RuntimeMLP")   # RuntimeMLP: compressor.runtime


def prepare_(model: torch.nn.Module, half_lm_head: bool = True, fast_generate: bool = True,
             release: bool = False) -> torch.nn.Module:
    """Repack every `QuantLinear` now rather than on its first forward, and (`half_lm_head`) swap a
    float ``lm_head`` whose weight fp16 holds exactly (as after loading a checkpoint, which stores
    the tied embedding in fp16) for a `HalfLinear`, which reads half the bytes and gives the same
    logits up to summation order.

    `fast_generate`: where every block of a llama-architecture model is packed, ``model.generate``
    takes `compressor.nn.decoder.FastDecoder` (one C++ op per block, a static KV cache) for the
    requests it serves (greedy, rows of one length), HF's generate otherwise.

    `release`: keep only the kernel layouts (`QuantLinear.release_`) and let a tied input embedding
    read the fp16 head's rows (`HalfEmbedding`): every weight held once. The model can no longer
    be saved.

    `release` also folds each gated MLP's act-order permutation of ``down_proj`` into the output order of
    ``gate_proj`` and ``up_proj`` (`fold_act_order_`): the same model, one gather fewer per block.

    `compressor.load` calls it (with `release`) unless ``for_inference=False``. Call it before ``torch.compile`` so
    the traced graph sees the packed tensors. The result is for inference: the fp16 head has no
    weight gradient.
    """
    from ..machine import trim_heap
    for i, m in enumerate(q for q in model.modules() if isinstance(q, QuantLinear)):
        m.packed()
        if release:
            m.release_()                     # at once: the peak holds one layer twice, not the model
            if i % 8 == 7:
                trim_heap()                  # repacking's temporaries: glibc keeps freed pages otherwise
    if release:
        fold_act_order_(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if half_lm_head and isinstance(head, torch.nn.Linear) and kernels.extension is not None:
        half = HalfLinear.from_linear(head)
        if half is not None:
            emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            model.set_output_embeddings(half)
            if release and isinstance(emb, torch.nn.Embedding) and emb.weight is head.weight:
                model.set_input_embeddings(HalfEmbedding(half))
    if fast_generate and hasattr(model, "generate") and not hasattr(model.generate, "fast"):
        from .decoder import install
        install(model)
    return model


def fold_act_order_(model: torch.nn.Module) -> int:
    """In every gated MLP (``down(act(gate(x)) * up(x))``) of released `QuantLinear` layers whose ``down_proj``
    is act-order, put gate's and up's output channels in the order ``down_proj``'s kernel reads its input
    (its `PackedWeight.perm`) and drop that permutation: the product then arrives already in that order and
    the op gathers nothing. Exact (rows move whole; the same multiply-adds in the same order), but each
    projection on its own now computes a permuted output, so only for released (inference-only) layers.
    Returns how many MLPs were folded.

    Why: at batch 1 a block's act-order gathers (q/k/v, o, gate/up, down inputs) cost ~5% of a token on
    SmolLM2-135M, and down's 1536 channels are the largest of them."""
    from dataclasses import replace

    from ..kernels.repack import select_rows
    from ..machine import trim_heap
    folded = 0
    for mlp in model.modules():
        if type(mlp).__name__ not in _GATED_MLPS:
            continue
        lins = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(m, QuantLinear) and m._released and m.packed() is not None for m in lins):
            continue
        gate, up, down = lins
        order = down.packed().perm
        if order is None:
            continue
        for lin in (gate, up):
            lin.use_packed_(select_rows(lin.packed(), order))
            if lin.bias is not None:
                lin.bias = lin.bias[order.to(lin.bias.device)].contiguous()
        down.use_packed_(replace(down.packed(), perm=None))
        folded += 1
        if folded % 8 == 0:
            trim_heap()          # the layouts just replaced are free: glibc keeps their pages otherwise
    return folded
