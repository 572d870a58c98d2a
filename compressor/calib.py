"""Calibration data: N windows of L tokens sampled with a seed from a text file; the default text."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import DataError

__all__ = ["tokenize_file", "calibration_windows", "default_text_file", "data_dirs", "DEFAULT_TEXT"]

DEFAULT_TEXT = "wikitext2-valid.tokens"


def data_dirs() -> list[Path]:
    """Where the shared data is looked for, in order: ``$COMPRESSOR_DATA``, then ``../shared/data``
    relative to the working directory."""
    env = [Path(os.environ["COMPRESSOR_DATA"])] if os.environ.get("COMPRESSOR_DATA") else []
    return env + [Path("..") / "shared" / "data"]


def default_text_file() -> Path | None:
    """The text used when a recipe needs calibration or training text and none is given:
    ``$COMPRESSOR_DATA/wikitext2-valid.tokens``, else ``../shared/data/wikitext2-valid.tokens``
    relative to the working directory; None if neither exists."""
    candidates = [d / DEFAULT_TEXT for d in data_dirs()]
    return next((c for c in candidates if c.is_file()), None)


def tokenize_file(path: str | Path, tokenizer) -> torch.Tensor:
    """The whole file tokenized once, as a 1-D int64 tensor."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids.to(torch.int64)


def calibration_windows(path: str | Path, tokenizer, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """(n, seqlen) int64: windows starting at seeded random offsets of the tokenized file."""
    ids = tokenize_file(path, tokenizer)
    if ids.numel() <= seqlen:
        raise DataError(f"calibration file {str(path)!r} has {ids.numel()} tokens, fewer than one window of {seqlen}; "
                        f"give a longer file or a smaller calibration seqlen")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
