"""`compress`: the command line. It parses arguments and calls the Python API; nothing more.

    compress --recipe NAME_OR_PATH MODEL -o OUT [--calib-data FILE] [--train-data FILE]
             [--eval-data FILE] [--eval-windows N] [--seqlen L] [--format F] [--overwrite] [--resume] [--stream]
    compress recipes
    compress export FORMAT CKPT -o OUT [--overwrite] [--pre-tokenizer NAME] [--accuracy-level N] [--head H]
                                           (gptq, gptq-v2, compressed-tensors, gguf, onnx)

A recipe that needs calibration or training text and gets none uses `compressor.calib.default_text_file`
($COMPRESSOR_DATA/wikitext2-valid.tokens, else ../shared/data/wikitext2-valid.tokens) and says so.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compress", description="Compress a language model with a recipe of passes.",
                                epilog="`compress recipes` lists the available recipes.")
    p.add_argument("model", help="HF directory, .gguf file, or a named default (smollm2-135m, minilm-l6)")
    p.add_argument("--recipe", "-r", required=True, help="recipe name (see `compress recipes`) or path to a YAML file")
    p.add_argument("-o", "--out", required=True, help="output directory (written atomically)")
    p.add_argument("--calib-data", help="text file for calibration (default: $COMPRESSOR_DATA/wikitext2-valid.tokens, "
                                        "else ../shared/data/wikitext2-valid.tokens)")
    p.add_argument("--train-data", help="text file for training passes such as lora (same default as --calib-data)")
    p.add_argument("--eval-data", help="text file for perplexity before and after (e.g. ../shared/data/wikitext2-test.txt)")
    p.add_argument("--eval-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--seqlen", type=int, default=2048, help="evaluation window length in tokens (default 2048)")
    p.add_argument("--eval-tasks", help="task accuracy before and after: hellaswag,piqa (files in --data)")
    p.add_argument("--limit", type=int, help="score only the first N items of each task")
    p.add_argument("--data", help="directory of the task files (default $COMPRESSOR_DATA, else ../shared/data)")
    p.add_argument("--task-precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="matmul precision of task scoring (default auto: bf16 where the CPU has it natively)")
    p.add_argument("--max-acc-drop", type=float, help="exit 3 if a task's acc_norm drops significantly by more (pp); "
                                                      "the checkpoint is written either way")
    p.add_argument("--format", help="write OUT in this format instead of the recipe's save: {format: ...} or the native "
                                    "gptq checkpoint: gptq, gptq-v2, compressed-tensors, gguf (see compress export)")
    p.add_argument("--pre-tokenizer", help="with --format gguf: llama.cpp's pre-tokenizer name, for a tokenizer "
                                           "compressor does not recognise")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists; discard old training state")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its progress in OUT.work/ (refused if the run differs)")
    p.add_argument("--stream", action="store_true",
                   help="read one decoder block at a time from the source shards and write the checkpoint tensor by "
                        "tensor, for models bigger than memory (same bytes; no --eval-data or --format)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return p


def _list_recipes() -> int:
    from rich.console import Console
    from rich.table import Table

    from .recipe import list_recipes
    t = Table("recipe", "description", box=None)
    for name, desc in list_recipes().items():
        t.add_row(name, desc)
    Console().print(t)
    return 0


def _export(argv: list[str]) -> int:
    from .export import FORMATS, export
    from .export import to_compressed_tensors, to_gguf, to_gptq, to_onnx  # noqa: F401  (register)
    p = argparse.ArgumentParser(prog="compress export", description="Repack a compressed checkpoint, without "
                                "re-quantizing, into the format an engine loads.")
    p.add_argument("format", choices=sorted(FORMATS), help="target format")
    p.add_argument("checkpoint", help="a directory written by compress")
    p.add_argument("-o", "--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--pre-tokenizer", help="gguf: llama.cpp's pre-tokenizer name, for a tokenizer compressor "
                                           "does not recognise (e.g. llama-bpe, qwen2, gpt-2)")
    p.add_argument("--accuracy-level", type=int, help="onnx: MatMulNBits accuracy_level, 0 exact fp32 (default), "
                                                      "4 int8 activations (fastest on CPU)")
    p.add_argument("--head", choices=("fp16", "int8"), help="onnx: the tied embedding and head in fp16 (default, "
                                                           "exact) or as 8-bit MatMulNBits")
    args = p.parse_args(argv)
    given = {"pre_tokenizer": args.pre_tokenizer, "accuracy_level": args.accuracy_level, "head": args.head}
    opts = {k: v for k, v in given.items() if v is not None}
    try:
        out = export(args.checkpoint, args.format, args.out, overwrite=args.overwrite, **opts)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as e:
        print(f"compress export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.format}; {FORMATS[args.format].engines})")
    return 0


def _export_options(args) -> dict | None:
    if args.pre_tokenizer and args.format not in (None, "gguf"):
        raise ValueError(f"--pre-tokenizer is a gguf option; --format is {args.format!r}")
    return {"pre_tokenizer": args.pre_tokenizer} if args.pre_tokenizer else None


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _default_data(recipe, args) -> None:
    """Fill --train-data / --calib-data from the default text when the recipe needs them and they are missing."""
    from .calib import default_text_file
    for need, attr, flag, what in ((recipe.needs_train_data, "train_data", "--train-data", "training"),
                                   (recipe.needs_calibration, "calib_data", "--calib-data", "calibration")):
        if need and getattr(args, attr) is None:
            f = default_text_file()
            if f is not None:
                setattr(args, attr, str(f))
                print(f"using {what} text {f} (pass {flag} to choose)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .api import compress
    from .recipe import load_recipe

    con = Console(stderr=False, width=None if sys.stdout.isatty() else 200)
    t0 = time.perf_counter()
    if args.max_acc_drop is not None and not args.eval_tasks:
        raise ValueError("--max-acc-drop needs --eval-tasks (task accuracy is not measured without it)")
    recipe = load_recipe(args.recipe)                      # unknown recipe / key: fails here, before work
    _default_data(recipe, args)                            # compress checks paths, output and windows first
    res = compress(args.model, recipe, args.out, calib_data=args.calib_data, train_data=args.train_data,
                   eval_data=args.eval_data, eval_windows=args.eval_windows, seqlen=args.seqlen,
                   eval_tasks=args.eval_tasks, task_data=args.data, task_limit=args.limit,
                   task_precision=args.task_precision,
                   overwrite=args.overwrite, resume=args.resume, progress=not args.quiet,
                   format=args.format, export_options=_export_options(args), stream=args.stream)
    rep = res.perplexity

    t = Table(title=f"compress {args.model} --recipe {recipe.source}", show_lines=False)
    t.add_column("")
    t.add_column("original", justify="right")
    t.add_column("compressed", justify="right")
    t.add_column("ratio", justify="right")
    label = "weights on disk" if recipe.artifact == "checkpoint" else "weights on disk (adapter only)"
    t.add_row(label, _mib(res.source_bytes), _mib(res.out_bytes), f"{res.out_bytes / res.source_bytes:.3f}x")
    if rep is not None:
        t.add_row(f"perplexity ({args.eval_windows or 'all'} x {args.seqlen} tok)", f"{rep.original:.3f}",
                  f"{rep.final:.3f}", f"{rep.final / rep.original:.4f}x")
        if rep.reload_gap_pct is not None:
            t.add_row("  in-memory vs reloaded" + ("" if res.format == "gptq" else " (native, before export)"), f"{rep.compressed:.3f}", f"{rep.reloaded:.3f}",
                      f"{rep.reload_gap_pct:.4f}% apart")
        if rep.reload_max_dlogit is not None:
            t.add_row("  reloaded adapter vs in-memory", "", f"max |dlogit| {rep.reload_max_dlogit:.2e}", "")
    if res.tasks is not None:
        for task, p in res.tasks.paired().items():
            n, prec = res.tasks.original[task].n, res.tasks.original[task].precision
            t.add_row(f"{task} acc_norm ({n} items, {prec})", f"{p.base * 100:.1f}%", f"{p.candidate * 100:.1f}%",
                      f"{p.diff_pp:+.1f} pp [{p.ci_pp[0]:+.1f}, {p.ci_pp[1]:+.1f}]")
            t.add_row(f"  {task} acc", f"{res.tasks.original[task].acc * 100:.1f}%",
                      f"{res.tasks.compressed[task].acc * 100:.1f}%", p.verdict())
    if res.kernels is not None:
        t.add_row("quantized layers run on", "", res.kernels, "")
    t.add_row("wall time", "", f"{time.perf_counter() - t0:.1f} s", "")
    con.print(t)
    if rep is not None and len(rep.stages) > 1:
        s = Table(title="perplexity by stage", show_lines=False)
        for c in ("stage", "perplexity", "vs original", "recovered"):
            s.add_column(c, justify="left" if c == "stage" else "right")
        for r in rep.stage_rows():
            s.add_row(r.name, f"{r.ppl:.3f}", f"{r.ratio:.4f}x", "" if r.recovered_pct is None else f"{r.recovered_pct:.1f}%")
        con.print(s)
    if res.format == "gptq":
        con.print(f"wrote {args.out}")
    else:
        from .export import FORMATS
        con.print(f"wrote {args.out} ({res.format}, for {FORMATS[res.format].engines}; repacked from the native "
                  f"checkpoint, which was measured above and removed)")
    if res.tasks is not None and args.max_acc_drop is not None:
        fails = res.tasks.failures(args.max_acc_drop)
        for f in fails:
            print(f"compress: gate failed: {f}", file=sys.stderr)
        if fails:
            return 3
    return 0


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_transformers()
    if argv[:1] == ["recipes"]:
        return _list_recipes()
    if argv[:1] == ["export"]:
        return _export(argv[1:])
    args = _parser().parse_args(argv)
    from .errors import NumericError
    try:
        return run(args)
    except KeyboardInterrupt:
        from .api import work_dir_for
        from .workdir import has_progress
        work = work_dir_for(args.out)
        kept = f"; progress kept in {work}: rerun with --resume to continue" if has_progress(work) else ""
        print(f"compress: interrupted; no output was written{kept}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        print(f"compress: error: {e}", file=sys.stderr)
        return 2
    except NumericError as e:                   # the self-check: nothing was written
        print(f"compress: numeric check failed: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
