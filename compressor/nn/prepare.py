"""`prepare_`: make a loaded compressed model ready for fast inference, in place."""
from __future__ import annotations

import torch

from .. import kernels
from .half import HalfEmbedding, HalfLinear
from .qlinear import QuantLinear

__all__ = ["prepare_"]


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
