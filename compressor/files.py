"""A compressed checkpoint's file names, format version and error, without torch.

`compressor.checkpoint` (which needs torch) re-exports them; `compressor.runtime` reads checkpoints in a
process that never imports torch.
"""
from __future__ import annotations

from pathlib import Path

from .errors import InputError

__all__ = ["FORMAT_VERSION", "WEIGHTS", "META", "ADAPTER", "CheckpointError", "is_checkpoint"]

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "compression.json"
ADAPTER = "peft-adapter"


class CheckpointError(InputError):
    """A compressed checkpoint that cannot be read."""


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / META).is_file()
