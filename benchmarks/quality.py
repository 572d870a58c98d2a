"""Quality at equal bits on SmolLM2-135M: ours (RTN, GPTQ, AWQ, AWQ+GPTQ, pruning, distill) against fp32 and peers.

    python benchmarks/quality.py [--windows 16] [--out out/quality] [--rows fp32,rtn-w4g64,...]

Every row runs in a fresh process (`RowRunner` through `compressor.worker.run_once`) so that its
peak RSS and time are its own. Our rows compress with the shipped recipe, write the checkpoint,
*reload it with compressor.load* and measure the reloaded model's perplexity; the reloaded model's
logits on the first window must equal the in-memory compressed model's.
Pruning rows (magnitude, Wanda, SparseGPT unstructured / 2:4 / joint 2:4 + 4-bit, structured MLP) also
report the zeros of every targeted layer (min and max over layers; for 2:4 the most nonzeros in any
4), the checkpoint's decoder-Linear bytes against the same Linears in dense fp16, and the MLP width.
Distill rows (``*-distill``) run the base recipe then ``distill`` on wikitext2-valid.tokens, and report
perplexity before (the base row of the same run) and after, the share of the increase over fp32
recovered, training minutes (teacher pass + student steps), tokens and tokens/s.
Low-rank rows (``svd-80``, ``asvd-80``, ``svd-llm-80`` and its distill and GPTQ rows) report the decoder
Linear parameters kept and their checkpoint bytes against fp32's, beside ``prune-mlp-27``, structured
pruning at the same parameter count.
llm-compressor's SparseGPT / Wanda on the same windows: `benchmarks/peer_pruning.py` (its own venv).
Peer rows (bitsandbytes NF4 blocksize 64, HQQ 4-bit g64) quantize in memory through the peers' own
libraries. Calibration uses wikitext2-valid.tokens; evaluation uses the first N windows of 2048
tokens of wikitext2-test.txt. Writes quality.json and quality.md beside the table it prints.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from compressor.machine import machine_info
from compressor.worker import WorkerError, run_once

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OURS = {  # row -> (recipe, bits, group)
    "rtn-w4g64": ("rtn-w4g64", 4, 64), "gptq-w4g64": ("gptq-w4g64", 4, 64), "awq-w4g64": ("awq-w4g64", 4, 64),
    "awq-gptq-w4g64": ("awq-gptq-w4g64", 4, 64), "rtn-w3g64": (None, 3, 64), "gptq-w3g64": ("gptq-w3g64", 3, 64),
    "magnitude-50": ("magnitude-50", 16, None), "wanda-50": ("wanda-50", 16, None),
    "sparsegpt-50": ("sparsegpt-50", 16, None), "sparsegpt-2of4": ("sparsegpt-2of4", 16, None),
    "sparsegpt-2of4+rtn-w4g64": ("sparsegpt-2of4+rtn", 4, 64), "sparsegpt-2of4-w4g64": ("sparsegpt-2of4-w4g64", 4, 64),
    "prune-mlp-25": ("prune-mlp-25", 32, None),
    "prune-mlp-25-distill": ("prune-mlp-25-distill", 32, None), "sparsegpt-50-distill": ("sparsegpt-50-distill", 16, None),
    "gptq-w3g64-distill": ("gptq-w3g64-distill", 3, 64),
    "svd-80": ("svd-80", 32, None), "asvd-80": ("asvd-80", 32, None), "svd-llm-80": ("svd-llm-80", 32, None),
    "prune-mlp-27": ("prune-mlp-27", 32, None), "svd-llm-80-distill": ("svd-llm-80-distill", 32, None),
    "svd-llm-80-gptq-w4g64": ("svd-llm-80-gptq-w4g64", 4, 64),
}
DISTILL = {"prune-mlp-25-distill": "prune-mlp-25", "sparsegpt-50-distill": "sparsegpt-50",
           "gptq-w3g64-distill": "gptq-w3g64", "svd-llm-80-distill": "svd-llm-80"}   # distill row -> its base row
LOWRANK = ["svd-80", "asvd-80", "svd-llm-80", "svd-llm-80-distill", "svd-llm-80-gptq-w4g64"]
PRUNING = [r for r in OURS if r.startswith(("magnitude", "wanda", "sparsegpt", "prune"))]
PRUNE_AT_80 = "prune-mlp-27"     # structured pruning at low-rank's parameter count: 408 of 1536 channels = 19.9%
PEERS = {"bnb-nf4-b64": (4, 64), "hqq-w4g64": (4, 64)}
DEFAULT_ROWS = ["fp32", *OURS, *PEERS]
INLINE = {  # rows whose recipe is not shipped
    None: {"description": "RTN 3-bit g64 asym (benchmark row)", "passes": [{"rtn": {"bits": 3, "group_size": 64}}]},
    "magnitude-50": {"description": "magnitude 50% (benchmark row)", "passes": [{"magnitude": {"sparsity": 0.5}}]},
    "sparsegpt-2of4+rtn": {"description": "sparsegpt-2of4, then RTN w4g64 (benchmark row)",
                           "calibration": {"samples": 64, "seqlen": 512},
                           "passes": [{"sparsegpt": {"pattern": "2:4", "fp_target": True}},
                                      {"rtn": {"bits": 4, "group_size": 64}}]},
    "svd-80": {"description": "plain SVD, 80% of decoder Linear parameters kept (benchmark row)",
               "passes": [{"lowrank": {"method": "svd", "target": 0.8}}]},
    "asvd-80": {"description": "ASVD, 80% kept (benchmark row)", "calibration": {"samples": 64, "seqlen": 512},
                "passes": [{"lowrank": {"method": "asvd", "target": 0.8}}]},
    "prune-mlp-27": {"description": "408 of 1536 MLP channels removed: 80.1% of decoder Linear parameters kept "
                                    "(benchmark row)", "calibration": {"samples": 64, "seqlen": 512},
                     "passes": [{"prune-structured": {"mlp": 0.265625, "multiple_of": 8, "fp_target": True}}]},
}
PEER_PACKAGES = ("compressor", "torch", "transformers", "bitsandbytes", "hqq")


class RowRunner:
    """One row in a process of its own: `measure` compresses (or loads) and evaluates it."""

    def __init__(self, threads: int):
        import torch
        torch.set_num_threads(threads)

    def measure(self, row: str, windows: int, out: str, data: str) -> dict:
        return _measure(row, windows, Path(out), Path(data))


def _measure(row: str, windows: int, out_dir: Path, data: Path) -> dict:
    import torch

    import compressor
    from compressor.api import compress, dir_bytes
    from compressor.calib import tokenize_file
    from compressor.eval import perplexity
    from compressor.models import load_hf, resolve
    from compressor.recipe import parse_recipe

    test = data / "wikitext2-test.txt"
    src = resolve("smollm2-135m")
    t0 = time.perf_counter()
    out: dict = {"row": row}
    if row == "fp32":
        model, tok = load_hf(src)
        out.update(method="fp32", bits=32, group=None, mb=dir_bytes(src) / 2**20, seconds=0.0)
    elif row in OURS:
        recipe, bits, group = OURS[row]
        recipe = parse_recipe(INLINE[recipe], row) if recipe in INLINE else recipe
        dest = out_dir / row
        res = compress("smollm2-135m", recipe, dest, calib_data=str(data / "wikitext2-valid.tokens"),
                       train_data=str(data / "wikitext2-valid.tokens"), overwrite=True, progress=False)
        secs = time.perf_counter() - t0
        if "distill" in res.ctx.training:
            t = res.ctx.training["distill"]
            out.update(train_seconds=t["seconds"], teacher_seconds=t["teacher_seconds"], train_tokens=t["tokens"],
                       train_tok_s=t["tokens_per_second"], trainable=t["trainable_parameters"])
        out["compress_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        tok = res.tokenizer
        x = tokenize_file(test, tok)[:2048].unsqueeze(0)         # the first evaluation window
        with torch.no_grad():
            logits_mem = res.model(input_ids=x).logits
        del res
        model = compressor.load(dest)
        with torch.no_grad():
            dlogit = float((model(input_ids=x).logits - logits_mem).abs().max())
        out.update(method=row.rsplit("-", 1)[0].upper(), bits=bits, group=group, mb=dir_bytes(dest) / 2**20,
                   seconds=secs, reload_max_dlogit=dlogit, checkpoint=str(dest))
        if row in PRUNING:
            # the weights as saved (loaded for inference, act-order MLPs are folded: channel order changes)
            out.update(_pruning_stats(compressor.load(dest, for_inference=False), dest))
        if row in LOWRANK or row == PRUNE_AT_80:
            out.update(_lowrank_stats(model, dest))
    else:
        bits, group = PEERS[row]
        model, tok = load_hf(src)
        if row.startswith("bnb"):
            _bnb_nf4(model, group)
        else:
            _hqq(model, bits, group)
        secs = time.perf_counter() - t0
        out["compress_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out.update(method=row, bits=bits, group=group, mb=_param_bytes(model) / 2**20, seconds=secs,
                   note="in-memory size of quantized params")
    out["ppl"] = perplexity(model, tok, test, 2048, windows, progress=False)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _pruning_stats(model, dest: Path) -> dict:
    """Zeros per targeted layer, 2:4 check, decoder-Linear bytes vs dense fp16, MLP width."""
    from safetensors import safe_open

    from compressor.nn import QuantLinear
    from compressor.sparsity import max_nonzeros_per_group
    ws = {n: (m.dequantized_weight() if isinstance(m, QuantLinear) else m.weight.detach())
          for n, m in model.named_modules() if ".layers." in n and hasattr(m, "in_features")}
    zeros = [float((w == 0).float().mean()) for w in ws.values()]
    with safe_open(str(dest / "model.safetensors"), "pt") as f:
        stored = sum(_nbytes(f.get_slice(k)) for k in f.keys()
                     if ".layers." in k and ("_proj." in k))
    dense = sum(w.numel() * 2 for w in ws.values())
    return {"zeros_min": min(zeros), "zeros_max": max(zeros), "layers": len(ws),
            "max_nonzeros_per_4": max(max_nonzeros_per_group(w, 4) for w in ws.values()),
            "linear_bytes_vs_dense_fp16": stored / dense, "mlp_width": model.config.intermediate_size}


def _lowrank_stats(model, dest: Path) -> dict:
    """Decoder-Linear parameters kept and checkpoint bytes, against the fp32 model's same Linears."""
    from safetensors import safe_open

    from transformers import AutoConfig

    from compressor.checkpoint import _meta_model
    from compressor.models import resolve
    ref = _meta_model(AutoConfig.from_pretrained(resolve("smollm2-135m")))     # shapes only, no weights read
    dense = sum(m.weight.numel() for n, m in ref.named_modules() if ".layers." in n and n.endswith("_proj"))
    kept = sum(m.in_features * m.out_features for n, m in model.named_modules()      # float or quantized
               if ".layers." in n and "_proj" in n and not hasattr(m, "rank")
               and isinstance(getattr(m, "in_features", None), int))
    with safe_open(str(dest / "model.safetensors"), "pt") as f:
        stored = sum(_nbytes(f.get_slice(k)) for k in f.keys() if ".layers." in k and "_proj." in k)
    meta = json.loads((dest / "compression.json").read_text())
    ranks = {n: v["rank"] for n, v in meta.get("layers", {}).items() if "rank" in v}
    return {"params_kept": kept / dense, "linear_bytes_vs_fp32": stored / (4 * dense), "ranks": ranks,
            "dense_layers": sum(1 for n in ranks if ranks[n] is None)}


def _nbytes(sl) -> int:
    import math
    size = {"F16": 2, "BF16": 2, "F32": 4, "I32": 4, "I64": 8, "U8": 1, "I8": 1}[sl.get_dtype()]
    return math.prod(sl.get_shape()) * size


def _targets(model):
    from compressor.passes import select_linears
    return select_linears(model)


def _param_bytes(model) -> int:
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    for m in model.modules():                       # bitsandbytes keeps absmax etc. in a quant_state
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            n += sum(t.numel() * t.element_size() for t in qs.as_dict(packed=True).values() if hasattr(t, "numel"))
    return n


def _bnb_nf4(model, blocksize: int) -> None:
    import bitsandbytes as bnb
    import torch
    for name, lin in _targets(model).items():
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4", blocksize=blocksize,
                                     compress_statistics=True).to("cpu")
        if lin.bias is not None:
            q.bias = lin.bias
        model.set_submodule(name, q)


def _hqq(model, bits: int, group: int) -> None:
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    cfg = BaseQuantizeConfig(nbits=bits, group_size=group)
    for name, lin in _targets(model).items():
        model.set_submodule(name, HQQLinear(lin, quant_config=cfg, compute_dtype=torch.float32, device="cpu"))


def _run_row(row: str, args) -> dict:
    try:
        return run_once(f"{Path(__file__).resolve()}:RowRunner", "measure", init={"threads": args.threads},
                        row=row, windows=args.windows, out=str(args.out), data=str(args.data))
    except WorkerError as e:
        return {"row": row, "method": row, "error": str(e)}


def _table(rows: list[dict], windows: int) -> str:
    fp = next(r for r in rows if r["row"] == "fp32")["ppl"]
    rtn = {r["bits"]: r["ppl"] - fp for r in rows if r["row"].startswith("rtn-") and "ppl" in r}
    head = ["method", "bits", "group", f"ppl ({windows}x2048)", "Δppl", "Δ/RTNΔ", "ckpt MB", "compress s",
            "peak RSS MiB compress", "peak RSS MiB all", "reload max|Δlogit|"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | | | failed: {r['error'][:80]} |" + " |" * (len(head) - 4))
            continue
        d = r["ppl"] - fp
        rel = d / rtn[r["bits"]] if r["bits"] in rtn and r["row"] != "fp32" else None
        lines.append(f"| {r['row']} | {r['bits']} | {r['group'] or '-'} | {r['ppl']:.3f} | {d:+.3f} | "
                     f"{'' if rel is None else f'{rel:.3f}'} | {r['mb']:.1f} | {r['seconds']:.0f} | "
                     f"{r.get('compress_rss_mib', r['peak_rss_mib']):.0f} | {r['peak_rss_mib']:.0f} | "
                     + (f"{r['reload_max_dlogit']:.1e} |" if "reload_max_dlogit" in r else " |"))
        r["delta_ppl"], r["delta_vs_rtn"] = d, rel
    return "\n".join(lines)


def _acceptance(rows: list[dict]) -> list[tuple[str, bool, str]]:
    """Issue 3's bars, checked on the rows of this run."""
    by = {r["row"]: r for r in rows if "error" not in r}
    out = []

    def rel(row):
        v = by[row]["delta_vs_rtn"] if row in by else None
        return float("nan") if v is None else v       # no RTN row at these bits in this run

    if "gptq-w4g64" in by:
        out.append(("GPTQ w4g64 Δppl <= 0.40 x RTN's", rel("gptq-w4g64") <= 0.40, f"{rel('gptq-w4g64'):.3f}"))
    ours4 = [r for r in ("gptq-w4g64", "awq-w4g64", "awq-gptq-w4g64") if r in by]
    if ours4:
        best = min(ours4, key=lambda r: by[r]["ppl"])
        peers = {p: by[p]["ppl"] for p in PEERS if p in by}
        ok = rel(best) <= 0.35 and all(by[best]["ppl"] < v for v in peers.values())
        out.append((f"best 4-bit ({best}) Δppl <= 0.35 x RTN's and below {', '.join(peers) or 'no peers'}", ok,
                    f"{rel(best):.3f}; ppl {by[best]['ppl']:.3f} vs " +
                    ", ".join(f"{p} {v:.3f}" for p, v in peers.items())))
    if "gptq-w3g64" in by:
        out.append(("GPTQ w3g64 Δppl <= 0.35 x RTN w3g64's", rel("gptq-w3g64") <= 0.35, f"{rel('gptq-w3g64'):.3f}"))
    if "gptq-w4g64" in by:
        s = by["gptq-w4g64"]["seconds"]
        out.append(("GPTQ w4g64 compresses in < 300 s", s < 300, f"{s:.0f} s"))
    bars = {"sparsegpt-50": 35.0, "wanda-50": 43.4, "sparsegpt-2of4": 58.0}
    for row, bar in bars.items():
        if row in by:
            r = by[row]
            exact = r["zeros_min"] >= 0.5 and (r["max_nonzeros_per_4"] <= 2 if "2of4" in row else r["zeros_max"] <= 0.5005)
            out.append((f"{row}: ppl <= {bar} and 50% zeros in every layer" + (" (<= 2 nonzeros per 4)" if "2of4" in row
                                                                                else ""),
                        r["ppl"] <= bar and exact, f"ppl {r['ppl']:.3f}, zeros {r['zeros_min']:.4f}-{r['zeros_max']:.4f}"))
    if "sparsegpt-2of4-w4g64" in by and "sparsegpt-2of4+rtn-w4g64" in by:
        a, b = by["sparsegpt-2of4-w4g64"]["ppl"], by["sparsegpt-2of4+rtn-w4g64"]["ppl"]
        out.append(("joint sparsegpt-2of4-w4g64 ppl <= sparsegpt-2of4 then RTN w4g64", a <= b, f"{a:.3f} vs {b:.3f}"))
    if "wanda-50" in by:
        v = by["wanda-50"]["linear_bytes_vs_dense_fp16"]
        out.append(("wanda-50 decoder-Linear bytes (fp16 + bitmask) <= 0.6x dense fp16", v <= 0.6, f"{v:.3f}"))
    if "prune-mlp-25" in by:
        w = by["prune-mlp-25"]["mlp_width"]
        out.append(("prune-mlp-25: MLP width is 75% of 1536", w == 1152, f"{w}; ppl {by['prune-mlp-25']['ppl']:.3f}"))
    for row, base in DISTILL.items():
        if row in by and base in by:
            r, b, fp = by[row], by[base], by["fp32"]["ppl"] if "fp32" in by else float("nan")
            rec = (b["ppl"] - r["ppl"]) / (b["ppl"] - fp) * 100
            minutes = (r["train_seconds"] + r["teacher_seconds"]) / 60
            what = "ppl <= 26.0" if row.startswith("gptq") else "recovers >= 40% of the ppl increase"
            ok = (r["ppl"] <= 26.0 if row.startswith("gptq") else rec >= 40) and minutes <= 20
            if row.startswith("sparsegpt"):
                ok = ok and r["zeros_min"] >= 0.5 and r["zeros_max"] <= 0.5005
                what += ", still 50% zeros in every layer"
            out.append((f"{row}: {what}, in <= 20 min of training", ok,
                        f"{b['ppl']:.3f} -> {r['ppl']:.3f} ({rec:.0f}% of +{b['ppl'] - fp:.2f} recovered), "
                        f"{minutes:.1f} min at {r['train_tok_s']:.0f} tok/s"))
            out.append((f"{row}: peak RSS <= 3 GB", r["compress_rss_mib"] <= 3072, f"{r['compress_rss_mib']:.0f} MiB"))
    if "svd-llm-80" in by:
        r, fp = by["svd-llm-80"], by["fp32"]["ppl"] if "fp32" in by else float("nan")
        d = r["ppl"] - fp
        out.append(("svd-llm-80 keeps 80% of the decoder Linear parameters (within 1%)",
                    abs(r["params_kept"] - 0.8) <= 0.01, f"{r['params_kept']:.4f}"))
        if "svd-80" in by:
            ds = by["svd-80"]["ppl"] - fp
            out.append(("svd-llm-80 Δppl <= 0.2 x plain svd-80's", d <= 0.2 * ds, f"{d:+.3f} vs {ds:+.3f} "
                        f"({d / ds:.3f})"))
        if PRUNE_AT_80 in by:
            dp, kp = by[PRUNE_AT_80]["ppl"] - fp, by[PRUNE_AT_80]["params_kept"]
            out.append((f"svd-llm-80 Δppl <= structured pruning's at the same parameters ({PRUNE_AT_80}, "
                        f"{kp:.4f} kept)", d <= dp, f"{d:+.3f} vs {dp:+.3f}"))
        v = r["linear_bytes_vs_fp32"]
        out.append(("svd-llm-80 decoder-Linear bytes <= 0.82x fp32's", v <= 0.82, f"{v:.3f}"))
    for r in by.values():
        if "reload_max_dlogit" in r:
            d = r["reload_max_dlogit"]
            out.append((f"{r['row']}: reloaded checkpoint's logits == in-memory model's (max |Δ| <= 1e-4)", d <= 1e-4,
                        f"{d:.1e}"))
    return out


def _pruning_table(rows: list[dict]) -> str:
    pr = [r for r in rows if r["row"] in PRUNING and "error" not in r]
    if not pr:
        return ""
    lines = ["| pruning row | ppl | zeros per layer (min-max) | max nonzeros per 4 | Linear bytes / dense fp16 | MLP width |",
             "|---|---|---|---|---|---|"]
    for r in pr:
        lines.append(f"| {r['row']} | {r['ppl']:.3f} | {r['zeros_min']:.4f}-{r['zeros_max']:.4f} | "
                     f"{r['max_nonzeros_per_4']} | {r['linear_bytes_vs_dense_fp16']:.3f} | {r['mlp_width']} |")
    return "\n".join(lines)


def _lowrank_table(rows: list[dict]) -> str:
    by = {r["row"]: r for r in rows if "error" not in r}
    lr = [r for r in (*LOWRANK, PRUNE_AT_80) if r in by]
    if not lr or "fp32" not in by:
        return ""
    fp = by["fp32"]["ppl"]
    lines = ["| low-rank row | ppl | Δppl | params kept | Linear bytes / fp32 | dense layers | compress s |",
             "|---|---|---|---|---|---|---|"]
    for row in lr:
        r = by[row]
        lines.append(f"| {row} | {r['ppl']:.3f} | {r['ppl'] - fp:+.3f} | {r['params_kept']:.4f} | "
                     f"{r['linear_bytes_vs_fp32']:.3f} | {r['dense_layers']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def _distill_table(rows: list[dict]) -> str:
    by = {r["row"]: r for r in rows if "error" not in r}
    if "fp32" not in by or not any(r in by and b in by for r, b in DISTILL.items()):
        return ""
    fp = by["fp32"]["ppl"]
    lines = ["| recipe | ppl before distill | after | recovered | training min (teacher + student) | tokens | tok/s |"
             " trained params |", "|---|---|---|---|---|---|---|---|"]
    for row, base in DISTILL.items():
        if row in by and base in by:
            r, b = by[row], by[base]
            lines.append(f"| {row} | {b['ppl']:.3f} | {r['ppl']:.3f} | {(b['ppl'] - r['ppl']) / (b['ppl'] - fp):.0%} | "
                         f"{(r['train_seconds'] + r['teacher_seconds']) / 60:.1f} ({r['teacher_seconds'] / 60:.1f} + "
                         f"{r['train_seconds'] / 60:.1f}) | {r['train_tokens']:,} | {r['train_tok_s']:.0f} | "
                         f"{r['trainable'] / 1e6:.2f} M |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--out", type=Path, default=ROOT / "out" / "quality")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    for f in ("wikitext2-test.txt", "wikitext2-valid.tokens"):
        if not (args.data / f).is_file():
            sys.exit(f"quality.py: {args.data / f} not found (pass --data DIR)")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for row in args.rows.split(","):
        print(f"[{time.strftime('%H:%M:%S')}] {row} ...", file=sys.stderr, flush=True)
        rows.append(_run_row(row, args))
        print(f"    {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    table = _table(rows, args.windows)
    m = machine_info(args.threads, PEER_PACKAGES)
    header = (f"SmolLM2-135M-Instruct, wikitext-2 test, first {args.windows} windows of 2048 tokens; "
              f"{m['cpu']}, {m['physical_cores']} cores ({m['logical_cpus']} logical), {m['threads']} threads; "
              f"torch {m['torch']} ({m['torch_cpu_capability']}), kernels {m['kernels']}; {m['date']}")
    checks = _acceptance(rows)
    acc = "\n".join(f"- [{'x' if ok else ' '}] {name}: {val}" for name, ok, val in checks)
    print(header)
    print(table)
    prune, dist, low = _pruning_table(rows), _distill_table(rows), _lowrank_table(rows)
    print("\n## acceptance (issues 3, 17, 18 and 19)\n" + acc)
    for t in (prune, dist, low):
        if t:
            print("\n" + t)
    (args.out / "quality.md").write_text(f"{header}\n\n{table}\n\n{prune}\n\n{dist}\n\n{low}\n\n"
                                         f"## acceptance (issues 3, 17, 18 and 19)\n{acc}\n")
    (args.out / "quality.json").write_text(json.dumps(
        {"header": header, "machine": m, "rows": rows,
         "acceptance": [dict(check=n, ok=o, value=v) for n, o, v in checks]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
