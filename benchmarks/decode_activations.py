"""What the batch-decode kernels' int8 activations cost: teacher-forced decoding, exact against int8.

On AVX-512 VNNI, the batched single-token steps of `compressor.load(...).generate` (FastDecoder) round
their activations to int8 per block (csrc/cpu/kernels.h, BatchGemv); batch 1 and prompts are exact, and
so is everything with COMPRESSOR_EXACT_DECODE=1. This decodes `--rows`
slices of wikitext-2 test token by token at batch `--rows` (a `--prompt`-token prefill, then
`--tokens` single-token steps, each scored against the next true token), once with every call exact
and once with the default kernels, and prints the perplexity of the decoded tokens and the SQNR of
the logits of the two runs.

    python benchmarks/decode_activations.py [--checkpoint DIR] [--rows 8]

Without --checkpoint it uses (or builds, as bench_decode.py does) out/ckpt/smollm2-gptq-w4g64.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_decode import DEFAULT_CALIB, _checkpoint  # noqa: E402  (builds a missing checkpoint)


def decode_nll(fast, rows: torch.Tensor, prompt: int) -> tuple[float, list[torch.Tensor]]:
    """Summed next-token NLL of rows[:, prompt:] decoded one token at a time, and the logits of each step."""
    r, n = rows.shape
    caches = fast.caches(r, n)
    logits = fast.forward(rows[:, :prompt], 0, caches)
    nll, seen = 0.0, []
    for i in range(prompt, n):
        seen.append(logits)
        nll += float(F.cross_entropy(logits, rows[:, i], reduction="sum"))
        if i + 1 < n:
            logits = fast.forward(rows[:, i:i + 1], i, caches)
    return nll, seen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", help="a checkpoint from `compress` (llama architecture, all blocks packed); "
                    "default: gptq-w4g64 of SmolLM2-135M, built if missing")
    ap.add_argument("--calib-data", default=str(DEFAULT_CALIB))
    ap.add_argument("--eval-data", default=str(ROOT.parent / "shared" / "data" / "wikitext2-test.txt"))
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    for what, path in (("--checkpoint", args.checkpoint), ("--eval-data", args.eval_data)):
        if path and not Path(path).exists():
            ap.error(f"{what} {path} does not exist")
    if not 2 <= args.rows < 32:
        ap.error(f"--rows {args.rows}: the int8 kernels serve 2-31 rows")
    torch.set_num_threads(args.threads)

    import compressor
    from compressor.kernels import extension
    from transformers import AutoTokenizer
    if os.environ.get("COMPRESSOR_EXACT_DECODE") == "1":
        ap.error("COMPRESSOR_EXACT_DECODE=1 is set: this compares it with the default, unset it")
    if extension is None or not extension.int8_supported():
        print("decode_activations: this CPU's kernels have no int8 batch path (AVX-512 VNNI only): nothing to "
              "compare", file=sys.stderr)
        return 2
    args.checkpoint = _checkpoint("gptq-w4g64", args.checkpoint, args.calib_data)
    if args.checkpoint is None:
        return 2
    model = compressor.load(args.checkpoint)
    fast = getattr(model.generate, "fast", None)
    if fast is None:
        print(f"decode_activations: {args.checkpoint} has no fast decode path", file=sys.stderr)
        return 2
    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    span = args.prompt + args.tokens
    ids = tok(Path(args.eval_data).read_text()[:400_000]).input_ids
    if len(ids) < 5000 + args.rows * span:
        ap.error(f"--eval-data has {len(ids)} tokens, fewer than {5000 + args.rows * span} needed")
    rows = torch.tensor([ids[5000 + i * span:5000 + (i + 1) * span] for i in range(args.rows)])

    with torch.inference_mode():
        os.environ["COMPRESSOR_EXACT_DECODE"] = "1"        # FastDecoder's switch, read at every step
        try:
            exact, ref = decode_nll(fast, rows, args.prompt)
        finally:
            os.environ.pop("COMPRESSOR_EXACT_DECODE")
        int8, got = decode_nll(fast, rows, args.prompt)
    n = args.rows * args.tokens
    r, g = torch.cat(ref), torch.cat(got)
    sqnr = 10 * math.log10(float(r.pow(2).sum() / (g - r).pow(2).sum().clamp_min(1e-30)))
    agree = float((r.argmax(-1) == g.argmax(-1)).float().mean())
    print(f"# {args.checkpoint}: {args.rows} rows x {args.tokens} decoded tokens after a {args.prompt}-token prompt, "
          f"wikitext-2 test, {args.threads} threads")
    print("| decode kernels | ppl | Δppl |")
    print("|---|---|---|")
    print(f"| exact (three int8 slices) | {math.exp(exact / n):.4f} | |")
    print(f"| default (int8 activations in batched steps) | {math.exp(int8 / n):.4f} | "
          f"{math.exp(int8 / n) / math.exp(exact / n) - 1:+.2%} |")
    print(f"\nlogits: SQNR {sqnr:.1f} dB; the same argmax at {agree:.1%} of the {n} steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
