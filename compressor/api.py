"""The Python API: `compress_` applies a recipe to a model in place; `compress` is the whole job
(resolve, load once, preflight, passes, save, and with ``eval_data`` perplexity before, by stage,
after and reloaded) that the CLI calls.

Checks: `preflight` runs before any work (data the recipe needs; the first pass against the model;
every later pass that no shape-changing pass precedes against the Linear shapes), and each pass's
`check` runs again just before it, on the model it will see.

A run keeps its progress in a work directory beside the output, ``OUT.work/`` (`compressor.workdir`):
training state, each finished block of a calibrated pass, the model after each finished pass, under a
fingerprint of the source, data, recipe, versions and threads. It survives a crash and is removed after a
successful save; ``resume=True`` continues from it (bit-identical weights), and refuses a different run's.
"""
from __future__ import annotations

import copy
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import checkpoint, workdir
from .eval import PerplexityReport, perplexity
from .machine import release_memory
from .errors import NumericError
from .models import load_hf, resolve, weights_hash
from .preflight import check_fits, estimate, peak_rss_mib
from .passes import Context
from .recipe import Recipe, load_recipe

__all__ = ["compress_", "compress", "CompressResult", "preflight", "check_output", "work_dir_for", "linear_shapes"]

log = logging.getLogger("compressor")


def _as_recipe(recipe: Recipe | str | Path) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{name: (in_features, out_features)} of every Linear-like module (float, quantized or NF4)."""
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int)}


def preflight(model: nn.Module, recipe: Recipe | str | Path, ctx: Context | None = None) -> Recipe:
    """Checks before any work; raises ValueError naming the problem. See the module docstring."""
    recipe = _as_recipe(recipe)
    ctx = ctx or Context()
    if recipe.needs_calibration and ctx.calib_data is None:
        raise ValueError(f"recipe {recipe.source!r} needs calibration data: pass --calib-data FILE "
                         f"(for example ../shared/data/wikitext2-valid.tokens)")
    if recipe.needs_train_data and ctx.train_data is None:
        raise ValueError(f"recipe {recipe.source!r} needs training text: pass --train-data FILE "
                         f"(for example ../shared/data/wikitext2-valid.tokens)")
    for name, t in model.named_parameters():     # NaN/Inf in the source is named now, not after hours
        if t.device.type != "meta" and t.is_floating_point() and not torch.isfinite(t).all():
            raise NumericError(f"{name}: {int((~torch.isfinite(t)).sum())} NaN/Inf values in the source model's "
                               f"weights; nothing can be compressed from them")
    if ctx.stream is not None:
        from .stream import StreamError
        for p in recipe.passes:
            why = p.stream_refusal(model)
            if why:
                raise StreamError(f"--stream: {why}; run without --stream")
    shapes = linear_shapes(model)
    for i, p in enumerate(recipe.passes):
        if i == 0:
            p.check(model, ctx)
        else:
            p.check_shapes(shapes)
        if p.changes_shapes:
            break
    return recipe


def compress_(model: nn.Module, recipe: Recipe | str | Path, ctx: Context | None = None) -> nn.Module:
    """Apply every pass of `recipe` to `model`, in place, and return it.

    `ctx` carries calibration data, the tokenizer and progress; it collects per-layer statistics.
    A recipe that distils from the original model uses `ctx.original`, or else a deep copy of
    `model` taken here. Each pass is checked against the model it will see just before it runs.
    Passes may return a different object (lora returns a peft model, or the merged float model):
    use the return value.
    """
    recipe = _as_recipe(recipe)
    ctx = ctx or Context()
    _set_calibration(recipe, ctx)
    if recipe.needs_original and ctx.original is None:
        snapshot = copy.deepcopy(model)            # the teacher, taken before any pass changes the model
        ctx.original = lambda: snapshot
    preflight(model, recipe, ctx)
    start = _resume_passes(model, ctx) if ctx.work_dir is not None and ctx.resume else 0
    known = {type(m) for m in model.modules()}     # what a fresh load rebuilds; other types need a format
    for i, p in enumerate(recipe.passes):
        if i < start:
            continue
        p.check(model, ctx)
        t0 = time.perf_counter()
        ctx.pass_index, ctx.pass_name = i, p.name
        before = type(model)
        if ctx.stream is not None:
            ctx.stream.begin_pass(i, p.name)
        model = p.apply(model, ctx)
        ctx.pass_index = None
        ctx.applied.append(p.name)
        ctx.record(f"pass:{p.name}", seconds=round(time.perf_counter() - t0, 3))
        if ctx.stream is not None:                 # its blocks are committed; the marker lets a resume skip it
            if i < len(recipe.passes) - 1:
                _commit_pass(model, ctx, i, streamed=True)
            ctx.stream.end_pass()
        elif ctx.work_dir is not None and i < len(recipe.passes) - 1 and type(model) is before \
                and workdir.committable(model, known):
            _commit_pass(model, ctx, i)            # a later crash resumes after this pass
        release_memory()                           # the next pass starts from what this one freed
    return model


def _set_calibration(recipe: Recipe, ctx: Context) -> None:
    """The recipe's ``calibration:`` settings into `ctx` (dropping windows drawn under other settings)."""
    names = {"samples": "calib_samples", "seqlen": "calib_seqlen", "seed": "seed"}
    for k, v in recipe.calibration.items():
        if getattr(ctx, names[k]) != v:
            setattr(ctx, names[k], v)
            ctx._calib = None


_CTX_STATE = ("applied", "evals", "training", "layer_stats")


def _commit_pass(model: nn.Module, ctx: Context, index: int, streamed: bool = False) -> None:
    """The model after pass `index`, whole, and the context the later passes read: `OUT.work/pass-NN.done`.
    The pass's block commits are dropped after (the whole model supersedes them). A streamed run commits
    the context alone: its blocks stay where the pass committed them, for the next pass to read."""
    tensors, meta = _stem_modules(model) if streamed else workdir.save_modules(model)
    meta["context"] = {k: getattr(ctx, k) for k in _CTX_STATE}
    meta["pass"] = ctx.applied[-1]
    workdir.commit(workdir.done_dir(ctx.work_dir, index), tensors, meta)
    if not streamed:
        shutil.rmtree(workdir.pass_dir(ctx.work_dir, index, ctx.applied[-1]), ignore_errors=True)
    if index:
        shutil.rmtree(workdir.done_dir(ctx.work_dir, index - 1), ignore_errors=True)


def _stem_modules(model: nn.Module) -> tuple[dict, dict]:
    """A streamed pass's commit: the modules outside the decoder blocks that hold real tensors (a quantized
    head; the float stem is re-read from the source), as `workdir.save_modules` records them."""
    from .nn.formats import format_of, module_spec
    from .sequential import find_blocks
    prefix, _ = find_blocks(model)
    outside = lambda n: n != prefix and not n.startswith(prefix + ".")  # noqa: E731
    keep = {n: t.detach().cpu() for n, t in workdir._tensors(model) if outside(n) and not t.is_meta}
    mods = {n: module_spec(m) for n, m in model.named_modules()
            if n and outside(n) and format_of(m) is not None and type(m) is not nn.Linear}
    return keep, {"modules": mods, "ties": {}, "partial": True}


def _resume_passes(model: nn.Module, ctx: Context) -> int:
    """Restore the last committed pass into `model` and `ctx`; the index of the first pass still to run."""
    done = sorted(int(d.name[5:7]) for d in ctx.work_dir.glob("pass-??.done") if d.is_dir())
    if not done:
        return 0
    tensors, meta = workdir.read_commit(workdir.done_dir(ctx.work_dir, done[-1]))
    if ctx.stream is not None:
        ctx.stream.resume_after(done[-1], meta["pass"])
    if meta.get("modules") is not None:       # a streamed commit holds what changed outside the blocks (a head)
        workdir.restore_modules(model, tensors, meta)
        from .nn.qembedding import TiedQuantEmbedding, tie_quant_embeddings_
        tie_quant_embeddings_(model)
        if any(isinstance(m, TiedQuantEmbedding) for m in model.modules()):
            model.config.tie_word_embeddings = False
    for k in _CTX_STATE:
        setattr(ctx, k, meta["context"][k])
    log.info("resuming after pass %d (%s)", done[-1], ctx.applied[-1] if ctx.applied else "?")
    return done[-1] + 1


@dataclass
class CompressResult:
    out: Path
    model: nn.Module
    tokenizer: Any
    seconds: float
    source_bytes: int
    out_bytes: int
    ctx: Context = field(repr=False, default=None)
    perplexity: PerplexityReport | None = None     # with eval_data
    kernels: str | None = None                     # what the checkpoint's quantized layers run on
    tasks: Any = None                              # compressor.tasks.TaskReport, with eval_tasks
    format: str = "gptq"                           # what `out` holds (`compressor.export.FORMATS`)
    preflight: Any = None                          # compressor.preflight.Estimate, made before any work


def dir_bytes(path: Path) -> int:
    """Bytes of the weight files (safetensors, gguf, onnx and its external data) in a model directory."""
    return sum(f.stat().st_size for f in Path(path).iterdir()
               if f.suffix in (".safetensors", ".gguf", ".onnx", ".onnx_data"))


def work_dir_for(out: str | Path) -> Path:
    """Where training state lives while `out` is being made: ``OUT.work`` beside it."""
    out = Path(out)
    return out.parent / f"{out.name}.work"


def check_output(out: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Refuse an existing `out` (unless `overwrite`) and a work directory that does not fit `resume`.

    Returns the work directory. Nothing is changed on disk.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {str(out)!r} already exists; pass --overwrite to replace it")
    work = work_dir_for(out)
    if resume:
        if not workdir.has_progress(work):
            raise FileNotFoundError(f"--resume: no progress in {str(work)!r} to continue from "
                                    f"(run without --resume to start)")
    elif workdir.has_progress(work) and not overwrite:
        raise FileExistsError(f"{str(work)!r} holds the progress of an interrupted run; pass --resume to "
                              f"continue it or --overwrite to start over")
    return work


def compress(model_spec: str, recipe: Recipe | str | Path, out: str | Path, *, calib_data: str | None = None,
             train_data: str | None = None, eval_data: str | Path | None = None, eval_windows: int | None = None,
             seqlen: int = 2048, eval_tasks=None, task_data: str | Path | None = None, task_limit: int | None = None,
             task_precision: str = "auto", overwrite: bool = False, resume: bool = False, progress: bool = True,
             format: str | None = None, export_options: dict[str, Any] | None = None, stream: bool = False,
             ctx: Context | None = None) -> CompressResult:
    """Resolve `model_spec`, apply `recipe` and write the result to `out` atomically.

    The result is a compressed checkpoint, or peft's adapter directory when the recipe ends with
    ``lora: {save: adapter}`` (`compressor.load` reads both). Training state is kept in
    `work_dir_for(out)` until the save succeeds; `resume` continues from it.

    With `eval_data` (a text file), `CompressResult.perplexity` holds the perplexity of the original
    model, of every stage a pass reports, of the compressed model in memory and of the checkpoint
    reloaded from disk (for an adapter, the max logit difference of the reloaded one), on the first
    `eval_windows` windows of `seqlen` tokens. The source model is loaded once.

    With `eval_tasks` (e.g. ``"hellaswag,piqa"``), `CompressResult.tasks` is a
    `compressor.tasks.TaskReport`: each task's accuracy for the original and for the result as saved
    (the checkpoint reloaded from disk), on the first `task_limit` items of the files in `task_data`.

    `format` (with `export_options`), else the recipe's ``save: {format: ...}``, names what `out`
    holds: the native checkpoint (``gptq``, the default) or an export (`compressor.export.FORMATS`).
    For an export the native checkpoint is written to the work directory first; the reload check and
    the task accuracy are measured on it, then it is repacked into `out` and removed.

    With `stream`, the model is never whole in memory (`compressor.stream`): each pass reads one decoder block
    at a time from the source shards (or the previous pass's), and the checkpoint is written tensor by tensor;
    the result is byte-identical. Evaluation and exports need the whole model and are refused.
    """
    out = Path(out)
    recipe = _as_recipe(recipe)
    from .export import NATIVE, check_plan
    save = {**({"format": format} if format else recipe.save), **(export_options or {})}
    fmt = save.pop("format", NATIVE)
    check_plan(fmt, save, recipe)           # unknown format / option, act-order for gguf, ...: before any work
    work = check_output(out, overwrite, resume)
    for flag, f in (("calibration", calib_data), ("training", train_data), ("evaluation", eval_data)):
        if f is not None and not Path(f).is_file():
            raise FileNotFoundError(f"{flag} file {str(f)!r} does not exist")
    if eval_windows is not None and eval_windows < 1:
        raise ValueError(f"eval_windows={eval_windows} must be at least 1")
    task_items = None
    if eval_tasks:
        from . import tasks as _tasks
        task_items = _tasks.load_tasks(eval_tasks, task_data, task_limit)     # bad names and files fail here
        task_precision = _tasks.resolve_precision(task_precision)
    if recipe.artifact is None:
        raise ValueError(f"recipe {recipe.source!r} leaves the model {recipe.final_state.value}, which has no "
                         f"checkpoint format; end the recipe with a lora pass (save: adapter), or use compress_ to "
                         f"keep the model in memory")
    if stream:
        _check_streamable(recipe, fmt, eval_data, eval_tasks)
    t0 = time.perf_counter()
    src = resolve(model_spec)
    model, tok = _load_streamed(src) if stream else load_hf(src)
    check_plan(fmt, save, recipe, getattr(model.config, "model_type", None))
    ctx = ctx or Context()
    ctx.tokenizer, ctx.calib_data, ctx.train_data, ctx.progress = tok, calib_data, train_data, progress
    ctx.work_dir, ctx.resume = work, resume
    ctx.original = lambda: load_hf(src, private=False)[0]  # re-read from disk (mapped) only when a pass asks
    if stream:
        from .stream import Stream
        ctx.stream = Stream(src, model, work)       # the source's shards are checked here, before any work
    preflight(model, recipe, ctx)           # refuse bad group sizes etc. before the hash and the work
    _set_calibration(recipe, ctx)
    est = estimate(model, recipe, ctx)      # RAM, disk, time: printed, and refused when it cannot fit
    log.info("%s", est.describe())
    if progress:
        print(est.describe(), file=sys.stderr, flush=True)
    check_fits(est, out)
    report = None
    if eval_data is not None:
        from .calib import tokenize_file
        eval_ids = tokenize_file(eval_data, tok)

        def evaluate(m: nn.Module, desc: str = "ppl") -> float:
            return perplexity(m, tok, eval_ids, seqlen, eval_windows, progress, desc)

        report = PerplexityReport(eval_windows, seqlen, evaluate(model, "ppl original"))
        ctx.evaluate = evaluate                   # passes record the stages they find worth it
    task_report = None
    if task_items is not None:
        task_report = _tasks.TaskReport(_tasks.evaluate_items(model, tok, task_items, precision=task_precision,
                                                              progress=progress, label="original"))
    ctx.source = {"spec": str(model_spec), "path": str(src), "sha256": weights_hash(src)}
    if work.exists() and not resume:        # --overwrite: the old progress is discarded
        shutil.rmtree(work)
    fp = workdir.fingerprint(source_sha256=ctx.source["sha256"], recipe=recipe.to_dict(),
                             calibration=ctx.calibration() if recipe.needs_calibration else None,
                             calib_data=calib_data, train_data=train_data, stream=stream)
    if resume:
        workdir.check_fingerprint(work, fp)     # a different run's progress is refused, field by field
    else:
        workdir.write_fingerprint(work, fp)
    try:
        model = compress_(model, recipe, ctx)
    except BaseException:
        if not workdir.has_progress(work):      # nothing committed yet: leave nothing behind
            shutil.rmtree(work, ignore_errors=True)
        raise
    extra = {"training": ctx.training} if ctx.training else {}
    extra["preflight"] = {**est.to_dict(), "measured": {"peak_rss_mib": round(peak_rss_mib(), 1),
                                                        "seconds": round(time.perf_counter() - t0, 1)}}
    if ctx.evals:
        extra["perplexity"] = ctx.evals
    native = out if fmt == NATIVE else work / "checkpoint"      # an export is made from the native checkpoint
    if stream:
        from .stream import write_checkpoint
        write_checkpoint(ctx.stream, tok, out, recipe=recipe.to_dict(), layer_stats=ctx.layer_stats,
                         source=ctx.source, overwrite=overwrite, extra=extra, progress=progress)
    elif recipe.artifact == "adapter":
        checkpoint.save_adapter(model, tok, out, recipe=recipe.to_dict(), source=ctx.source,
                                overwrite=overwrite, extra=extra)
    else:
        checkpoint.save(model, tok, native, recipe=recipe.to_dict(), layer_stats=ctx.layer_stats, source=ctx.source,
                        overwrite=overwrite or native != out, extra=extra)
    if native == out:
        shutil.rmtree(work, ignore_errors=True)
    if report is not None:
        report.stages = list(ctx.evals.items())
        _check_reload(report, model, native, recipe, eval_ids, evaluate, ctx.applied)
    if task_report is not None:
        saved = checkpoint.load(native) if recipe.artifact == "checkpoint" else model   # prepared for inference
        task_report.compressed = _tasks.evaluate_items(saved, tok, task_items, precision=task_precision,
                                                       progress=progress, label="compressed")
        del saved
    if native != out:
        from .export import export
        export(native, fmt, out, overwrite=overwrite, **save)
        shutil.rmtree(work, ignore_errors=True)
    from . import kernels
    from .nn import QuantLinear
    quantized = any(isinstance(m, QuantLinear) for m in model.modules())
    return CompressResult(out=out, model=model, tokenizer=tok, seconds=time.perf_counter() - t0, preflight=est,
                          source_bytes=dir_bytes(src), out_bytes=dir_bytes(out), ctx=ctx, perplexity=report,
                          kernels=kernels.backend() if quantized else None, tasks=task_report,
                          format=fmt)


def _check_streamable(recipe: Recipe, fmt: str, eval_data, eval_tasks) -> None:
    """What --stream cannot do, refused before any work (the passes are checked by `preflight`)."""
    from .export import NATIVE
    from .stream import StreamError
    what = ("--eval-data" if eval_data is not None else "--eval-tasks" if eval_tasks else
            f"--format {fmt}" if fmt != NATIVE else None)
    if what:
        hint = (f"compress export {fmt} OUT afterwards" if what.startswith("--format") else
                "measure the checkpoint afterwards with compress-bench")
        raise StreamError(f"--stream writes the native checkpoint and never holds the whole model, which {what} "
                          f"needs: drop {what.split()[0]} and {hint}")
    if recipe.artifact != "checkpoint":
        raise StreamError(f"--stream: recipe {recipe.source!r} ends in an adapter, which needs the whole model; run "
                          f"without --stream")


def _load_streamed(src: Path):
    """The model of `src` on the meta device (buffers computed), and its tokenizer: what --stream starts from."""
    from transformers import AutoTokenizer

    from .checkpoint import _meta_model
    from .models import read_config
    model = _meta_model(read_config(src), torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(src)


def _check_reload(report: PerplexityReport, model: nn.Module, out: Path, recipe: Recipe, eval_ids, evaluate,
                  applied: list[str]) -> None:
    """Measure the result as saved: a checkpoint's perplexity in memory and reloaded from `out`; an
    adapter's logits reloaded against in memory (its perplexity was measured by the lora pass)."""
    import torch
    if recipe.artifact == "checkpoint":
        report.compressed = evaluate(model, "ppl compressed")
        report.reloaded = evaluate(checkpoint.load(out, for_inference=False), "ppl reloaded")
        report.stages.append((f"{' + '.join(applied)} (reloaded)", report.reloaded))
        return
    x = eval_ids[:min(256, eval_ids.numel())].unsqueeze(0)
    with torch.no_grad():
        report.reload_max_dlogit = float((checkpoint.load(out, for_inference=False)(input_ids=x).logits - model(input_ids=x).logits)
                                         .abs().max())
