"""Tensor digests of the shipped recipes' outputs, this tree against another commit, on this machine.

    python benchmarks/digests.py [--base acd7437] [--recipes rtn-w4g64,rtn-w8,gptq-w4g64,awq-w4g64,qlora-4bit]
                                 [--threads 2] [--data ../shared/data] [--out out/digests]

For every recipe, both trees compress SmolLM2-135M with the same calibration/training text and the
same thread count, each in its own process (the other commit's code is checked out with
``git worktree`` and put first on PYTHONPATH). Each run's ``model.safetensors`` (or
``adapter_model.safetensors`` for an adapter) is read as raw bytes: for every tensor its name,
dtype, shape and the sha256 of its bytes, and a digest over all of them. The table says whether the
two trees wrote the same tensors; the first differing tensor is named. The whole file's sha256 is
printed too: it matches only if the file header is written deterministically as well.

The base commit is the one before the pipeline rework (issue 15). ``--base-json`` reuses a saved
base run (``out/digests/base-<rev>.json``) instead of recompressing.

This script cannot use `compressor.worker`: the other commit's code predates it, so the child is a
plain ``python digests.py --child`` that imports whichever `compressor` comes first on its path.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASE = "acd7437"
RECIPES = ("rtn-w4g64", "rtn-w8", "gptq-w4g64", "awq-w4g64", "qlora-4bit")
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors")


def tensor_digests(path: Path) -> dict:
    """{"tensors": {name: [dtype, shape, sha256]}, "digest": sha256 over them, "file_sha256": ...}."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    body = raw[8 + n:]
    tensors = {}
    for name in sorted(k for k in header if k != "__metadata__"):
        h = header[name]
        a, b = h["data_offsets"]
        tensors[name] = [h["dtype"], h["shape"], hashlib.sha256(body[a:b]).hexdigest()]
    digest = hashlib.sha256(json.dumps(tensors, sort_keys=True).encode()).hexdigest()
    return {"tensors": tensors, "digest": digest, "file_sha256": hashlib.sha256(raw).hexdigest()}


def child(recipe: str, out: Path, data: Path, threads: int) -> dict:
    """Compress with whichever `compressor` is first on sys.path; return the weight file's digests."""
    import torch
    torch.set_num_threads(threads)
    import compressor
    t0 = time.perf_counter()
    compressor.compress("smollm2-135m", recipe, out, calib_data=str(data / "wikitext2-valid.tokens"),
                        train_data=str(data / "wikitext2-valid.tokens"), overwrite=True, progress=False)
    f = next(out / w for w in WEIGHT_FILES if (out / w).is_file())
    return {"recipe": recipe, "file": f.name, "seconds": round(time.perf_counter() - t0, 1),
            "compressor": str(Path(compressor.__file__).parent), **tensor_digests(f)}


def run_tree(tree: Path, recipe: str, args, tag: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(args.threads), COMPRESSOR_NO_EXT="1")
    out = args.out / tag / recipe
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", recipe, "--child-out", str(out),
           "--data", str(args.data), "--threads", str(args.threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tree, env=env)
    if r.returncode != 0:
        tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-1:] or [f"exit {r.returncode}"]
        return {"recipe": recipe, "error": tail[0][:300]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def compare(a: dict, b: dict) -> str:
    if "error" in a or "error" in b:
        return "failed: " + (a.get("error") or b.get("error"))
    if a["digest"] == b["digest"]:
        return "identical"
    ta, tb = a["tensors"], b["tensors"]
    if set(ta) != set(tb):
        extra = sorted(set(ta) ^ set(tb))
        return f"DIFFERENT names ({len(extra)} differ, e.g. {extra[0]})"
    first = next(k for k in sorted(ta) if ta[k] != tb[k])
    return f"DIFFERENT from {first} on ({sum(ta[k] != tb[k] for k in ta)} of {len(ta)} tensors)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default=DEFAULT_BASE, help=f"commit to compare against (default {DEFAULT_BASE})")
    p.add_argument("--base-json", type=Path, help="reuse a saved base run instead of compressing again")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=ROOT / "out" / "digests")
    p.add_argument("--only-this", action="store_true", help="digest this tree only (no comparison)")
    p.add_argument("--only-base", action="store_true", help="digest the base commit only and save it (for --base-json)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.data, args.out = args.data.resolve(), args.out.resolve()
    if args.child:
        print(json.dumps(child(args.child, args.child_out, args.data, args.threads)))
        return 0
    for f in ("wikitext2-valid.tokens",):
        if not (args.data / f).is_file():
            sys.exit(f"digests.py: {args.data / f} not found (pass --data DIR)")
    recipes = [r for r in args.recipes.split(",") if r]
    rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip() or args.base
    base: dict = {}
    if args.base_json:
        base = {r["recipe"]: r for r in json.loads(args.base_json.read_text())["runs"]}
    elif not args.only_this:
        with tempfile.TemporaryDirectory(prefix="digests-base-") as td:
            tree = Path(td) / "tree"
            subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), rev], cwd=ROOT, check=True)
            try:
                for r in recipes:
                    print(f"[{time.strftime('%H:%M:%S')}] base {rev}: {r} ...", file=sys.stderr, flush=True)
                    base[r] = run_tree(tree, r, args, f"base-{rev}")
            finally:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"base-{rev}.json").write_text(json.dumps({"rev": rev, "runs": list(base.values())}, indent=1))
    if args.only_base:
        print(json.dumps({r: (b.get("digest"), b.get("error")) for r, b in base.items()}, indent=1))
        return 0
    this = {}
    for r in recipes:
        print(f"[{time.strftime('%H:%M:%S')}] this tree: {r} ...", file=sys.stderr, flush=True)
        this[r] = run_tree(ROOT, r, args, "this")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "this.json").write_text(json.dumps({"runs": list(this.values())}, indent=1))
    print(f"threads {args.threads}; calibration and training text {args.data / 'wikitext2-valid.tokens'}")
    print(f"| recipe | file | tensors | digest {rev} | digest this tree | file sha256 {rev} | file sha256 this | tensors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in recipes:
        a, b = base.get(r, {}), this[r]
        short = lambda d, k: d.get(k, "—")[:12]  # noqa: E731
        verdict = compare(a, b) if a else "—"
        print(f"| {r} | {b.get('file', '—')} | {len(b.get('tensors', {}))} | {short(a, 'digest')} | "
              f"{short(b, 'digest')} | {short(a, 'file_sha256')} | {short(b, 'file_sha256')} | {verdict} |")
    return 0 if all(not base or compare(base[r], this[r]) == "identical" for r in recipes if r in base) else 1


if __name__ == "__main__":
    sys.exit(main())
