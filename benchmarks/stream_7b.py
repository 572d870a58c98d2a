"""`compress --stream` on a 7B-shaped llama: peak RSS, time, reload, and the same bytes as a non-streamed run.

    python benchmarks/stream_7b.py [--dir /big/disk/tmp] [--layers 32] [--gptq-layers 4] [--gptq-samples 16]

Builds a synthetic llama of 7B shape (hidden 4096, intermediate 11008, 32 heads, vocab 49152 with SmolLM2's
tokenizer; random fp16 weights, about 13 GB) shard by shard, one decoder block in memory at a time, then:

  1. ``compress --stream --recipe rtn-w4g64`` on it, in a child process: peak RSS (the child's ru_maxrss) and
     wall time; the issue's bar is 3 GB;
  2. the output loaded by `compressor.load` (the meta-device loader) in another child, and a forward on a few
     tokens that must give finite logits;
  3. a 2-layer slice of the same shape compressed with and without --stream: model.safetensors must be
     byte-identical;
  4. ``compress --stream`` with gptq-w4g64 (act-order, clip search, float-stream target) on a 4-layer model of
     7B width, `--gptq-samples` windows of 512 tokens: peak RSS and time.

Everything it writes is deleted at the end (the 7B source and output take ~17 GB). Exits 1 if a check fails.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressor.machine import cpu_model  # noqa: E402

MIB = 1 << 20
RUN = """import resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:]).returncode
print("RESULT", rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, time.perf_counter() - t)
"""


def synthetic_llama(path: Path, layers: int, hidden: int = 4096, inter: int = 11008, heads: int = 32,
                    vocab: int = 49152, seed: int = 0) -> Path:
    """A llama of the given shape with random fp16 weights, written one shard per decoder block."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from compressor.models import resolve

    path.mkdir(parents=True)
    AutoTokenizer.from_pretrained(resolve("smollm2-135m")).save_pretrained(path)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                      tie_word_embeddings=False, architectures=["LlamaForCausalLM"], dtype="float16")
    cfg.save_pretrained(path)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).half()

    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
              "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    n = layers + 1
    weight_map = {}
    for i in range(layers):
        shard = {f"model.layers.{i}.{k}.weight": rand(*s) for k, s in shapes.items()}
        shard.update({f"model.layers.{i}.{k}.weight": torch.ones(hidden, dtype=torch.float16)
                      for k in ("input_layernorm", "post_attention_layernorm")})
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        del shard
    stem = {"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden),
            "model.norm.weight": torch.ones(hidden, dtype=torch.float16)}
    name = f"model-{n:05d}-of-{n:05d}.safetensors"
    save_file(stem, str(path / name), metadata={"format": "pt"})
    weight_map.update({k: name for k in stem})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def measured(cmd: list[str]) -> tuple[int, float, float]:
    """(exit code, peak RSS MiB, seconds) of `cmd`, run in a child of a fresh process (its own ru_maxrss)."""
    out = subprocess.run([sys.executable, "-c", RUN, *cmd], capture_output=True, text=True)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT")), None)
    if line is None:
        sys.stderr.write(out.stdout[-3000:] + out.stderr[-3000:])
        return 1, 0.0, 0.0
    if not line.split()[1] == "0":
        sys.stderr.write(out.stdout[-3000:] + out.stderr[-3000:])
    rc, rss, sec = line.split()[1:]
    return int(rc), float(rss), float(sec)


def estimated(out: Path) -> str:
    """The preflight estimate compression.json keeps, as 'est. RSS MiB / s'."""
    try:
        pre = json.loads((out / "compression.json").read_text())["preflight"]
    except (OSError, KeyError, ValueError):
        return ""
    return f"preflight est. {pre['peak_rss_mib']:,.0f} MiB / {pre['seconds']:,.0f} s"


def compress_cmd(src: Path, recipe: str, out: Path, stream: bool, calib: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "compressor.cli", "--recipe", recipe, str(src), "-o", str(out), "--quiet"]
    if calib:
        cmd += ["--calib-data", calib]
    return cmd + (["--stream"] if stream else [])


LOAD = """import sys, torch, compressor
m = compressor.load(sys.argv[1])
n = sum(1 for _ in m.modules() if type(_).__name__ == "QuantLinear")
with torch.no_grad():
    y = m(input_ids=torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])).logits
assert torch.isfinite(y).all(), "non-finite logits"
print("LOADED", n, tuple(y.shape))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="where to build the models (needs ~22 GB free; default: a temp dir)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--gptq-layers", type=int, default=4)
    ap.add_argument("--gptq-samples", type=int, default=16)
    ap.add_argument("--calib-data", default=str(ROOT.parent / "shared" / "data" / "wikitext2-valid.tokens"))
    ap.add_argument("--skip", default="", help="comma list of steps to skip: rtn,slice,gptq")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    print(f"# {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    base = Path(tempfile.mkdtemp(prefix="stream7b-", dir=args.dir))
    rows, ok = [], True
    try:
        if "rtn" not in skip:
            t = time.perf_counter()
            src = synthetic_llama(base / f"llama-{args.layers}l", args.layers)
            src_gb = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 1e9
            print(f"built {src.name}: {src_gb:.2f} GB fp16 in {time.perf_counter() - t:.0f} s")
            out = base / "out-rtn"
            rc, rss, sec = measured(compress_cmd(src, "rtn-w4g64", out, stream=True))
            ok &= rc == 0 and rss <= 3 * 1024
            out_gb = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9 if rc == 0 else 0
            rows.append((f"rtn-w4g64 --stream, {args.layers} layers", rc, rss, sec,
                         f"{src_gb:.2f} GB -> {out_gb:.2f} GB; {estimated(out)}",
                         "PASS" if rc == 0 and rss <= 3 * 1024 else "FAIL (bar: 3072 MiB)"))
            shutil.rmtree(src)
            if rc == 0:
                res = subprocess.run([sys.executable, "-c", RUN, sys.executable, "-c", LOAD, str(out)],
                                     capture_output=True, text=True)
                loaded = next((l for l in res.stdout.splitlines() if l.startswith("LOADED")), None)
                r = next((l for l in res.stdout.splitlines() if l.startswith("RESULT")), "RESULT 1 0 0").split()
                ok &= loaded is not None
                rows.append(("compressor.load + forward", int(r[1]), float(r[2]), float(r[3]),
                             loaded or res.stderr[-200:], "PASS" if loaded else "FAIL"))
            shutil.rmtree(out, ignore_errors=True)
        if "slice" not in skip:
            src = synthetic_llama(base / "llama-2l", 2, seed=1)
            digests = {}
            for stream in (False, True):
                out = base / f"out-slice-{stream}"
                rc, rss, sec = measured(compress_cmd(src, "rtn-w4g64", out, stream=stream))
                digests[stream] = (out / "model.safetensors").read_bytes() if rc == 0 else None
                rows.append((f"rtn-w4g64 2-layer slice{' --stream' if stream else ''}", rc, rss, sec, "", ""))
            same = digests[False] is not None and digests[False] == digests[True]
            ok &= same
            rows.append(("2-layer slice: streamed == not streamed", 0, 0, 0,
                         f"{len(digests[True] or b'') / MIB:,.0f} MiB model.safetensors",
                         "PASS (byte-identical)" if same else "FAIL (bytes differ)"))
            shutil.rmtree(src)
        if "gptq" not in skip:
            src = synthetic_llama(base / f"llama-{args.gptq_layers}l", args.gptq_layers, seed=2)
            recipe = base / "gptq.yaml"
            recipe.write_text((ROOT / "compressor" / "recipes" / "gptq-w4g64.yaml").read_text()
                              .replace("samples: 64", f"samples: {args.gptq_samples}"))
            out = base / "out-gptq"
            rc, rss, sec = measured(compress_cmd(src, str(recipe), out, stream=True, calib=args.calib_data))
            ok &= rc == 0
            rows.append((f"gptq-w4g64 --stream, {args.gptq_layers} layers, {args.gptq_samples}x512 calib", rc, rss,
                         sec, estimated(out), "PASS" if rc == 0 else "FAIL"))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("\n| run | exit | peak RSS MiB | seconds | note | check |\n|---|---|---|---|---|---|")
    for name, rc, rss, sec, note, check in rows:
        print(f"| {name} | {rc} | {rss:,.0f} | {sec:,.0f} | {note} | {check} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
