"""Perplexity on and off the calibration domain: wikitext-2 test beside a HellaSwag text.

    python benchmarks/offdomain.py CKPT_OR_MODEL ... [--data ../shared/data] [--windows 8]

Calibration (GPTQ, AWQ) uses wikitext-2 valid, and the usual evaluation is wikitext-2 test: a
calibrated pass can fit the domain rather than the model. The off-domain text is the HellaSwag
tasks' contexts followed by their gold endings (ActivityNet and WikiHow prose), joined by blank
lines, built in a temporary file from `--data` (nothing is copied into the project). The first
model is the reference; each row gives both perplexities and the increase over it, and the last
lines the share of RTN's increase that GPTQ (or any pair named rtn/gptq) removes on each text.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from compressor.eval import perplexity
from compressor.tasks import load_task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import load_spec  # noqa: E402


def hellaswag_text(data: Path) -> str:
    return "\n\n".join(f"{it.context} {it.choices[it.gold]}" for it in load_task("hellaswag", data))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+", help="LABEL=SPEC; the first is the reference")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    with tempfile.TemporaryDirectory() as d:
        hs = Path(d) / "hellaswag.txt"
        hs.write_text(hellaswag_text(data))
        texts = {"wikitext2-test": data / "wikitext2-test.txt", "hellaswag-text": hs}
        rows = {}
        for m in args.models:
            label, _, spec = m.rpartition("=")
            model, tok = load_spec(spec)
            rows[label or spec] = {k: perplexity(model, tok, str(p), 2048, args.windows, progress=False)
                                   for k, p in texts.items()}
            del model
            print(label or spec, {k: round(v, 3) for k, v in rows[label or spec].items()}, flush=True)
    ref = next(iter(rows.values()))
    print(f"\n| model | {' | '.join(texts)} | " + " | ".join(f"Δ {k}" for k in texts) + " |")
    print("|---" * (1 + 2 * len(texts)) + "|")
    for label, r in rows.items():
        print(f"| {label} | " + " | ".join(f"{r[k]:.3f}" for k in texts) + " | "
              + " | ".join(f"{r[k] - ref[k]:+.3f}" for k in texts) + " |")
    if "rtn" in rows and "gptq" in rows:
        for k in texts:
            d_rtn, d_gptq = rows["rtn"][k] - ref[k], rows["gptq"][k] - ref[k]
            print(f"{k}: GPTQ removes {100 * (1 - d_gptq / d_rtn):.0f}% of RTN's increase "
                  f"(+{d_gptq:.3f} vs +{d_rtn:.3f})")


if __name__ == "__main__":
    main()
