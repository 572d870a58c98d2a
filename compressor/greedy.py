"""Greedy decoding over a step function, in numpy: the loop `compressor.nn.decoder.FastDecoder` (torch) and
`compressor.runtime.Runtime` (no torch) share.

HF's ``generate(do_sample=False)`` semantics for the requests the fast paths take: ``max_new_tokens``,
``min_new_tokens`` (end-of-sequence tokens masked until then), ``eos_token_id`` (one or several) and
``pad_token_id`` (rows that ended are padded until every row has; default: the first eos).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["greedy", "approximate_batches"]


def approximate_batches(rows: int) -> bool:
    """Whether a generation of `rows` rows keeps its KV cache in fp16 and runs its one-token steps with int8
    activations (both fast paths: `compressor.nn.decoder.FastDecoder`, `compressor.runtime.Runtime`): any
    batch of two or more rows, unless ``COMPRESSOR_EXACT_DECODE=1``. Batch 1 is always exact."""
    import os
    return rows > 1 and os.environ.get("COMPRESSOR_EXACT_DECODE") != "1"


def greedy(step: Callable[[np.ndarray, int], np.ndarray], ids: np.ndarray, max_new_tokens: int,
           min_new_tokens: int = 0, eos_token_id: int | list[int] | None = None,
           pad_token_id: int | None = None) -> np.ndarray:
    """(B, T + new) int64 ids. ``step(tokens (B, t), pos)`` returns the (B, vocab) logits after `tokens`,
    which sit at positions pos .. pos + t - 1 (the prompt first, at 0, then one token per row)."""
    ids = np.asarray(ids, dtype=np.int64)
    b, t = ids.shape
    eos = np.array([] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int)
                   else list(eos_token_id), dtype=np.int64)
    if pad_token_id is None and len(eos):
        pad_token_id = int(eos[0])
    out = [ids]
    done = np.zeros(b, dtype=bool)
    logits = step(ids, 0)
    for i in range(max_new_tokens):
        if i < min_new_tokens and len(eos):
            logits[:, eos] = -np.inf
        nxt = logits.argmax(-1).astype(np.int64)
        if len(eos):
            nxt = np.where(done, pad_token_id, nxt)
            done |= np.isin(nxt, eos)
        out.append(nxt[:, None])
        if len(eos) and bool(done.all()):
            break
        if i + 1 < max_new_tokens:
            logits = step(nxt[:, None], t + i)
    return np.concatenate(out, axis=1)
