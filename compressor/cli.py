"""`compress`: the command line. It parses arguments and calls the Python API; nothing more.

    compress --recipe NAME_OR_PATH MODEL -o OUT [--calib-data FILE] [--train-data FILE]
             [--eval-data FILE] [--eval-windows N] [--seqlen L] [--overwrite] [--resume]
    compress recipes

A recipe that needs calibration or training text and gets none uses `compressor.calib.default_text_file`
($COMPRESSOR_DATA/wikitext2-valid.tokens, else ../shared/data/wikitext2-valid.tokens) and says so.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

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
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists; discard old training state")
    p.add_argument("--resume", action="store_true", help="continue an interrupted training run from its state in OUT.work/")
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

    import torch

    from . import checkpoint
    from .api import check_output, compress
    from .calib import tokenize_file
    from .eval import perplexity
    from .models import load_hf, resolve
    from .passes import Context
    from .recipe import load_recipe

    con = Console(stderr=False)
    t0 = time.perf_counter()
    recipe = load_recipe(args.recipe)                      # unknown recipe / key: fails here, before work
    out = Path(args.out)
    check_output(out, args.overwrite, args.resume)
    for flag, f in (("--eval-data", args.eval_data), ("--calib-data", args.calib_data),
                    ("--train-data", args.train_data)):
        if f is not None and not Path(f).is_file():
            raise FileNotFoundError(f"{flag} {f!r} does not exist")
    if args.eval_windows is not None and args.eval_windows < 1:
        raise ValueError(f"--eval-windows {args.eval_windows} must be at least 1")
    _default_data(recipe, args)
    progress = not args.quiet

    ctx = Context()
    ppl_before = eval_ids = None
    if args.eval_data:
        base, tok = load_hf(resolve(args.model))
        eval_ids = tokenize_file(args.eval_data, tok)

        def evaluate(model, desc="ppl"):
            return perplexity(model, tok, eval_ids, args.seqlen, args.eval_windows, progress, desc)

        ppl_before = evaluate(base, "ppl original")
        del base
        ctx.evaluate = evaluate                            # passes record the stages they find worth it
    res = compress(args.model, recipe, out, calib_data=args.calib_data, train_data=args.train_data,
                   overwrite=args.overwrite, resume=args.resume, progress=progress, ctx=ctx)
    stages = list(ctx.evals.items())
    ppl_mem = ppl_after = logit_diff = None
    if args.eval_data and recipe.artifact == "checkpoint":
        ppl_mem = evaluate(res.model, "ppl compressed")
        ppl_after = evaluate(checkpoint.load(out), "ppl reloaded")
        stages.append((f"{' + '.join(ctx.applied)} (reloaded)", ppl_after))
    elif args.eval_data:                                   # adapter: measured in memory by the lora pass
        ppl_after = stages[-1][1]
        x = eval_ids[:min(256, eval_ids.numel())].unsqueeze(0)
        with torch.no_grad():
            logit_diff = float((checkpoint.load(out)(input_ids=x).logits - res.model(input_ids=x).logits).abs().max())

    t = Table(title=f"compress {args.model} --recipe {recipe.source}", show_lines=False)
    t.add_column("")
    t.add_column("original", justify="right")
    t.add_column("compressed", justify="right")
    t.add_column("ratio", justify="right")
    label = "weights on disk" if recipe.artifact == "checkpoint" else "weights on disk (adapter only)"
    t.add_row(label, _mib(res.source_bytes), _mib(res.out_bytes), f"{res.out_bytes / res.source_bytes:.3f}x")
    if ppl_before is not None:
        t.add_row(f"perplexity ({args.eval_windows or 'all'} x {args.seqlen} tok)", f"{ppl_before:.3f}",
                  f"{ppl_after:.3f}", f"{ppl_after / ppl_before:.4f}x")
        if ppl_mem is not None:
            t.add_row("  in-memory vs reloaded", f"{ppl_mem:.3f}", f"{ppl_after:.3f}",
                      f"{abs(ppl_after - ppl_mem) / ppl_mem * 100:.4f}% apart")
        if logit_diff is not None:
            t.add_row("  reloaded adapter vs in-memory", "", f"max |dlogit| {logit_diff:.2e}", "")
    t.add_row("wall time", "", f"{time.perf_counter() - t0:.1f} s", "")
    con.print(t)
    if ppl_before is not None and len(stages) > 1:
        s = Table(title="perplexity by stage", show_lines=False)
        for c in ("stage", "perplexity", "vs original", "recovered"):
            s.add_column(c, justify="left" if c == "stage" else "right")
        s.add_row("original (fp32)", f"{ppl_before:.3f}", "1.0000x", "")
        prev = ppl_before
        for name, ppl in stages:
            rec = f"{(prev - ppl) / (prev - ppl_before) * 100:.1f}%" if ppl < prev and prev > ppl_before else ""
            s.add_row(name, f"{ppl:.3f}", f"{ppl / ppl_before:.4f}x", rec)
            prev = ppl
        con.print(s)
    con.print(f"wrote {out}")
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
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        from .api import work_dir_for
        work = work_dir_for(args.out)
        kept = f"; training state kept in {work}: rerun with --resume to continue" if any(work.glob("*.pt")) else ""
        print(f"compress: interrupted; no output was written{kept}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        print(f"compress: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
