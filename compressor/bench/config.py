"""`BenchConfig`, the settings of one `compress-bench` run, and `BenchInputError`, its refusals.

Every value is checked when the config is built, so a bad one fails before any model is loaded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import InputError

__all__ = ["BenchConfig", "BenchInputError"]


class BenchInputError(InputError):
    """An input that cannot be benchmarked; raised before any long work starts."""


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass(frozen=True)
class BenchConfig:
    batches: tuple[int, ...] = (1, 8)
    prompt_len: int = 128
    gen_len: int = 64
    runs: int = 3                        # timed runs per model and batch size (k)
    warmup: int = 1                      # untimed runs per model and batch size, before the timed ones
    prefill_reps: int = 3                # prompt forwards timed per run (their median is the run's prefill)
    threads: int = field(default_factory=_default_threads)
    seqlen: int = 2048                   # perplexity window
    eval_windows: int | None = 8         # None: every window of the eval text
    price_per_hour: float | None = None  # $/hour of the deployment machine
    max_ppl_increase: float | None = None  # gate, percent
    min_speedup: float | None = None       # gate, decode tokens/s ratio to BASE
    seed: int = 0
    tasks: tuple[str, ...] = ()            # multiple-choice tasks (compressor.tasks), e.g. ("hellaswag", "piqa")
    task_limit: int | None = None          # the first N items of each task; None: all
    task_data: str | None = None           # directory of the task files; None: compressor.tasks.default_data_dir()
    task_precision: str = "auto"           # scoring precision: auto (bf16 where native), fp32, bf16
    max_acc_drop: float | None = None      # gate, percentage points of acc_norm, when the drop is significant
    engines: tuple[str, ...] = ("torch",)  # runtimes each model runs in: torch, ort, ort:LEVEL (onnx export)

    def __post_init__(self):
        object.__setattr__(self, "batches", tuple(self.batches))
        object.__setattr__(self, "engines", tuple(self.engines))
        for e in self.engines:
            if e != "torch" and not (e == "ort" or (e.startswith("ort:") and e[4:] in ("0", "1", "2", "3", "4"))):
                raise BenchInputError(f"engine {e!r}: expected torch, ort, or ort:LEVEL with LEVEL the MatMulNBits "
                                      f"accuracy_level 0-4 (ort:4 = int8 activations), e.g. --engine torch,ort")
        if not self.engines or len(set(self.engines)) != len(self.engines):
            raise BenchInputError(f"engines={self.engines!r}: one or more distinct engines, e.g. torch,ort")
        positive = {"prompt_len": self.prompt_len, "runs": self.runs, "prefill_reps": self.prefill_reps,
                    "threads": self.threads, "seqlen": self.seqlen}
        for name, v in positive.items():
            if not isinstance(v, int) or v < 1:
                raise BenchInputError(f"{name}={v!r}: must be a positive integer")
        if not self.batches or any(not isinstance(b, int) or b < 1 for b in self.batches):
            raise BenchInputError(f"batches={self.batches!r}: must be one or more positive integers, e.g. (1, 8)")
        if len(set(self.batches)) != len(self.batches):
            raise BenchInputError(f"batches={self.batches!r}: a batch size is repeated")
        if not isinstance(self.gen_len, int) or self.gen_len < 2:
            raise BenchInputError(f"gen_len={self.gen_len!r}: must be at least 2 (one prefill token, one decode step)")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise BenchInputError(f"warmup={self.warmup!r}: must be 0 or more")
        if self.eval_windows is not None and self.eval_windows < 1:
            raise BenchInputError(f"eval_windows={self.eval_windows!r}: must be at least 1 (or None for all)")
        for name in ("price_per_hour", "max_ppl_increase"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise BenchInputError(f"{name}={v!r}: must be >= 0")
        if self.tasks:
            from compressor.tasks import TaskDataError, parse_tasks
            try:
                object.__setattr__(self, "tasks", parse_tasks(self.tasks))
            except TaskDataError as e:
                raise BenchInputError(str(e)) from None
        if self.task_limit is not None and (not isinstance(self.task_limit, int) or self.task_limit < 1):
            raise BenchInputError(f"task_limit={self.task_limit!r}: must be a positive integer (or None for all items)")
        if self.task_precision not in ("auto", "fp32", "bf16"):
            raise BenchInputError(f"task_precision={self.task_precision!r}: expected auto, fp32 or bf16")
        if self.max_acc_drop is not None:
            if self.max_acc_drop < 0:
                raise BenchInputError(f"max_acc_drop={self.max_acc_drop!r}: must be >= 0 (percentage points)")
            if not self.tasks:
                raise BenchInputError("--max-acc-drop needs --tasks (task accuracy is not measured without it)")
        if self.min_speedup is not None and self.min_speedup <= 0:
            raise BenchInputError(f"min_speedup={self.min_speedup!r}: must be > 0")
