"""Task accuracy: HellaSwag and PIQA scored as lm-evaluation-harness scores them (`scoring`), from the
files in ``../shared/data`` (`data`), and the paired comparison of two models (`stats`).

    results = compressor.tasks.evaluate(model, tokenizer, ["hellaswag", "piqa"], limit=1000)
    results["hellaswag"].acc_norm
    compressor.tasks.paired(base["piqa"].correct_norm, cand["piqa"].correct_norm).verdict()
"""
from __future__ import annotations

import os

from .data import Item, TaskDataError, default_data_dir, load_task, parse_tasks
from .scoring import ScoreStats, encode_pair, loglikelihoods, resolve_precision
from .stats import Paired, TaskReport, TaskResult, mcnemar_p, paired

__all__ = ["evaluate", "evaluate_items", "load_tasks", "Item", "TaskDataError", "TaskResult", "TaskReport", "Paired", "paired",
           "mcnemar_p", "loglikelihoods", "encode_pair", "parse_tasks", "load_task", "default_data_dir",
           "resolve_precision", "GATE_METRIC"]

GATE_METRIC = "acc_norm"   # what the verdict and --max-acc-drop use: the figure both tasks are reported by


def load_tasks(tasks, data: str | os.PathLike | None = None, limit: int | None = None) -> dict[str, list[Item]]:
    """Read and check every task's items before any model work (bad names, paths, files fail here)."""
    return {t: load_task(t, data, limit) for t in parse_tasks(tasks)}


def evaluate_items(model, tokenizer, items: dict[str, list[Item]], *, precision: str = "auto",
                   progress: bool = True, label: str = "") -> dict[str, TaskResult]:
    prec = resolve_precision(precision)
    out = {}
    for task, its in items.items():
        st = ScoreStats()
        lls = loglikelihoods(model, tokenizer, its, precision=prec, progress=progress, stats=st,
                             desc=f"{task}{' ' + label if label else ''}")
        out[task] = TaskResult.from_scores(task, lls, its, precision=prec, seconds=st.seconds, tokens=st.tokens)
    return out


def evaluate(model, tokenizer, tasks=("hellaswag", "piqa"), data: str | os.PathLike | None = None,
             limit: int | None = None, *, precision: str = "auto", progress: bool = True) -> dict[str, TaskResult]:
    """acc and acc_norm of a causal LM on each task (the first `limit` items of each)."""
    return evaluate_items(model, tokenizer, load_tasks(tasks, data, limit), precision=precision, progress=progress)
