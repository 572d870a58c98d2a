"""`run`: the whole `compress-bench` protocol, from the input checks to the rows, and `BenchResult`.

One worker per model (`compressor.bench.measure`) loads it, then the models take turns run by run
(`stats.schedule`), then perplexity; `rows.build_rows` turns the samples into the table.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Sequence

from compressor.machine import machine_info

from . import stats
from .config import BenchConfig, BenchInputError
from .inputs import check_engines, check_positions, eval_ids, make_exports, resolve_models
from .measure import LocalWorker, ProcessWorker, RunSample
from .rows import ModelResult, Row, build_rows

__all__ = ["BenchResult", "run"]


@dataclass
class BenchResult:
    config: BenchConfig
    machine: dict
    models: list[ModelResult]
    eval_data: str | None = None
    isolated: bool = True             # one worker process per model (memory columns per model)
    rows: list[Row] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return [f"{r.name}: {'; '.join(r.failures)}" for r in self.rows if r.failures]

    def to_dict(self) -> dict:
        return {"machine": self.machine, "config": asdict(self.config), "eval_data": self.eval_data,
                "isolated": self.isolated,
                "rows": [asdict(r) | {"name": r.name} for r in self.rows],
                "models": [asdict(m) for m in self.models], "failures": self.failures}


class _NoProgress:
    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(enabled: bool):
    if not enabled:
        return _NoProgress()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True)


def run(base: str, candidates: Sequence[str] = (), eval_data: str | os.PathLike | None = None,
        config: BenchConfig | None = None, *, progress: bool = True, isolate: bool = True) -> BenchResult:
    """Benchmark BASE and each candidate side by side; see `compressor.bench` for the protocol.

    Args:
        base, candidates: anything `compressor.models.resolve` accepts (a named default, an HF
            directory, a compressed checkpoint, a .gguf file), optionally as ``"label=spec"``.
        eval_data: a text file for perplexity; None skips perplexity.
        isolate: one worker process per model (default). False measures in this process, which is
            faster to start but makes the memory columns include everything else held here.
    Raises:
        BenchInputError: before any model is loaded, for an input that cannot work.
    """
    cfg = config or BenchConfig()
    models = resolve_models([base, *candidates], cfg.engines)
    if cfg.max_ppl_increase is not None and eval_data is None:
        raise BenchInputError("--max-ppl-increase needs --eval-data (perplexity is not measured without it)")
    check_positions(models, cfg, eval_data is not None)
    check_engines(models, cfg)
    ids = eval_ids(models, str(eval_data), cfg) if eval_data is not None else None
    if cfg.tasks:                     # unreadable task files fail here, before any model is loaded
        from compressor.tasks import TaskDataError, load_tasks, resolve_precision
        try:
            load_tasks(cfg.tasks, cfg.task_data, cfg.task_limit)
        except TaskDataError as e:
            raise BenchInputError(str(e)) from None
        precision = resolve_precision(cfg.task_precision)
    result = BenchResult(config=cfg, machine=machine_info(cfg.threads), models=models,
                         eval_data=None if eval_data is None else str(eval_data), isolated=isolate)

    labels = [m.label for m in models]
    by_label = {m.label: m for m in models}
    # llama.cpp rows run batch 1 only (`check_engines`)
    runs = [(b, r, label) for b, r, label in stats.schedule(labels, cfg.batches, cfg.warmup + cfg.runs)
            if b == 1 or by_label[label].engine != "llama.cpp"]
    context = max(cfg.prompt_len + cfg.gen_len, cfg.seqlen if ids else 0)
    steps = (len(models) + len(runs)
             + (len(models) if ids else 0) + len(models) * len(cfg.tasks))
    workers = {}
    with _progress(progress) as bar, contextlib.ExitStack() as stack:
        task = bar.add_task("starting", total=steps)
        if any(m.export_from for m in models):          # ort rows of torch models: their onnx exports, removed after
            work = stack.enter_context(tempfile.TemporaryDirectory(prefix="compress-bench-onnx-"))
            make_exports(models, work, lambda what: bar.update(task, description=what))
        for m in models:
            bar.update(task, description=f"loading {m.label}")
            w = ProcessWorker(cfg.threads, m.label) if isolate else LocalWorker(cfg.threads, m.label)
            stack.callback(w.close)
            workers[m.label] = w
            info = w.call("load", path=m.path, engine=m.engine, context=context)
            m.kind, m.load_s, m.rss_base, m.rss_load = info["kind"], info["load_s"], info["rss_base"], info["rss_load"]
            m.peak_rss_method, m.kernels = info["peak_rss_method"], info["kernels"]
            m.engine_note = info.get("engine_note", "")
            bar.update(task, advance=1)
        for b, r, label in runs:
            warm = r < cfg.warmup
            what = "warm-up" if warm else f"run {r - cfg.warmup + 1}/{cfg.runs}"
            bar.update(task, description=f"batch {b} {what}: {label}")
            gen_len = min(cfg.gen_len, 8) if warm else cfg.gen_len
            s = RunSample(**workers[label].call("generate", batch=b, prompt_len=cfg.prompt_len, gen_len=gen_len,
                                                       prefill_reps=cfg.prefill_reps,
                                                seed=cfg.seed + r))
            (by_label[label].warmup if warm else by_label[label].runs).append(s)
            bar.update(task, advance=1)
        if ids:
            for m in models:
                bar.update(task, description=f"perplexity: {m.label}")
                p = workers[m.label].call("perplexity", ids=ids, seqlen=cfg.seqlen)
                m.ppl, m.ppl_windows, m.ppl_s = p["ppl"], p["windows"], p["seconds"]
                bar.update(task, advance=1)
        for t in cfg.tasks:
            for m in models:
                bar.update(task, description=f"{t}: {m.label}")
                m.tasks.update(workers[m.label].call("tasks", tasks=[t], data=cfg.task_data, limit=cfg.task_limit,
                                                     precision=precision))
                bar.update(task, advance=1)
    result.rows = build_rows(models, cfg)
    return result
