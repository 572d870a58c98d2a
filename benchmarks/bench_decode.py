"""Greedy decode speed of SmolLM2-135M: fp32 vs its 4-bit checkpoints vs bitsandbytes NF4 (issue 4).

Batch 1, a 32-token prompt, 128 new tokens (``min_new_tokens`` forces all 128), 2 threads, median
of 5 timed runs after one warm-up. Each runtime runs in a fresh process (`Runtime` through
`compressor.worker.run_once`) so its peak RSS is its own. Prints tokens/s, the ratio to HF fp32
measured in the same run, peak RSS, and how many of the 128 greedy tokens equal fp32's.

Checkpoints: ``--rtn`` / ``--gptq`` paths, or built once into ``out/ckpt/`` with ``compressor.compress``
(the GPTQ one needs calibration text: ``--calib-data``, default ../shared/data/wikitext2-valid.tokens).

    python benchmarks/bench_decode.py [--rtn DIR] [--gptq DIR] [--no-compile] [--out out/bench_decode.json]

Compressed checkpoints load through `compressor.load` and `compressor.nn.prepare_`: 4/8-bit
layers on the packed kernels, and the tied lm_head (stored in fp16) as a `HalfLinear`, which reads
half the bytes of the fp32 head and gives the same logits up to summation order.

Besides eager HF ``generate``, every model except NF4 also runs with a static KV cache and
``torch.compile`` of the forward, which removes most of the per-token Python overhead (30 layers x
7 linears per token); compiling takes a minute or two per model (reported as warm-up), and
``--no-compile`` skips those rows. The ratio column is always against eager HF fp32.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from compressor.worker import WorkerError, run_once  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CALIB = ROOT.parent / "shared" / "data" / "wikitext2-valid.tokens"
PROMPT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
          "structure in Paris. Its base is square, measuring 125 metres on each side. During its construction, "
          "the Eiffel Tower surpassed the Washington Monument to become the tallest man-made structure.")


# ---------------------------------------------------------------------------------------------
# worker: one runtime per process
# ---------------------------------------------------------------------------------------------

def _load(kind: str, path: str | None):
    from compressor.models import load_hf, resolve
    src = resolve("smollm2-135m")
    if kind == "fp32":
        return load_hf(src)
    if kind == "bnb-nf4":
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, device_map="cpu").eval()
        return model, AutoTokenizer.from_pretrained(src)
    import compressor
    from compressor.nn import prepare_
    model, tok = compressor.load(path, with_tokenizer=True)
    return prepare_(model), tok                      # repack now, not inside the first timed token


class Runtime:
    """A fresh process for one runtime: `decode` loads it and times greedy generation."""

    def __init__(self, threads: int):
        torch.set_num_threads(threads)

    def decode(self, kind: str, path: str | None, compiled: bool, prompt: int, tokens: int, runs: int) -> dict:
        model, tok = _load(kind, path)
        ids = tok(PROMPT, return_tensors="pt").input_ids[:, :prompt]
        assert ids.shape[1] == prompt, f"prompt has {ids.shape[1]} tokens, need {prompt}"
        gen = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tok.eos_token_id)
        if compiled:
            gen["cache_implementation"] = "static"
            model.forward = torch.compile(model.forward, dynamic=False)
        times, out = [], None
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model.generate(ids, **gen)             # warm-up (and compilation)
            warmup = time.perf_counter() - t0
            for _ in range(runs):
                t0 = time.perf_counter()
                out = model.generate(ids, **gen)
                times.append(time.perf_counter() - t0)
        new = out[0, ids.shape[1]:].tolist()
        assert len(new) == tokens
        t = statistics.median(times)
        return {"tok_s": tokens / t, "s_per_run": t, "runs": times, "warmup_s": warmup, "tokens": new,
                "peak_rss_mib": peak_rss_mib()}


def peak_rss_mib() -> float:
    """This process's peak RSS. Not getrusage's ru_maxrss: Linux carries that over fork and exec, so a
    worker started by a parent that had built a checkpoint (~1.2 GiB) would report the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------

def _checkpoint(recipe: str, path: str | None, calib: str | None) -> str | None:
    if path == "none":
        return None
    if path:
        return path
    out = ROOT / "out" / "ckpt" / f"smollm2-{recipe}"
    if not out.exists():
        import compressor
        if recipe.startswith("gptq") and not (calib and Path(calib).is_file()):
            print(f"# skipping {recipe}: no calibration data (pass --calib-data or --gptq DIR)")
            return None
        print(f"# building {out} with compressor.compress('smollm2-135m', {recipe!r}) ...", flush=True)
        compressor.compress("smollm2-135m", recipe, out, calib_data=calib if recipe.startswith("gptq") else None,
                            progress=False)
    return str(out)


def _run_worker(kind, path, args, compile_=False) -> dict | None:
    try:
        return run_once(f"{Path(__file__).resolve()}:Runtime", "decode", init={"threads": args.threads},
                        kind=kind, path=path, compiled=compile_, prompt=args.prompt, tokens=args.tokens,
                        runs=args.runs)
    except WorkerError as e:
        print(f"# {kind}{' compiled' if compile_ else ''} failed: {e}")
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rtn", help="rtn-w4g64 checkpoint directory ('none' to skip)")
    ap.add_argument("--gptq", help="gptq-w4g64 checkpoint directory ('none' to skip)")
    ap.add_argument("--calib-data", default=str(DEFAULT_CALIB))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="skip the static cache + torch.compile rows")
    ap.add_argument("--no-bnb", action="store_true")
    ap.add_argument("--out", default="out/bench_decode.json")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    info = harness.machine_info(args.threads)
    print(harness.header(f"bench_decode: SmolLM2-135M greedy, batch 1, {args.prompt}-token prompt + "
                         f"{args.tokens} tokens, median of {args.runs}", info))
    runtimes = [("HF fp32", "fp32", None)]
    for recipe, path in [("rtn-w4g64", args.rtn), ("gptq-w4g64", args.gptq)]:
        ck = _checkpoint(recipe, path, args.calib_data)
        if ck:
            runtimes.append((f"compressor {recipe}", "compressor", ck))
    if not args.no_bnb:
        runtimes.append(("bitsandbytes NF4", "bnb-nf4", None))

    rows = []
    for compile_ in ([False] if args.no_compile else [False, True]):
        for name, kind, path in runtimes:
            if compile_ and kind == "bnb-nf4":
                continue
            r = _run_worker(kind, path, args, compile_)
            if r is None:
                continue
            rows.append({"runtime": name + (" + static cache + compile" if compile_ else ""), **r})
            print(f"#   {rows[-1]['runtime']}: {r['tok_s']:.1f} tok/s", flush=True)
    base = next((r for r in rows if r["runtime"] == "HF fp32"), None)
    for r in rows:
        r["x_fp32"] = r["tok_s"] / base["tok_s"] if base else None
        r["same_tokens"] = (sum(a == b for a, b in zip(r["tokens"], base["tokens"])) / len(r["tokens"])
                            if base else None)
    print()
    harness.print_table(rows, [("runtime", "runtime", ""), ("tok_s", "tok/s", ".1f"), ("x_fp32", "vs HF fp32", ".2f"),
                               ("peak_rss_mib", "peak RSS MiB", ".0f"), ("same_tokens", "tokens = fp32", ".0%"),
                               ("warmup_s", "warm-up s", ".1f")])
    # The bar is on the GPTQ checkpoint; on the RTN one only when there is no GPTQ row.
    judged = [r for r in rows if r["runtime"].startswith("compressor gptq")] or \
        [r for r in rows if r["runtime"].startswith("compressor")]
    best = max(judged, key=lambda r: r["x_fp32"], default=None)
    if best and base:
        ok = best["x_fp32"] >= 2.0
        print(f"\n## acceptance (issue 4)\n- [{'x' if ok else ' '}] 4-bit decode >= 2x HF fp32: "
              f"{best['runtime']} {best['x_fp32']:.2f}x")
    harness.write_json(args.out, info, [{k: v for k, v in r.items() if k != "tokens"} for r in rows])
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
