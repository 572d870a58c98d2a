"""`compress`: the command line. It parses arguments and calls the Python API; nothing more.

    compress --recipe NAME_OR_PATH MODEL -o OUT [--calib-data FILE] [--eval-data FILE]
             [--eval-windows N] [--seqlen L] [--overwrite]
    compress recipes
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
    p.add_argument("--calib-data", help="text file for calibration (e.g. ../shared/data/wikitext2-valid.tokens)")
    p.add_argument("--eval-data", help="text file for perplexity before and after (e.g. ../shared/data/wikitext2-test.txt)")
    p.add_argument("--eval-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--seqlen", type=int, default=2048, help="evaluation window length in tokens (default 2048)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
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


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from . import checkpoint
    from .api import compress
    from .eval import perplexity
    from .models import load_hf, resolve
    from .recipe import load_recipe

    con = Console(stderr=False)
    t0 = time.perf_counter()
    recipe = load_recipe(args.recipe)                      # unknown recipe / key: fails here, before work
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"output {str(out)!r} already exists; pass --overwrite to replace it")
    for flag, f in (("--eval-data", args.eval_data), ("--calib-data", args.calib_data)):
        if f is not None and not Path(f).is_file():
            raise FileNotFoundError(f"{flag} {f!r} does not exist")
    if args.eval_windows is not None and args.eval_windows < 1:
        raise ValueError(f"--eval-windows {args.eval_windows} must be at least 1")
    progress = not args.quiet

    ppl_before = None
    if args.eval_data:
        base, tok = load_hf(resolve(args.model))
        ppl_before = perplexity(base, tok, args.eval_data, args.seqlen, args.eval_windows, progress, "ppl original")
        del base
    res = compress(args.model, recipe, out, calib_data=args.calib_data, overwrite=args.overwrite, progress=progress)
    ppl_mem = ppl_after = None
    if args.eval_data:
        ppl_mem = perplexity(res.model, res.tokenizer, args.eval_data, args.seqlen, args.eval_windows, progress,
                             "ppl compressed")
        reloaded = checkpoint.load(out)
        ppl_after = perplexity(reloaded, res.tokenizer, args.eval_data, args.seqlen, args.eval_windows, progress,
                               "ppl reloaded")

    t = Table(title=f"compress {args.model} --recipe {recipe.source}", show_lines=False)
    t.add_column("")
    t.add_column("original", justify="right")
    t.add_column("compressed", justify="right")
    t.add_column("ratio", justify="right")
    t.add_row("weights on disk", _mib(res.source_bytes), _mib(res.out_bytes), f"{res.out_bytes / res.source_bytes:.3f}x")
    if ppl_before is not None:
        t.add_row(f"perplexity ({args.eval_windows or 'all'} x {args.seqlen} tok)", f"{ppl_before:.3f}",
                  f"{ppl_after:.3f}", f"{ppl_after / ppl_before:.4f}x")
        t.add_row("  in-memory vs reloaded", f"{ppl_mem:.3f}", f"{ppl_after:.3f}",
                  f"{abs(ppl_after - ppl_mem) / ppl_mem * 100:.4f}% apart")
    t.add_row("wall time", "", f"{time.perf_counter() - t0:.1f} s", "")
    con.print(t)
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
        print("compress: interrupted; no output was written", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        print(f"compress: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
