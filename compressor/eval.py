"""Perplexity on a text: tokenized once, cut into non-overlapping windows of `seqlen` tokens.

Perplexity = exp(mean NLL over every predicted token), i.e. ``seqlen - 1`` predictions per window
(the standard GPTQ/llm-compressor protocol). A trailing partial window is dropped.
`PerplexityReport` is what `compressor.compress` measures when given evaluation text: the original,
each stage, the compressed model in memory and reloaded, and the share of each loss recovered.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .calib import tokenize_file

__all__ = ["perplexity", "count_windows", "PerplexityReport", "StageRow"]


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
        nll += _window_nll(model, x)
        count += seqlen - 1
    return math.exp(nll / count)


def _window_nll(model, x: torch.Tensor, chunk: int = 512) -> float:
    """Summed NLL of x[0, 1:] given its prefixes.

    The output head runs on `chunk` positions at a time, so a 2048-token window over a 49k
    vocabulary never holds its full (seqlen x vocab) logits and their log-softmax at once.
    Models without a separable decoder and head fall back to their full logits.
    """
    decoder = getattr(model, "get_decoder", lambda: None)()
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if decoder is None or head is None or getattr(model.config, "final_logit_softcapping", None):
        logits = model(x, use_cache=False).logits[0, :-1].float()
        return F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
    h = decoder(input_ids=x, use_cache=False).last_hidden_state[0, :-1]
    scale = getattr(model.config, "logit_scale", None) or 1.0
    total = 0.0
    for i in range(0, h.shape[0], chunk):
        logits = head(h[i:i + chunk]).float() * scale
        total += F.cross_entropy(logits, x[0, 1 + i:1 + i + chunk], reduction="sum").item()
    return total


@dataclass
class StageRow:
    name: str
    ppl: float
    ratio: float                 # ppl / original ppl
    recovered_pct: float | None  # share of the previous stage's loss that this stage won back


@dataclass
class PerplexityReport:
    """Perplexity of one `compressor.compress` run: the original, each stage a pass reported
    (``nf4``, ``nf4 + lora``, ...), the compressed model in memory and reloaded from disk."""
    windows: int | None
    seqlen: int
    original: float
    stages: list[tuple[str, float]] = field(default_factory=list)
    compressed: float | None = None          # the in-memory result (checkpoints)
    reloaded: float | None = None            # the checkpoint read back with compressor.load
    reload_max_dlogit: float | None = None   # adapters: max |logit difference|, reloaded vs in memory

    @property
    def final(self) -> float:
        return self.reloaded if self.reloaded is not None else (self.stages[-1][1] if self.stages else self.original)

    @property
    def reload_gap_pct(self) -> float | None:
        if self.compressed is None or self.reloaded is None:
            return None
        return abs(self.reloaded - self.compressed) / self.compressed * 100

    def stage_rows(self) -> list[StageRow]:
        """The original, then every stage, with the share of the loss before it that it recovered:
        ``(prev - ppl) / (prev - original)`` where a stage lowers a perplexity above the original."""
        rows = [StageRow("original (fp32)", self.original, 1.0, None)]
        prev = self.original
        for name, ppl in self.stages:
            rec = (prev - ppl) / (prev - self.original) * 100 if ppl < prev and prev > self.original else None
            rows.append(StageRow(name, ppl, ppl / self.original, rec))
            prev = ppl
        return rows
