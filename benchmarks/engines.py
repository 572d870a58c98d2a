"""Every export format in the engine users run it in (issue 20), against `compressor.load` of the same checkpoint.

SmolLM2-135M quantized by ``gptq-w4g64-noact`` (GPTQ 4-bit g64 asymmetric, act-order off) and by
``rtn-w4g64``, repacked by `compressor.export` into gptq-v2, compressed-tensors and gguf, and loaded by
GPTQModel, transformers and llama.cpp (`compressor.export.engines`); and a symmetric RTN 4-bit g32
checkpoint, whose v1 layout GPTQ loaders read as it is (``gptq``), in compressed-tensors' compressed
modules and as gguf Q4_0. One row per (checkpoint, format, engine):

  * loaded: whether the engine read the export (else why not);
  * ppl over ``--windows`` windows of ``--seqlen`` tokens of the eval text, and its difference from
    the ppl `compressor.load` gives the same checkpoint; the check allows 1%, 2% where the engine
    computes in half precision;
  * greedy agreement: how many of the 32 greedy tokens after a 32-token prompt (from the eval text)
    equal compressor.load's, counted up to the first difference;
  * decode tok/s: batch 1, the same prompt, 64 new tokens, the median of ``--runs`` runs; the
    engines take turns run by run (A B C A B C ...), each in a process of its own, 2 threads.

    python benchmarks/engines.py [--gptq DIR] [--rtn DIR] [--gptqmodel-python VENV/bin/python]
                                 [--out out/engines.json]

Missing checkpoints are built into ``out/engines/`` with `compressor.compress` (GPTQ needs calibration
text: ``--calib-data``, default ../shared/data/wikitext2-valid.tokens). GPTQModel runs under the
interpreter of ``scripts/install-gptqmodel.sh`` (``--gptqmodel-python``, or
``$COMPRESSOR_GPTQMODEL_PYTHON``); transformers loads gptq-v2 through it too. An engine that is not
installed gives a row that did not load, with the install command. Exit status 1 if any row did not
load or missed its tolerance.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from compressor.export import engines  # noqa: E402
from compressor.worker import ProcessWorker, WorkerError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RUNNER = "compressor.export.engines:EngineRunner"
# (checkpoint, format, engine); format "native" is the checkpoint itself
ROWS = [("gptq-w4g64-noact", "native", "compressor"), ("gptq-w4g64-noact", "gptq-v2", "gptqmodel"),
        ("gptq-w4g64-noact", "gptq-v2", "transformers"), ("gptq-w4g64-noact", "compressed-tensors", "transformers"),
        ("gptq-w4g64-noact", "gguf", "llama.cpp"),
        ("rtn-w4g64", "native", "compressor"), ("rtn-w4g64", "gptq-v2", "gptqmodel"),
        ("rtn-w4g64", "compressed-tensors", "transformers"), ("rtn-w4g64", "gguf", "llama.cpp"),
        # symmetric: the v1 checkpoint itself in GPTQ loaders, compressed-tensors unpacked, gguf Q4_0
        ("rtn-w4g32-sym", "native", "compressor"), ("rtn-w4g32-sym", "gptq", "gptqmodel"),
        ("rtn-w4g32-sym", "gptq", "transformers"), ("rtn-w4g32-sym", "compressed-tensors", "transformers"),
        ("rtn-w4g32-sym", "gguf", "llama.cpp")]
SYM = {"description": "RTN 4-bit g32 symmetric", "passes": [{"rtn": {"bits": 4, "group_size": 32, "sym": True}}]}
PROMPT, AGREE, GEN = 32, 32, 64


def build(name: str, given: str | None, work: Path, calib: str) -> Path:
    if given:
        return Path(given)
    out = work / name
    if not out.exists():
        import compressor
        from compressor.recipe import parse_recipe
        print(f"building {out} (compress --recipe {name})", flush=True)
        recipe = parse_recipe(SYM, source=name) if name == "rtn-w4g32-sym" else name
        compressor.compress("smollm2-135m", recipe, out, calib_data=calib)
    return out


def exported(ckpt: Path, fmt: str, work: Path) -> Path:
    if fmt == "native":
        return ckpt
    from compressor.export import export
    return export(ckpt, fmt, work / "exports" / f"{ckpt.name}-{fmt}", overwrite=True)    # fresh: this tree's code


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gptq", help="a gptq-w4g64-noact checkpoint (default: built into out/engines/)")
    ap.add_argument("--rtn", help="an rtn-w4g64 checkpoint (default: built into out/engines/)")
    ap.add_argument("--sym", help="a symmetric 4-bit g32 checkpoint (default: RTN, built into out/engines/)")
    ap.add_argument("--calib-data", default=str(DATA / "wikitext2-valid.tokens"))
    ap.add_argument("--eval-data", default=str(DATA / "wikitext2-test.txt"))
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gptqmodel-python", default=os.environ.get("COMPRESSOR_GPTQMODEL_PYTHON"),
                    help="interpreter with gptqmodel (scripts/install-gptqmodel.sh VENV -> VENV/bin/python)")
    ap.add_argument("--work", default=str(ROOT / "out" / "engines"))
    ap.add_argument("--out", default=str(ROOT / "out" / "engines.json"))
    return 0 if formats_table(ap.parse_args()) else 1


def _eval_ids(args, ckpt: Path) -> tuple[list[list[int]], list[int]]:
    from transformers import AutoTokenizer

    from compressor.calib import tokenize_file
    ids = tokenize_file(args.eval_data, AutoTokenizer.from_pretrained(ckpt)).tolist()
    windows = [ids[i * args.seqlen:(i + 1) * args.seqlen] for i in range(args.windows)]
    if len(windows[-1]) < args.seqlen:
        sys.exit(f"{args.eval_data}: fewer than {args.windows} windows of {args.seqlen} tokens")
    return windows, ids[:PROMPT]


def _worker(args, engine: str, label: str, python: str | None = None) -> ProcessWorker:
    return ProcessWorker(RUNNER, init={"engine": engine, "threads": args.threads, "context": args.seqlen},
                         env={"OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"},
                         label=label, python=python)


def _ppl(w: ProcessWorker, windows: list[list[int]], seqlen: int) -> float:
    return w.call("perplexity", ids=[t for win in windows for t in win], seqlen=seqlen)


def _decode_rounds(workers: list[tuple[dict, ProcessWorker]], prompt: list[int], runs: int) -> None:
    """Warm-up, then `runs` rounds in which every worker decodes once (A B C A B C ...)."""
    for row, w in workers:
        w.call("greedy", prompt=prompt, n=8)
    for _ in range(runs):
        for row, w in workers:
            r = w.call("greedy", prompt=prompt, n=GEN)
            row.setdefault("decode_tok_s_runs", []).append((GEN - 1) / r["decode_s"])


def formats_table(args) -> bool:
    work = Path(args.work)
    ckpts = {"gptq-w4g64-noact": build("gptq-w4g64-noact", args.gptq, work, args.calib_data),
             "rtn-w4g64": build("rtn-w4g64", args.rtn, work, args.calib_data),
             "rtn-w4g32-sym": build("rtn-w4g32-sym", args.sym, work, args.calib_data)}

    windows, prompt = _eval_ids(args, ckpts["rtn-w4g64"])

    rows, workers = [], []
    for ck, fmt, eng in ROWS:
        row = {"checkpoint": ck, "format": fmt, "engine": eng, "loaded": False}
        rows.append(row)
        via_gptqmodel = eng == "gptqmodel" or (eng == "transformers" and fmt.startswith("gptq"))
        python = args.gptqmodel_python if via_gptqmodel else None
        need = "gptqmodel" if via_gptqmodel else eng
        why = "no --gptqmodel-python given" if need == "gptqmodel" and not python else engines.missing(need, python)
        if why:
            row["error"] = why
            print(f"{ck} {fmt} {eng}: not run: {why}", flush=True)
            continue
        try:
            path = exported(ckpts[ck], fmt, work)
            w = _worker(args, eng, f"{ck} {fmt} {eng}", python)
            row.update(w.call("load", path=str(path)), loaded=True)
            row["ppl"] = _ppl(w, windows, args.seqlen)
            row["tokens"] = w.call("greedy", prompt=prompt, n=AGREE)["tokens"]
            workers.append((row, w))
            print(f"{ck} {fmt} {eng}: loaded, ppl {row['ppl']:.4f}", flush=True)
        except (WorkerError, ValueError, OSError) as e:
            row["error"] = str(e)[:300]
            print(f"{ck} {fmt} {eng}: failed: {row['error']}", flush=True)

    _decode_rounds(workers, prompt, args.runs)
    for row, w in workers:
        w.close()

    ok = _compare(rows)
    info = harness.machine_info(args.threads)
    print(harness.header("export formats in their engines: SmolLM2-135M", info))
    print(f"# ppl: {args.windows} x {args.seqlen} tokens of {Path(args.eval_data).name}; greedy: {AGREE} tokens "
          f"after a {PROMPT}-token prompt; decode: batch 1, {GEN} new tokens, median of {args.runs} interleaved runs")
    cols = ["checkpoint", "format", "engine", "loaded", "ppl", "Δ vs compressor.load", "within", "greedy agree",
            "decode tok/s"]
    harness.print_table([dict(zip(cols, _cells(r))) for r in rows], [(c, c, "") for c in cols])
    harness.write_json(args.out, info, rows, args=vars(args))
    return ok


def _compare(rows: list[dict]) -> bool:
    ref = {r["checkpoint"]: r for r in rows if r["engine"] == "compressor" and r.get("ppl")}
    ok = True
    for r in rows:
        if r.get("decode_tok_s_runs"):
            r["decode_tok_s"] = statistics.median(r["decode_tok_s_runs"])
        base = ref.get(r["checkpoint"])
        if not r.get("ppl") or base is None:
            ok = False
            continue
        r["tol_pct"] = 2.0 if "16" in engines.ENGINES[r["engine"]].dtype else 1.0     # 2% for fp16/bf16 engines
        r["dppl_pct"] = 100 * (r["ppl"] / base["ppl"] - 1)
        same = next((i for i, (a, b) in enumerate(zip(r["tokens"], base["tokens"])) if a != b), AGREE)
        r["agree"] = same
        r["pass"] = abs(r["dppl_pct"]) <= r["tol_pct"]
        ok &= r["pass"]
    return ok


def _cells(r: dict) -> list[str]:
    if not r.get("loaded"):
        return [r["checkpoint"], r["format"], r["engine"], "no: " + r.get("error", "?")[:90], "", "", "", "", ""]
    if "ppl" not in r:
        return [r["checkpoint"], r["format"], r["engine"], "yes, then failed: " + r.get("error", "?")[:80], "", "",
                "", "", ""]
    within = f"{'yes' if r.get('pass') else 'NO'} (±{r.get('tol_pct', 1):g}%)"
    return [r["checkpoint"], r["format"], r["engine"], f"yes ({r.get('version', '?')}{', ' + r['mode'] if r.get('mode') else ''})", f"{r['ppl']:.4f}",
            f"{r.get('dppl_pct', 0):+.3f}%", within, f"{r.get('agree', 0)}/{AGREE}",
            f"{r.get('decode_tok_s', float('nan')):.1f}"]


if __name__ == "__main__":
    sys.exit(main())
