"""Our onnx exports against ONNX Runtime's own 4-bit export of the same model, in one compress-bench run.

    python benchmarks/ort_peer.py --checkpoints out/gptq-w4g64 out/rtn-w4g64 \\
        --eval-data ../shared/data/wikitext2-test.txt --optimum-python VENV/bin/python --out out/ort

ONNX Runtime's route: the float model as an ONNX graph (`to_onnx.export_float`: the same graph as ours,
float MatMul projections), then ``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer``
(RTN, block 64, asymmetric like rtn-w4g64, the head left in float as ours is), at each accuracy level.
Then one ``compress-bench --engine torch,ort,ort:4`` over BASE, the checkpoints and those peers:
size, RSS, ppl, TTFT, prefill and decode tok/s side by side, models alternating run by run.
With ``--optimum-python VENV/bin/python`` (scripts/install-optimum.sh) the float model is also exported by
optimum-cli and quantized the same way: ORT's whole route, optimum's graph and ORT's quantizer, beside the same quantizer on our graph.
Exit status 0 when, at each accuracy level, every one of our ort rows decodes at least as fast as ORT's
route (median; the optimum-graph peer when given), our ort:4 rows are >= 1.2x their torch row, and our
ort (level 0) ppl is within 0.5% of the torch row.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def ort_quantized(float_dir: Path, out: Path, block: int, level: int, symmetric: bool, tokenizer_dir: Path) -> Path:
    """ONNX Runtime's MatMulNBits quantizer on the float graph in `float_dir`, written as an onnx export dir
    (with the tokenizer of `tokenizer_dir`)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from compressor.checkpoint import META, atomic_dir
    from compressor.export.to_onnx import DATA_FILE, MODEL_FILE
    model = onnx.load(str(float_dir / MODEL_FILE))
    head = next(n.name for n in model.graph.node if n.output[0] == "logits")
    cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, accuracy_level=level)
    q = MatMulNBitsQuantizer(model, block_size=block, is_symmetric=symmetric, accuracy_level=level,
                             nodes_to_exclude=[head], algo_config=cfg)
    q.process()
    with atomic_dir(out, overwrite=True) as tmp:
        onnx.save_model(q.model.model, str(tmp / MODEL_FILE), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)
        for f in [*float_dir.iterdir(), *tokenizer_dir.glob("tokenizer*")]:
            if f.name not in (MODEL_FILE, DATA_FILE, META) and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
        meta = {"format": "onnx", "artifact": "onnx-export", "accuracy_level": level, "producer":
                f"onnxruntime.quantization MatMulNBitsQuantizer (RTN, block {block}, "
                f"{'sym' if symmetric else 'asym'}, head excluded)", "source": {"model": str(float_dir)}}
        (tmp / META).write_text(json.dumps(meta, indent=2))
    return out


def optimum_float(python: str, model_dir: Path, out: Path) -> Path:
    """optimum-cli's float export (text-generation-with-past) of `model_dir`, made under optimum's venv
    (transformers 4.57 there: the config's rope_parameters are written back as its rope_theta)."""
    import subprocess
    src, dest = out / "hf-for-optimum", out / "optimum-float"
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(model_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    cfg.update(rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)), rope_scaling=None,
               torch_dtype=cfg.pop("dtype", "float32"))
    (src / "config.json").write_text(json.dumps(cfg, indent=1))
    cli = str(Path(python).parent / "optimum-cli")
    subprocess.run([cli, "export", "onnx", "--model", str(src), "--task", "text-generation-with-past", str(dest)],
                   check=True, capture_output=True)
    shutil.rmtree(src)
    return dest


def greedy_agreement(ck: str, text: str, tmp: Path, threads: int, n: int = 64) -> tuple[int, int]:
    """Tokens until the first difference: 64 greedy tokens after the first 32 of `text`, in torch and ORT."""
    from transformers import AutoTokenizer

    from compressor import export_onnx
    from compressor.calib import tokenize_file
    from compressor.export.engines import EngineRunner
    prompt = tokenize_file(text, AutoTokenizer.from_pretrained(ck))[:32].tolist()
    export_onnx(ck, tmp, overwrite=True)
    got = []
    for engine, path in (("compressor", ck), ("ort", str(tmp))):
        r = EngineRunner(engine, threads=threads)
        r.load(path)
        got.append(r.greedy(prompt, n)["tokens"])
    shutil.rmtree(tmp)
    return next((i for i, (a, b) in enumerate(zip(*got)) if a != b), n), n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--checkpoints", nargs="+", required=True)
    p.add_argument("--eval-data", required=True)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--levels", default="0,4", help="accuracy levels to compare (ort:L engines)")
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="out/ort")
    p.add_argument("--optimum-python", help="the venv of scripts/install-optimum.sh: export the float model with "
                                            "optimum-cli there and quantize that too (ORT's whole route)")
    args = p.parse_args(argv)

    from rich.console import Console

    from compressor.bench import report
    from compressor.bench.config import BenchConfig
    from compressor.bench.runner import run
    from compressor.export.to_onnx import export_float
    from compressor.models import resolve
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    levels = [int(x) for x in args.levels.split(",")]
    model_dir = resolve(args.model)
    float_dir = export_float(model_dir, out / "float-onnx", overwrite=True)
    peers = [f"ort-rtn-w4g{args.block} [ort:{lv}]="
             f"{ort_quantized(float_dir, out / f'ort-rtn-a{lv}', args.block, lv, False, model_dir)}" for lv in levels]
    if args.optimum_python:
        opt = optimum_float(args.optimum_python, model_dir, out)
        peers += [f"ort-rtn-w4g{args.block} optimum graph [ort:{lv}]="
                  f"{ort_quantized(opt, out / f'ort-rtn-optimum-a{lv}', args.block, lv, False, model_dir)}"
                  for lv in levels]
    engines = ("torch",) + tuple("ort" if lv == 0 else f"ort:{lv}" for lv in levels)
    cfg = BenchConfig(batches=(1,), runs=args.runs, threads=args.threads, eval_windows=args.eval_windows,
                      engines=engines, prefill_reps=3)
    res = run(args.model, [*args.checkpoints, *peers], eval_data=args.eval_data, config=cfg)
    report.print_table(res, Console(width=250))
    report.write_json(res, out / "ort_peer.json")
    report.write_markdown(res, out / "ort_peer.md")

    rows = {r.label: r for r in res.rows}
    ok = True
    for ck in args.checkpoints:                        # greedy tokens: ORT against compressor.load
        agree, n = greedy_agreement(ck, args.eval_data, out / f"greedy-{Path(ck).name}", args.threads)
        print(f"{Path(ck).name}: ORT (accuracy_level 0) greedy equals compressor.load's for {agree}/{n} tokens")
        ok &= agree >= 32
    for ck in args.checkpoints:
        name = Path(ck).name
        torch_row = rows[name]
        for lv, eng in zip(levels, engines[1:]):
            ours = rows[f"{name} [{eng}]"]
            same = rows[f"ort-rtn-w4g{args.block} [ort:{lv}]"]
            route = rows.get(f"ort-rtn-w4g{args.block} optimum graph [ort:{lv}]", same)   # what an ORT user runs
            line = (f"{name} [{eng}]: decode {ours.decode_tok_s:.1f} tok/s; x{ours.decode_tok_s / route.decode_tok_s:.2f} "
                    f"ORT's own route ({route.label}: {route.decode_tok_s:.1f}), x{ours.decode_tok_s / same.decode_tok_s:.2f} "
                    f"ORT's quantizer on our graph ({same.decode_tok_s:.1f}), x{ours.decode_tok_s / torch_row.decode_tok_s:.2f} "
                    f"our torch path ({torch_row.decode_tok_s:.1f}); ppl {ours.ppl:.4f} vs torch {torch_row.ppl:.4f} "
                    f"({100 * (ours.ppl / torch_row.ppl - 1):+.3f}%), ORT's RTN {route.ppl:.4f}")
            ok &= ours.decode_tok_s >= route.decode_tok_s
            if lv == 0:
                ok &= abs(ours.ppl / torch_row.ppl - 1) <= 0.005
            if lv == 4:
                ok &= ours.decode_tok_s >= 1.2 * torch_row.decode_tok_s
            print(line)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
