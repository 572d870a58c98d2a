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

Modules: `config` (BenchConfig, BenchInputError), `inputs` (the checks before any load), `measure`
(the worker that holds one model), `stats` (medians, pairing, cost, gate), `rows` (ModelResult, Row,
build_rows), `runner` (run, BenchResult), `report` (rich table, JSON, Markdown, PNG), `cli`.
"""
from __future__ import annotations

from compressor.machine import machine_info

from .config import BenchConfig, BenchInputError
from .inputs import parse_model_arg
from .rows import ModelResult, Row, build_rows  # noqa: F401  (build_rows: importable here before the split)
from .runner import BenchResult, run

__all__ = ["BenchConfig", "BenchInputError", "BenchResult", "ModelResult", "Row", "run", "parse_model_arg",
           "machine_info"]
