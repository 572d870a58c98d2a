"""Perplexity on a text: tokenized once, cut into non-overlapping windows of `seqlen` tokens.

Perplexity = exp(mean NLL over every predicted token), i.e. ``seqlen - 1`` predictions per window
(the standard GPTQ/llm-compressor protocol). A trailing partial window is dropped.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .calib import tokenize_file

__all__ = ["perplexity", "count_windows"]


def count_windows(n_tokens: int, seqlen: int, max_windows: int | None = None) -> int:
    n = n_tokens // seqlen
    return n if max_windows is None else min(n, max_windows)


@torch.no_grad()
def perplexity(model, tokenizer, text: str | Path | torch.Tensor, seqlen: int = 2048,
               max_windows: int | None = None, progress: bool = True, desc: str = "perplexity") -> float:
    """Perplexity of a causal LM.

    Args:
        text: a path to a text file, the text itself, or pre-tokenized ids (1-D int64).
    """
    if isinstance(text, torch.Tensor):
        ids = text
    elif isinstance(text, Path) or (isinstance(text, str) and len(text) < 4096 and Path(text).is_file()):
        ids = tokenize_file(text, tokenizer)
    else:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = count_windows(ids.numel(), seqlen, max_windows)
    if n < 1:
        raise ValueError(f"eval text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    model.eval()
    nll, count = 0.0, 0
    for i in tqdm(range(n), desc=desc, unit="window", disable=not progress, leave=False):
        x = ids[i * seqlen:(i + 1) * seqlen].unsqueeze(0)
        logits = model(x, use_cache=False).logits[0, :-1].float()
        nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        count += seqlen - 1
    return math.exp(nll / count)
