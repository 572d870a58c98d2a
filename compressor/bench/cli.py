"""`compress-bench`: the command line of `compressor.bench`. It parses, calls `run`, renders.

    compress-bench BASE [CANDIDATE ...] [--eval-data FILE] [--eval-windows N] [--seqlen L]
                   [--batch 1,8] [--prompt-len 128] [--gen-len 64] [--runs 3] [--threads T]
                   [--price-per-hour USD] [--json OUT.json] [--markdown OUT.md] [--plot OUT.png]
                   [--max-ppl-increase PCT] [--min-speedup X]
                   [--tasks hellaswag,piqa] [--limit N] [--data DIR] [--max-acc-drop PP]
                   [--engine torch,ort,ort:4]

Exit status: 0 ok; 2 bad input (one line on stderr, before any model is loaded); 3 a candidate
failed the gate (the failing rows are named on stderr); 1 a worker failed mid-run.
"""
from __future__ import annotations

import argparse
import sys
import time

__all__ = ["main"]

EXIT_BAD_INPUT, EXIT_GATE, EXIT_WORKER = 2, 3, 1


def _batches(s: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: expected comma-separated batch sizes, e.g. 1,8") from None
    if not out:
        raise argparse.ArgumentTypeError(f"{s!r}: expected comma-separated batch sizes, e.g. 1,8")
    return out


def _parser() -> argparse.ArgumentParser:
    from .config import BenchConfig
    d = BenchConfig()
    p = argparse.ArgumentParser(
        prog="compress-bench",
        description="Size, memory, perplexity, latency, throughput and cost of a base model and its compressed "
                    "variants, measured side by side; optionally a gate that refuses a bad trade.",
        epilog="Models: a named default (smollm2-135m), an HF directory, a compressed checkpoint or a .gguf file, "
               "optionally labelled as NAME=PATH. Exit status 2: bad input; 3: gate failed.")
    p.add_argument("base", help="the reference model; ratios and perplexity increases are against it")
    p.add_argument("candidates", nargs="*", help="models to compare with BASE")
    p.add_argument("--eval-data", help="text file for perplexity (e.g. ../shared/data/wikitext2-test.txt)")
    p.add_argument("--eval-windows", type=int, default=d.eval_windows,
                   help=f"perplexity on the first N windows (default {d.eval_windows}; 0 for all)")
    p.add_argument("--seqlen", type=int, default=d.seqlen, help=f"perplexity window in tokens (default {d.seqlen})")
    p.add_argument("--batch", type=_batches, default=d.batches,
                   help=f"batch sizes, comma-separated (default {','.join(map(str, d.batches))})")
    p.add_argument("--prompt-len", type=int, default=d.prompt_len, help=f"prompt tokens (default {d.prompt_len})")
    p.add_argument("--gen-len", type=int, default=d.gen_len, help=f"generated tokens per run (default {d.gen_len})")
    p.add_argument("--runs", type=int, default=d.runs, help=f"timed runs per model and batch (default {d.runs})")
    p.add_argument("--warmup", type=int, default=d.warmup, help=f"untimed runs first (default {d.warmup})")
    p.add_argument("--prefill-reps", type=int, default=d.prefill_reps,
                   help=f"prompt forwards timed per run, their median taken (default {d.prefill_reps})")
    p.add_argument("--threads", type=int, default=d.threads, help=f"torch threads per model (default {d.threads})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the random prompts")
    p.add_argument("--price-per-hour", type=float, help="hourly price in $ of the deployment machine, for $/1M tokens")
    p.add_argument("--json", help="write every number and the raw per-run samples here")
    p.add_argument("--markdown", help="write the table as Markdown here")
    p.add_argument("--plot", help="write a PNG of quality against cost here")
    p.add_argument("--max-ppl-increase", type=float, help="gate: fail a candidate whose perplexity rises more (%%)")
    p.add_argument("--min-speedup", type=float, help="gate: fail a candidate whose decode speedup is lower (x)")
    p.add_argument("--tasks", help="multiple-choice tasks, comma-separated: hellaswag,piqa (acc_norm columns, "
                                    "paired differences to BASE)")
    p.add_argument("--limit", type=int, help="score only the first N items of each task (quick runs)")
    p.add_argument("--data", help="directory of the task files (default $COMPRESSOR_DATA, else ../shared/data)")
    p.add_argument("--task-precision", default=d.task_precision, choices=("auto", "fp32", "bf16"),
                   help="matmul precision of task scoring (default auto: bf16 where the CPU has it natively)")
    p.add_argument("--max-acc-drop", type=float,
                   help="gate: fail a candidate whose acc_norm drop on a task is significant and larger (pp)")
    p.add_argument("--engine", default="torch",
                   help="runtimes to measure each model in, comma-separated: torch (default), ort (ONNX Runtime on "
                        "an onnx export made for the run, MatMulNBits accuracy_level 0), ort:4 (int8 activations); "
                        "an export directory given as a model runs on its own engine")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from compressor.worker import WorkerError

    from . import report
    from .config import BenchConfig, BenchInputError
    from .runner import run

    args = _parser().parse_args(argv)
    err = Console(stderr=True, highlight=False)
    t0 = time.perf_counter()
    try:
        cfg = BenchConfig(batches=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len, runs=args.runs,
                          prefill_reps=args.prefill_reps,
                          warmup=args.warmup, threads=args.threads, seqlen=args.seqlen,
                          eval_windows=args.eval_windows or None, price_per_hour=args.price_per_hour,
                          max_ppl_increase=args.max_ppl_increase, min_speedup=args.min_speedup, seed=args.seed,
                          tasks=tuple(args.tasks.split(",")) if args.tasks else (), task_limit=args.limit,
                          task_data=args.data, task_precision=args.task_precision, max_acc_drop=args.max_acc_drop,
                          engines=tuple(e.strip() for e in args.engine.split(",") if e.strip()))
        result = run(args.base, args.candidates, eval_data=args.eval_data, config=cfg, progress=not args.quiet)
    except BenchInputError as e:
        print(f"compress-bench: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except WorkerError as e:
        print(f"compress-bench: error: {e}", file=sys.stderr)
        return EXIT_WORKER
    report.print_table(result, Console(width=None if sys.stdout.isatty() else 200))
    for flag, write in ((args.json, report.write_json), (args.markdown, report.write_markdown),
                        (args.plot, report.plot)):
        if flag:
            err.print(f"wrote {write(result, flag)}")
    err.print(f"done in {time.perf_counter() - t0:.0f} s")
    if result.failures:
        for f in result.failures:
            print(f"compress-bench: gate failed: {f}", file=sys.stderr)
        return EXIT_GATE
    return 0


if __name__ == "__main__":
    sys.exit(main())
