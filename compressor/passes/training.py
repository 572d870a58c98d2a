"""Shared config and wiring for passes that train (``lora``, ``peqa``, ``distill``).

`TrainingConfig` holds the fields every such pass has (steps, lr, batch size, sequence length, seed,
teacher, checkpointing) and validates them. `TrainingConfig.fit` connects a pass's trainable
parameters to `compressor.train.train` through the `Context`: the training text, the teacher
(`ctx.original`, the uncompressed float model), the work directory for the training state
(``<pass>-state.pt``) and `--resume`.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .base import Context, PassConfig

__all__ = ["Teacher", "Autocast", "TrainingConfig", "check_enum"]


class Teacher(str, enum.Enum):
    ORIGINAL = "original"         # the uncompressed float model the recipe started from


class Autocast(str, enum.Enum):
    BFLOAT16 = "bfloat16"         # matmuls in bf16 (AMX / AVX512-BF16 on CPU), weights and optimizer fp32

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.value)


def check_enum(cls: type[enum.Enum], value: Any, where: str, allow_none: bool = False):
    """`cls(value)`, or ValueError naming `where`, the value and the allowed values."""
    if value is None and allow_none:
        return None
    try:
        return cls(value)
    except ValueError:
        allowed = [m.value for m in cls] + (["null"] if allow_none else [])
        raise ValueError(f"{where}={value!r} is not supported; allowed: {allowed}") from None


@dataclass(frozen=True)
class TrainingConfig(PassConfig):
    """steps, lr, warmup, batch_size, seqlen, seed: the AdamW run (linear warm-up, cosine decay to lr/10).
    teacher: 'original' (distil from the uncompressed model's logits) or null (causal-LM loss).
    temperature: distillation temperature T.
    checkpoint_every: steps between training-state checkpoints in the work directory (0: only the last).
    autocast: null (fp32 throughout) or 'bfloat16': student and teacher forward/backward under
        ``torch.autocast`` (bf16 matmuls, fp32 trainable weights, optimizer state and loss). On the
        AMX Xeon a PEQA step on SmolLM2-135M (4 x 256 tokens) took 6.4 s instead of 10.0 s, and 64
        steps ended at the same perplexity (21.519 both, 8 windows). Without AMX or AVX512-BF16 it
        can be slower than fp32.
    """
    needs_train_data = True

    steps: int = 64
    lr: float = 1e-3
    warmup: int = 6
    batch_size: int = 4
    seqlen: int = 256
    seed: int = 0
    teacher: Teacher | None = Teacher.ORIGINAL
    temperature: float = 1.0
    checkpoint_every: int = 10
    autocast: Autocast | None = None

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "teacher", self._teacher(self.teacher))
        object.__setattr__(self, "autocast", check_enum(Autocast, self.autocast, f"{self.name}.autocast",
                                                        allow_none=True))
        for f, lo in self._int_fields():
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{self.name}.{f}={v!r} must be an integer >= {lo}")
        for f in self._positive_fields():
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ValueError(f"{self.name}.{f}={v!r} must be a positive number")
            object.__setattr__(self, f, float(v))

    def _teacher(self, value: Any) -> Any:
        """The validated `teacher` field (a pass may accept more than 'original' and null)."""
        return check_enum(Teacher, value, f"{self.name}.teacher", allow_none=True)

    def _int_fields(self) -> tuple[tuple[str, int], ...]:
        return (("steps", 1), ("batch_size", 1), ("seqlen", 2), ("warmup", 0), ("seed", 0), ("checkpoint_every", 0))

    def _positive_fields(self) -> tuple[str, ...]:
        return ("lr", "temperature")

    @property
    def needs_original(self) -> bool:
        return self.teacher is Teacher.ORIGINAL

    def check(self, model: nn.Module, ctx: Context) -> None:
        if self.needs_original and ctx.original is None:
            raise ValueError(f"{self.name}.teacher=original needs the uncompressed model (ctx.original); "
                             f"set teacher: null for a causal-LM loss")

    def fingerprint(self, ctx: Context) -> dict[str, Any]:
        """What must match for a saved training state to be resumed."""
        return {"pass": self.to_dict(), "before": list(ctx.applied), "source_sha256": ctx.source.get("sha256"),
                "train_data": str(Path(ctx.train_data).resolve())}

    def fit(self, model: nn.Module, params: list[nn.Parameter], ctx: Context, *, loss=None, top_k: int = 0,
            extra: nn.Module | None = None, teacher=None) -> dict[str, Any]:
        """Train `params` of `model` on ctx.train_data; records and returns the loss curve.

        loss, top_k, extra: see `compressor.train.train` (default: forward KL against the teacher, or
        cross-entropy without one). teacher: a callable returning the teacher (default: ctx.original
        when `teacher` is 'original')."""
        from ..calib import tokenize_file
        from ..train import TokenWindows, train

        if ctx.train_data is None:
            raise ValueError(f"the {self.name} pass needs training text: pass --train-data FILE")
        data = TokenWindows(tokenize_file(ctx.train_data, ctx.tokenizer), self.seqlen, self.seed)
        state_file = ctx.work_dir / f"{self.name}-state.pt" if ctx.work_dir is not None else None
        log_ = train(model, params, data, steps=self.steps, lr=self.lr, warmup=self.warmup,
                     batch_size=self.batch_size,
                     teacher=teacher if teacher is not None else ctx.original if self.needs_original else None,
                     temperature=self.temperature, loss=loss, top_k=top_k, extra=extra, state_file=state_file, checkpoint_every=self.checkpoint_every,
                     fingerprint=self.fingerprint(ctx), resume=ctx.resume, progress=ctx.progress, desc=self.name,
                     autocast=self.autocast and self.autocast.dtype)
        ctx.training[self.name] = log_
        return log_
