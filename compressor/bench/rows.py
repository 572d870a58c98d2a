"""What `compress-bench` measured per model (`ModelResult`) and the table made from it (`Row`, one per
model and batch size), with `build_rows` between the two: medians, ratios to BASE, cost, the gate.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import stats
from .config import BenchConfig
from .measure import RunSample

__all__ = ["ModelResult", "Row", "TaskCell", "build_rows", "task_cells"]


@dataclass
class ModelResult:
    """Everything measured for one model; the raw samples are kept for the JSON."""
    label: str
    spec: str
    path: str
    kind: str = ""                    # "hf", "checkpoint" or "gguf"
    engine: str = "torch"             # "torch", "ort" (an onnx export) or "llama.cpp" (a gguf export, batch 1 only)
    engine_note: str = ""             # ort: accuracy_level and execution provider
    export_from: str = ""             # ort row of a torch-loadable model: exported from this path before loading
    ort_level: int | None = None      # that export's MatMulNBits accuracy_level
    disk_bytes: int = 0
    load_s: float = 0.0
    rss_base: int = 0                 # worker RSS before the load (runtime only)
    rss_load: int = 0                 # worker RSS after the load
    peak_rss_method: str = ""
    kernels: str = ""                 # compressor's kernel backend in the worker; "" if no layer uses it
    ppl: float | None = None
    ppl_windows: int = 0
    ppl_s: float = 0.0
    tasks: dict[str, dict] = field(default_factory=dict)   # task -> asdict(compressor.tasks.TaskResult)
    warmup: list[RunSample] = field(default_factory=list)
    runs: list[RunSample] = field(default_factory=list)

    def samples(self, batch: int) -> list[RunSample]:
        return [s for s in self.runs if s.batch == batch]


@dataclass(frozen=True)
class TaskCell:
    """One model's accuracy on one task, and for a candidate its paired difference to BASE."""
    task: str
    acc: float
    acc_norm: float
    n: int
    diff_pp: float | None = None             # acc_norm, candidate - base
    ci_pp: tuple[float, float] | None = None
    p_value: float | None = None
    verdict: str = ""


def task_cells(m: ModelResult, base: ModelResult, max_drop: float | None) -> tuple[tuple[TaskCell, ...], list[str]]:
    from compressor.tasks import GATE_METRIC, TaskResult, paired
    cells, fails = [], []
    for t, r in m.tasks.items():
        if m is base:
            cells.append(TaskCell(t, r["acc"], r["acc_norm"], r["n"]))
            continue
        key = TaskResult.FIELDS[GATE_METRIC]
        p = paired(base.tasks[t][key], r[key], GATE_METRIC)
        cells.append(TaskCell(t, r["acc"], r["acc_norm"], r["n"], p.diff_pp, p.ci_pp, p.p_value, p.verdict()))
        if (f := p.failure(t, max_drop)):
            fails.append(f)
    return tuple(cells), fails


@dataclass(frozen=True)
class Row:
    """One line of the table: one model at one batch size."""
    label: str
    batch: int
    is_base: bool
    engine: str
    disk_bytes: int
    rss_load: int
    peak_rss: int
    ppl: float | None
    ppl_increase_pct: float | None
    ttft_s: float
    prefill_tok_s: float
    prefill_spread_pct: float
    decode_tok_s: float
    decode_spread_pct: float
    decode_speedup: float
    prefill_speedup: float
    cost_gen: float | None             # $ per 1M generated tokens
    cost_prompt: float | None          # $ per 1M prompt tokens
    tasks: tuple["TaskCell", ...] = ()
    failures: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.label} (batch {self.batch})"


def build_rows(models: list[ModelResult], cfg: BenchConfig) -> list[Row]:
    """Medians, pairwise ratios to BASE (``models[0]``), cost and the gate for every (model, batch)."""
    base = models[0]
    rows = []
    for m in models:
        cells, task_fails = task_cells(m, base, cfg.max_acc_drop)
        inc = (stats.ppl_increase_pct(m.ppl, base.ppl) if m.ppl is not None and base.ppl is not None else None)
        for b in cfg.batches:
            s, bs = m.samples(b), base.samples(b)
            if not s:                  # a batch size this model's engine does not run (llama.cpp: 1 only)
                continue
            pre = [x.prefill_tok_s(cfg.prompt_len) for x in s]
            dec = [x.decode_tok_s(cfg.gen_len) for x in s]
            dec_speedup = stats.paired_speedup(dec, [x.decode_tok_s(cfg.gen_len) for x in bs])
            pre_speedup = stats.paired_speedup(pre, [x.prefill_tok_s(cfg.prompt_len) for x in bs])
            price = cfg.price_per_hour
            fails = () if m is base else tuple(stats.gate(inc, dec_speedup, cfg.max_ppl_increase, cfg.min_speedup)
                                               + task_fails)
            rows.append(Row(
                label=m.label, batch=b, is_base=m is base, engine=m.engine, disk_bytes=m.disk_bytes, rss_load=m.rss_load,
                peak_rss=max(x.peak_rss for x in s), ppl=m.ppl, ppl_increase_pct=inc,
                ttft_s=stats.median([x.prefill_s for x in s]),
                prefill_tok_s=stats.median(pre), prefill_spread_pct=stats.spread_pct(pre),
                decode_tok_s=stats.median(dec), decode_spread_pct=stats.spread_pct(dec),
                decode_speedup=dec_speedup, prefill_speedup=pre_speedup,
                cost_gen=None if price is None else stats.cost_per_million(price, stats.median(dec)),
                cost_prompt=None if price is None else stats.cost_per_million(price, stats.median(pre)),
                tasks=cells, failures=fails))
    return rows
