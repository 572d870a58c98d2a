"""`compress-bench`: what a compressed model gains and costs against its base, measured in one run.

    result = compressor.bench.run("smollm2-135m", ["w4=out/rtn"], eval_data="wikitext2-test.txt",
                                  config=BenchConfig(batches=(1, 8), price_per_hour=0.10))
    result.rows        # one `Row` per (model, batch size)
    result.failures    # gate failures, "w4 (batch 1): decode speedup 1.8x < --min-speedup 100x"

For every model: bytes on disk, RSS after load and peak RSS during generation (one worker process
per model, see `compressor.bench.measure`), perplexity on the eval text, prefill and decode
tokens/s and time to first token per batch size, and $/1M tokens from an hourly price.

Protocol (the defaults are sized so that SmolLM2-135M against a 4-bit copy, batches 1 and 8 and
4 perplexity windows, fits in a few minutes on 2 cores):
  * every input is checked before any model is loaded (`BenchInputError`);
  * per batch size, ``warmup`` untimed runs of ``min(gen_len, 8)`` tokens, then ``runs`` (default 3)
    timed runs of ``prompt_len`` (128) prompt tokens and ``gen_len`` (64) generated tokens;
  * the models take turns run by run (A B A B ...), so drift of a shared machine hits every row
    alike, and ratios to BASE are medians of per-pair ratios (`compressor.bench.stats`);
  * perplexity last, on the first ``eval_windows`` (8) windows of ``seqlen`` (2048) tokens,
    tokenized once with BASE's tokenizer, which every candidate must share.

Rendering (rich table, JSON, Markdown, PNG) is in `compressor.bench.report`; the command line in
`compressor.bench.cli`.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from . import stats
from .measure import LocalWorker, ProcessWorker, RunSample

__all__ = ["BenchConfig", "BenchInputError", "BenchResult", "ModelResult", "Row", "run", "parse_model_arg",
           "machine_info"]


class BenchInputError(ValueError):
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
    threads: int = field(default_factory=_default_threads)
    seqlen: int = 2048                   # perplexity window
    eval_windows: int | None = 8         # None: every window of the eval text
    price_per_hour: float | None = None  # $/hour of the deployment machine
    max_ppl_increase: float | None = None  # gate, percent
    min_speedup: float | None = None       # gate, decode tokens/s ratio to BASE
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "batches", tuple(self.batches))
        positive = {"prompt_len": self.prompt_len, "runs": self.runs, "threads": self.threads, "seqlen": self.seqlen}
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
        if self.min_speedup is not None and self.min_speedup <= 0:
            raise BenchInputError(f"min_speedup={self.min_speedup!r}: must be > 0")


@dataclass
class ModelResult:
    """Everything measured for one model; the raw samples are kept for the JSON."""
    label: str
    spec: str
    path: str
    kind: str = ""                    # "hf" or "checkpoint"
    disk_bytes: int = 0
    load_s: float = 0.0
    rss_base: int = 0                 # worker RSS before the load (runtime only)
    rss_load: int = 0                 # worker RSS after the load
    peak_rss_method: str = ""
    ppl: float | None = None
    ppl_windows: int = 0
    ppl_s: float = 0.0
    warmup: list[RunSample] = field(default_factory=list)
    runs: list[RunSample] = field(default_factory=list)

    def samples(self, batch: int) -> list[RunSample]:
        return [s for s in self.runs if s.batch == batch]


@dataclass(frozen=True)
class Row:
    """One line of the table: one model at one batch size."""
    label: str
    batch: int
    is_base: bool
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
    failures: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.label} (batch {self.batch})"


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


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

def parse_model_arg(arg: str) -> tuple[str, str]:
    """``"name=path"`` -> (name, path); a bare spec is labelled by its name or its directory's name.

    A string that exists as a path is never split, so a directory with '=' in its name still works.
    """
    if "=" in arg and not Path(arg).exists():
        label, spec = arg.split("=", 1)
        if not label or not spec:
            raise BenchInputError(f"{arg!r}: expected NAME=PATH with both parts non-empty")
        return label, spec
    return (Path(arg).name or arg), arg


def _resolve_all(args: Sequence[str]) -> list[ModelResult]:
    from compressor.api import dir_bytes
    from compressor.models import ModelError, resolve

    models, seen = [], set()
    for arg in args:
        label, spec = parse_model_arg(str(arg))
        if label in seen:
            raise BenchInputError(f"two models are labelled {label!r}; name them with NAME=PATH")
        seen.add(label)
        try:
            path = resolve(spec)
        except ModelError as e:
            raise BenchInputError(f"{label}: {e}") from None
        models.append(ModelResult(label=label, spec=spec, path=str(path), disk_bytes=dir_bytes(path)))
    return models


def _check_positions(models: list[ModelResult], cfg: BenchConfig, with_eval: bool) -> None:
    from transformers import AutoConfig
    need = max(cfg.prompt_len + cfg.gen_len, cfg.seqlen if with_eval else 0)
    for m in models:
        n = getattr(AutoConfig.from_pretrained(m.path), "max_position_embeddings", None)
        if n is not None and need > n:
            raise BenchInputError(f"{m.label}: needs {need} positions (prompt-len {cfg.prompt_len} + gen-len "
                                  f"{cfg.gen_len}, seqlen {cfg.seqlen}) but max_position_embeddings is {n}")


def _eval_ids(models: list[ModelResult], eval_data: str, cfg: BenchConfig) -> list[int]:
    """Eval token ids (a whole number of windows), tokenized with BASE's tokenizer, after checking
    that the file is long enough and that every candidate tokenizes exactly as BASE does."""
    from transformers import AutoTokenizer

    from compressor.calib import tokenize_file
    from compressor.eval import count_windows

    p = Path(eval_data)
    if not p.is_file():
        raise BenchInputError(f"eval data {str(p)!r} does not exist")
    base_tok = AutoTokenizer.from_pretrained(models[0].path)
    text = p.read_text(encoding="utf-8", errors="replace")[:20000]
    probe = base_tok(text, add_special_tokens=False).input_ids
    for m in models[1:]:
        tok = AutoTokenizer.from_pretrained(m.path)
        if tok.get_vocab() != base_tok.get_vocab() or tok(text, add_special_tokens=False).input_ids != probe:
            raise BenchInputError(f"{m.label}: its tokenizer differs from {models[0].label}'s, so their perplexities "
                                  f"are not comparable; benchmark without --eval-data or use matching models")
    ids = tokenize_file(p, base_tok)
    n = count_windows(ids.numel(), cfg.seqlen, cfg.eval_windows)
    if n < 1:
        raise BenchInputError(f"eval data {str(p)!r} has {ids.numel()} tokens, fewer than one window of "
                              f"{cfg.seqlen} (--seqlen)")
    return ids[:n * cfg.seqlen].tolist()


def machine_info(threads: int) -> dict:
    """The header: CPU, cores, threads, library versions, date."""
    import importlib.metadata as md

    import psutil
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    versions = {"python": platform.python_version()}
    for pkg in ("compressor", "torch", "transformers"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    from compressor import kernels
    versions["kernels"] = kernels.extension.isa() if kernels.extension is not None else "pytorch reference"
    return {"cpu": cpu, "physical_cores": psutil.cpu_count(logical=False), "logical_cpus": psutil.cpu_count(),
            "threads": threads, "versions": versions,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------

def build_rows(models: list[ModelResult], cfg: BenchConfig) -> list[Row]:
    """Medians, pairwise ratios to BASE (``models[0]``), cost and the gate for every (model, batch)."""
    base = models[0]
    rows = []
    for m in models:
        inc = (stats.ppl_increase_pct(m.ppl, base.ppl) if m.ppl is not None and base.ppl is not None else None)
        for b in cfg.batches:
            s, bs = m.samples(b), base.samples(b)
            pre = [x.prefill_tok_s(cfg.prompt_len) for x in s]
            dec = [x.decode_tok_s(cfg.gen_len) for x in s]
            dec_speedup = stats.paired_speedup(dec, [x.decode_tok_s(cfg.gen_len) for x in bs])
            pre_speedup = stats.paired_speedup(pre, [x.prefill_tok_s(cfg.prompt_len) for x in bs])
            price = cfg.price_per_hour
            fails = () if m is base else tuple(stats.gate(inc, dec_speedup, cfg.max_ppl_increase, cfg.min_speedup))
            rows.append(Row(
                label=m.label, batch=b, is_base=m is base, disk_bytes=m.disk_bytes, rss_load=m.rss_load,
                peak_rss=max(x.peak_rss for x in s), ppl=m.ppl, ppl_increase_pct=inc,
                ttft_s=stats.median([x.prefill_s for x in s]),
                prefill_tok_s=stats.median(pre), prefill_spread_pct=stats.spread_pct(pre),
                decode_tok_s=stats.median(dec), decode_spread_pct=stats.spread_pct(dec),
                decode_speedup=dec_speedup, prefill_speedup=pre_speedup,
                cost_gen=None if price is None else stats.cost_per_million(price, stats.median(dec)),
                cost_prompt=None if price is None else stats.cost_per_million(price, stats.median(pre)),
                failures=fails))
    return rows


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

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
    """Benchmark BASE and each candidate side by side; see the module docstring for the protocol.

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
    models = _resolve_all([base, *candidates])
    if cfg.max_ppl_increase is not None and eval_data is None:
        raise BenchInputError("--max-ppl-increase needs --eval-data (perplexity is not measured without it)")
    _check_positions(models, cfg, eval_data is not None)
    ids = _eval_ids(models, str(eval_data), cfg) if eval_data is not None else None
    result = BenchResult(config=cfg, machine=machine_info(cfg.threads), models=models,
                         eval_data=None if eval_data is None else str(eval_data), isolated=isolate)

    labels = [m.label for m in models]
    by_label = {m.label: m for m in models}
    steps = (len(models) + len(stats.schedule(labels, cfg.batches, cfg.warmup + cfg.runs))
             + (len(models) if ids else 0))
    workers = {}
    with _progress(progress) as bar, contextlib.ExitStack() as stack:
        task = bar.add_task("starting", total=steps)
        for m in models:
            bar.update(task, description=f"loading {m.label}")
            w = ProcessWorker(cfg.threads, m.label) if isolate else LocalWorker(cfg.threads)
            stack.callback(w.close)
            workers[m.label] = w
            info = w.call("load", path=m.path)
            m.kind, m.load_s, m.rss_base, m.rss_load = info["kind"], info["load_s"], info["rss_base"], info["rss_load"]
            m.peak_rss_method = info["peak_rss_method"]
            bar.update(task, advance=1)
        for b, r, label in stats.schedule(labels, cfg.batches, cfg.warmup + cfg.runs):
            warm = r < cfg.warmup
            what = "warm-up" if warm else f"run {r - cfg.warmup + 1}/{cfg.runs}"
            bar.update(task, description=f"batch {b} {what}: {label}")
            gen_len = min(cfg.gen_len, 8) if warm else cfg.gen_len
            s = RunSample(**workers[label].call("generate", batch=b, prompt_len=cfg.prompt_len, gen_len=gen_len,
                                                seed=cfg.seed + r))
            (by_label[label].warmup if warm else by_label[label].runs).append(s)
            bar.update(task, advance=1)
        if ids:
            for m in models:
                bar.update(task, description=f"perplexity: {m.label}")
                p = workers[m.label].call("perplexity", ids=ids, seqlen=cfg.seqlen)
                m.ppl, m.ppl_windows, m.ppl_s = p["ppl"], p["windows"], p["seconds"]
                bar.update(task, advance=1)
    result.rows = build_rows(models, cfg)
    return result
