"""At equal bits in llama.cpp (issue 20): our symmetric GPTQ w4g32, exported to Q4_0, against llama.cpp's
own Q4_0 and IQ4_NL of the same model.

All three GGUFs hold the same F16 embedding (tied head) and F32 norms; only the decoder Linears differ,
all in 32-weight blocks of 4.5 bits per weight:
  * ours: `gptq-w4g32-sym` (GPTQ, MSE clipping, float-stream target), repacked by `compress export gguf`;
  * llama.cpp's: the F16 GGUF of the same source model (written by `compressor.export.to_gguf` from the
    fp32 weights) quantized by llama.cpp itself (`llama_model_quantize`, as `llama-quantize` does;
    ``pure`` so that every Linear gets the named type, embeddings kept F16, no imatrix).
Per row: ppl over ``--windows`` windows of ``--seqlen`` tokens (llama.cpp's logits), the tensor types
and bits per weight of the Linears, and decode tok/s (batch 1, 64 tokens after a 32-token prompt,
median of ``--runs`` runs, the models taking turns), with its paired ratio to llama.cpp's Q4_0.
Exit status 1 unless ours has the lowest ppl and decodes at >= 0.95x llama.cpp's Q4_0.

    python benchmarks/llama_equal_bits.py [--gptq-sym DIR] [--out out/llama_equal_bits.json]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from engines import DATA, ROOT, _decode_rounds, _eval_ids, _ppl, _worker  # noqa: E402

F16, RUNS = 1, 5                                   # GGML_TYPE_F16


def llama_quantize(src: Path, out: Path, ftype: int) -> Path:
    """llama.cpp's own quantizer on an F16 GGUF: every Linear to `ftype`, embeddings kept F16."""
    import llama_cpp
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.pure, p.nthread = ftype, True, 2
    p.token_embedding_type = p.output_tensor_type = F16
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), p) != 0:
        sys.exit(f"llama_model_quantize failed on {src}")
    tmp.rename(out)
    return out


def linear_types(path: Path) -> tuple[str, float]:
    """The tensor types of the decoder Linears and their bits per weight, read back from the file."""
    import gguf
    types, bits, n = set(), 0, 0
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2:
            types.add(t.tensor_type.name)
            bits += 8 * int(t.n_bytes)
            n += int(t.n_elements)
    return "/".join(sorted(types)), bits / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gptq-sym", help="a gptq-w4g32-sym checkpoint (default: built into out/engines/)")
    ap.add_argument("--calib-data", default=str(DATA / "wikitext2-valid.tokens"))
    ap.add_argument("--eval-data", default=str(DATA / "wikitext2-test.txt"))
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=RUNS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(ROOT / "out" / "engines"))
    ap.add_argument("--out", default=str(ROOT / "out" / "llama_equal_bits.json"))
    args = ap.parse_args()
    import llama_cpp

    import compressor
    from compressor.export import Source, export
    from compressor.export.to_gguf import write as write_gguf
    from compressor.models import resolve
    work = Path(args.work)
    ck = Path(args.gptq_sym) if args.gptq_sym else work / "gptq-w4g32-sym"
    if not ck.exists():
        print(f"building {ck} (compress --recipe gptq-w4g32-sym)", flush=True)
        compressor.compress("smollm2-135m", "gptq-w4g32-sym", ck, calib_data=args.calib_data)
    ours = export(ck, "gguf", work / "exports" / "gptq-w4g32-sym-gguf", overwrite=True) / "model.gguf"
    f16_dir = work / "exports" / "smollm2-f16-gguf"
    f16_dir.mkdir(parents=True, exist_ok=True)
    f16 = f16_dir / "model.gguf"
    if not f16.exists():
        write_gguf(Source.float_model(resolve("smollm2-135m")), f16_dir, {})
    models = {"ours: gptq-w4g32-sym → Q4_0": ours,
              "llama.cpp Q4_0": llama_quantize(f16, work / "exports" / "llama-q4_0.gguf",
                                               llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0),
              "llama.cpp IQ4_NL": llama_quantize(f16, work / "exports" / "llama-iq4_nl.gguf",
                                                 llama_cpp.LLAMA_FTYPE_MOSTLY_IQ4_NL),
              "F16 (reference)": f16}
    windows, prompt = _eval_ids(args, ck)
    rows, workers = [], []
    for label, path in models.items():
        row = {"model": label, "file": str(path)}
        row["types"], row["bpw"] = linear_types(path)
        w = _worker(args, "llama.cpp", label)
        w.call("load", path=str(path))
        row["ppl"] = _ppl(w, windows, args.seqlen)
        print(f"{label}: {row['types']} {row['bpw']:.2f} bpw, ppl {row['ppl']:.4f}", flush=True)
        rows.append(row)
        workers.append((row, w))
    _decode_rounds(workers, prompt, args.runs)
    for _, w in workers:
        w.close()
    base = rows[1]["decode_tok_s_runs"]
    for r in rows:
        r["decode_tok_s"] = statistics.median(r["decode_tok_s_runs"])
        r["vs_llama_q4_0"] = statistics.median(a / b for a, b in zip(r["decode_tok_s_runs"], base))
    ours_row, q4, iq4 = rows[0], rows[1], rows[2]
    ok = ours_row["ppl"] < min(q4["ppl"], iq4["ppl"]) and ours_row["vs_llama_q4_0"] >= 0.95
    info = harness.machine_info(args.threads)
    print(harness.header("equal bits in llama.cpp: SmolLM2-135M, Linears in 4.5-bit blocks of 32", info))
    print(f"# llama-cpp-python {llama_cpp.__version__}; ppl: {args.windows} x {args.seqlen} tokens of "
          f"{Path(args.eval_data).name}; decode: batch 1, 64 new tokens after {len(prompt)}, median of "
          f"{args.runs} interleaved runs; ×Q4_0: median of per-run ratios")
    harness.print_table(rows, [("model", "model", ""), ("types", "Linears", ""), ("bpw", "bits/weight", ".2f"),
                               ("ppl", "ppl", ".4f"), ("decode_tok_s", "decode tok/s", ".1f"),
                               ("vs_llama_q4_0", "×llama.cpp Q4_0", ".3f")])
    print(f"ours has the lowest ppl of the 4.5-bit rows: {ours_row['ppl'] < min(q4['ppl'], iq4['ppl'])}; "
          f"decodes at >= 0.95x llama.cpp Q4_0: {ours_row['vs_llama_q4_0'] >= 0.95}")
    harness.write_json(args.out, info, rows, args=vars(args))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
