"""The Python API: `compress_` applies a recipe to a model in place; `compress` is the whole job
(resolve, load, preflight, passes, save) that the CLI calls.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from . import checkpoint
from .models import load_hf, resolve, weights_hash
from .passes import Context
from .recipe import Recipe, load_recipe

__all__ = ["compress_", "compress", "CompressResult", "preflight"]

log = logging.getLogger("compressor")


def _as_recipe(recipe: Recipe | str | Path) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def preflight(model: nn.Module, recipe: Recipe | str | Path, ctx: Context | None = None) -> Recipe:
    """Check every pass against the model before any work; raises ValueError naming the problem."""
    recipe = _as_recipe(recipe)
    ctx = ctx or Context()
    for p in recipe.passes:
        p.preflight(model, ctx)
    if recipe.needs_calibration and ctx.calib_data is None:
        raise ValueError(f"recipe {recipe.source!r} needs calibration data: pass --calib-data FILE "
                         f"(for example ../shared/data/wikitext2-valid.tokens)")
    return recipe


def compress_(model: nn.Module, recipe: Recipe | str | Path, ctx: Context | None = None) -> nn.Module:
    """Apply every pass of `recipe` to `model`, in place, and return it.

    `ctx` carries calibration data, the tokenizer and progress; it collects per-layer statistics
    and the specs of compressed modules that `checkpoint.save` needs.
    """
    recipe = _as_recipe(recipe)
    ctx = ctx or Context()
    for k, v in recipe.calibration.items():
        setattr(ctx, {"samples": "calib_samples", "seqlen": "calib_seqlen", "seed": "seed"}[k], v)
    preflight(model, recipe, ctx)
    for p in recipe.passes:
        t0 = time.perf_counter()
        model = p.apply(model, ctx)
        ctx.record(f"pass:{p.name}", seconds=round(time.perf_counter() - t0, 3))
    return model


@dataclass
class CompressResult:
    out: Path
    model: nn.Module
    tokenizer: Any
    seconds: float
    source_bytes: int
    out_bytes: int
    ctx: Context = field(repr=False, default=None)


def dir_bytes(path: Path) -> int:
    """Bytes of the weight files (safetensors) in a model directory."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def compress(model_spec: str, recipe: Recipe | str | Path, out: str | Path, *, calib_data: str | None = None,
             overwrite: bool = False, progress: bool = True, ctx: Context | None = None) -> CompressResult:
    """Resolve `model_spec`, apply `recipe` and write the checkpoint to `out` atomically."""
    out = Path(out)
    recipe = _as_recipe(recipe)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {str(out)!r} already exists; pass --overwrite to replace it")
    if calib_data is not None and not Path(calib_data).is_file():
        raise FileNotFoundError(f"calibration file {calib_data!r} does not exist")
    t0 = time.perf_counter()
    src = resolve(model_spec)
    model, tok = load_hf(src)
    ctx = ctx or Context()
    ctx.tokenizer, ctx.calib_data, ctx.progress = tok, calib_data, progress
    preflight(model, recipe, ctx)           # refuse bad group sizes etc. before the hash and the work
    source = {"spec": str(model_spec), "path": str(src), "sha256": weights_hash(src)}
    compress_(model, recipe, ctx)
    checkpoint.save(model, tok, out, recipe=recipe.to_dict(), module_specs=ctx.module_specs,
                    layer_stats=ctx.layer_stats, source=source, overwrite=overwrite)
    return CompressResult(out=out, model=model, tokenizer=tok, seconds=time.perf_counter() - t0,
                          source_bytes=dir_bytes(src), out_bytes=dir_bytes(out), ctx=ctx)
