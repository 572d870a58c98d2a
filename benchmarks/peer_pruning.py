"""Peer row for pruning: llm-compressor's SparseGPT / Wanda oneshot on CPU, scored like ours.

Runs in a separate venv that has llmcompressor (it pins a different transformers), not in the
project's environment, and imports nothing from `compressor` (so the calibration windows and the
perplexity loop are small copies of `compressor.calib` and `compressor.eval`: same windows, same
protocol). The venv:

    python -m venv /work/lc-venv && echo torch==2.13.0 > /tmp/c.txt
    /work/lc-venv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1 -c /tmp/c.txt


    /work/lc-venv/bin/python benchmarks/peer_pruning.py --model DIR --method sparsegpt \\
        --sparsity 0.5 [--pattern 2:4] --samples 64 --seqlen 512 --windows 16 \\
        --calib ../shared/data/wikitext2-valid.tokens --eval ../shared/data/wikitext2-test.txt --threads 2

DIR is an fp32 HF directory, e.g. the one `compressor.models.resolve("smollm2-135m")` returns
(~/.cache/compressor/models/smollm2-135m).

What it measures, printed as one JSON line:
  * oneshot_seconds: wall clock of the `oneshot` call alone (llm-compressor's sequential pipeline:
    per decoder layer, calibrate, prune, propagate), not loading or evaluation;
  * ppl: perplexity on the first --windows non-overlapping 2048-token windows of the tokenized
    eval text (whole file tokenized once, no special tokens, seqlen - 1 predictions per window),
    the same protocol as compressor.eval.perplexity, so the figures compare;
  * zeros_fraction: exact zeros over the weights of the targeted Linears (decoder layers, not lm_head).

Calibration uses the same windows as compressor.calib.calibration_windows (seed 0): n windows of
seqlen tokens at seeded random offsets of the tokenized calibration text.

--pattern follows compressor's convention, "N:M" = keep N of every M. llm-compressor's
mask_structure counts the *pruned* weights, so it is passed as "(M-N):M" (the same for 2:4).
With a pattern, llm-compressor ignores --sparsity (the pattern fixes it).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F


def tokenize_file(path, tokenizer) -> torch.Tensor:
    """Copy of compressor.calib.tokenize_file: the whole file tokenized once, 1-D int64."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0].to(torch.int64)


def calibration_windows(path, tokenizer, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Copy of compressor.calib.calibration_windows: (n, seqlen) windows at seeded random offsets."""
    ids = tokenize_file(path, tokenizer)
    if ids.numel() <= seqlen:
        raise ValueError(f"calibration file {str(path)!r} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def _window_nll(model, x: torch.Tensor, chunk: int = 512) -> float:
    """Copy of compressor.eval._window_nll: summed NLL of x[0, 1:], head applied in chunks."""
    decoder = getattr(model, "get_decoder", lambda: None)()
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if decoder is None or head is None or getattr(model.config, "final_logit_softcapping", None):
        logits = model(x, use_cache=False).logits[0, :-1].float()
        return F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
    h = decoder(input_ids=x, use_cache=False).last_hidden_state[0, :-1]
    scale = getattr(model.config, "logit_scale", None) or 1.0
    total = 0.0
    for i in range(0, h.shape[0], chunk):
        logits = head(h[i:i + chunk]).float() * scale
        total += F.cross_entropy(logits, x[0, 1 + i:1 + i + chunk], reduction="sum").item()
    return total


@torch.no_grad()
def perplexity(model, tokenizer, path, seqlen: int = 2048, max_windows: int | None = None) -> float:
    """Same protocol as compressor.eval.perplexity (trailing partial window dropped)."""
    ids = tokenize_file(path, tokenizer)
    n = ids.numel() // seqlen if max_windows is None else min(ids.numel() // seqlen, max_windows)
    if n < 1:
        raise ValueError(f"eval text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    model.eval()
    nll, count = 0.0, 0
    for i in range(n):
        nll += _window_nll(model, ids[i * seqlen:(i + 1) * seqlen].unsqueeze(0))
        count += seqlen - 1
    return math.exp(nll / count)


def target_linears(model) -> dict[str, torch.nn.Linear]:
    """The Linears of the decoder layers (everything the modifier prunes; lm_head excluded)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}" and not n.endswith("lm_head")}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="fp32 HF model directory")
    ap.add_argument("--method", choices=["sparsegpt", "wanda"], required=True)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--pattern", default=None, help="N:M, keep N of every M (compressor's convention)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16, help="eval windows of 2048 tokens")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dampening-frac", type=float, default=0.01, help="SparseGPT only (llm-compressor's default)")
    ap.add_argument("--block-size", type=int, default=128, help="SparseGPT only (llm-compressor's default)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(args.model)

    win = calibration_windows(args.calib, tok, args.samples, args.seqlen, seed=0)
    ds = Dataset.from_dict({"input_ids": win.tolist(), "attention_mask": torch.ones_like(win).tolist()})

    mask_structure = "0:0"
    if args.pattern:
        keep, m = (int(v) for v in args.pattern.split(":"))
        mask_structure = f"{m - keep}:{m}"
    common = dict(sparsity=args.sparsity, mask_structure=mask_structure, targets=["Linear"], ignore=["re:.*lm_head"])
    if args.method == "sparsegpt":
        modifier = SparseGPTModifier(**common, dampening_frac=args.dampening_frac, block_size=args.block_size)
    else:
        modifier = WandaPruningModifier(**common)

    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=modifier, num_calibration_samples=args.samples,
            max_seq_length=args.seqlen, shuffle_calibration_samples=False, pipeline="sequential")
    oneshot_seconds = time.perf_counter() - t0

    lin = target_linears(model)
    zeros = sum(int((m.weight == 0).sum()) for m in lin.values())
    total = sum(m.weight.numel() for m in lin.values())
    ppl = perplexity(model, tok, args.eval, seqlen=2048, max_windows=args.windows)

    row = {"peer": "llm-compressor", "version": version("llmcompressor"), "method": args.method,
           "sparsity": args.sparsity, "pattern": args.pattern, "samples": args.samples, "seqlen": args.seqlen,
           "oneshot_seconds": round(oneshot_seconds, 3), "ppl": ppl, "zeros_fraction": zeros / total,
           "windows": args.windows, "mask_structure": mask_structure, "targeted_linears": len(lin),
           "torch": torch.__version__, "threads": args.threads}
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
