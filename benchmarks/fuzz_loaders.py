"""Fuzz every loader of a user's file: each failure must be one of the project's typed errors.

    python benchmarks/fuzz_loaders.py                     # 10,000 inputs per parser
    python benchmarks/fuzz_loaders.py -n 500              # the CI version (tests/test_fuzz_loaders.py)
    python benchmarks/fuzz_loaders.py --parser recipe -n 20000

Parsers, each seeded from a valid file made here (a tiny llama, compressed by rtn) plus every past crash
kept in ``benchmarks/fuzz_corpus/PARSER/``:

    safetensors    compressor.models.read_safetensors (ours and a source model's weights)
    config         compressor.load on a checkpoint whose config.json is mutated
    compression    compressor.load on a checkpoint whose compression.json is mutated
    checkpoint     compressor.load on a checkpoint whose model.safetensors is mutated
    recipe         compressor.recipe.load_recipe (YAML)
    text           compressor.calib.calibration_windows (calibration and evaluation text)
    gguf           compressor.models.gguf_to_hf (GGUF input)

Each input is a valid seed put through 1 to 4 random mutations (bit flips, interesting bytes and integers,
inserted, deleted, duplicated or truncated ranges, JSON and YAML tokens, huge numbers in place of numbers).
A run that raises `compressor.errors.InputError`, or returns, is fine; any other exception is a crash, a run
over --timeout seconds a hang, and growth of the peak RSS over --rss-mib a leak. Crashes are written to
the corpus with --save-crashes. Prints a table of counts per parser; exits 1 on any crash, hang or leak.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import random
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
INTERESTING = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff\xff\xff\xff", b"\x00\x00\x00\x80",
               b"\xff\xff\xff\xff\xff\xff\xff\x7f", b"\x00\x00\x00\x00\x00\x00\x00\x00"]
NUMBERS = [b"0", b"-1", b"1", b"65", b"2147483648", b"9223372036854775807", b"18446744073709551616",
           b"1e309", b"-1e309", b"NaN", b"1.5", b"100000000000"]
TOKENS = [b"null", b"[]", b"{}", b'""', b'"x"', b"true", b"false", b"[[[[", b"}}}", b": ", b"- ", b"\n  ",
          b"!!python/object:os.system", b"&a [*a, *a]", b"\xef\xbf\xbd", b"\\u0000"]


class Hang(BaseException):
    """Raised by the alarm: an input that ran too long (BaseException, so a loader's `except Exception`
    does not swallow it)."""


def mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(9)
        n = len(b)
        i = rng.randrange(n + 1) if n else 0
        if op == 0 and n:                              # flip bits
            for _ in range(rng.randint(1, 8)):
                j = rng.randrange(n)
                b[j] ^= 1 << rng.randrange(8)
        elif op == 1:                                  # an interesting byte string over the data
            v = rng.choice(INTERESTING)
            b[i:i + len(v)] = v
        elif op == 2:                                  # insert random bytes
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 3 and n:                            # delete a range
            del b[i:i + rng.randint(1, max(1, n // 8))]
        elif op == 4 and n:                            # truncate
            del b[rng.randrange(n):]
        elif op == 5 and n:                            # duplicate a range
            j = rng.randrange(n)
            b[i:i] = b[j:j + rng.randint(1, 64)]
        elif op == 6:                                  # a token of JSON or YAML
            b[i:i] = rng.choice(TOKENS)
        elif op == 7:                                  # a number becomes a huge, negative or odd one
            nums = [m.span() for m in re.finditer(rb"-?\d+(\.\d+)?", bytes(b[:200_000]))]
            if nums:
                s, e = rng.choice(nums)
                b[s:e] = rng.choice(NUMBERS)
        elif op == 8 and n >= 8:                       # a little-endian length field set to an odd value
            j = rng.randrange(0, min(n - 7, 4096))
            b[j:j + 8] = rng.choice([0, 1, 2**31, 2**32 - 1, 2**40, 2**63 - 1, n, n * 2]).to_bytes(8, "little")
    return bytes(b)


@contextlib.contextmanager
def deadline(seconds: float):
    def on_alarm(signum, frame):
        raise Hang(f"over {seconds} s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Fixtures:
    """The valid files every parser starts from: a tiny llama, its rtn checkpoint, a recipe, text, a GGUF."""

    def __init__(self, root: Path):
        import compressor
        from compressor.testing import make_tiny_llama
        self.root = root
        self.model = make_tiny_llama(root / "llama", hidden=64, inter=128, layers=2, vocab=320)  # BPE merges: gguf
        self.text = root / "calib.txt"
        self.text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
        self.recipe = root / "recipe.yaml"
        self.recipe.write_text("calibration: {samples: 4, seqlen: 32}\npasses:\n"
                               "  - gptq: {bits: 4, group_size: 32, act_order: true, sym: false}\n"
                               "save: {format: gptq}\n")
        self.ckpt = root / "ckpt"
        compressor.compress(str(self.model), self._rtn(), self.ckpt, progress=False)
        from compressor.export import export
        self.gguf_dir = root / "gguf"
        export(self.ckpt, "gguf", self.gguf_dir, pre_tokenizer="gpt-2")
        self.gguf = next(self.gguf_dir.glob("*.gguf"))
        from transformers import AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(self.model)

    def _rtn(self) -> Path:
        r = self.root / "rtn.yaml"
        r.write_text("passes:\n  - rtn: {bits: 4, group_size: 32, sym: true}\n")
        return r


def _checkpoint_with(fx: Fixtures, tmp: Path, name: str, data: bytes) -> Path:
    d = tmp / "ckpt"
    shutil.copytree(fx.ckpt, d)
    (d / name).write_bytes(data)
    return d


def parsers(fx: Fixtures) -> dict[str, tuple[bytes, Callable[[bytes, Path], object]]]:
    import compressor
    from compressor.calib import calibration_windows
    from compressor.models import gguf_to_hf, read_safetensors
    from compressor.recipe import load_recipe

    def safetensors(data, tmp):
        (tmp / "w.safetensors").write_bytes(data)
        return read_safetensors(tmp / "w.safetensors")

    def text(data, tmp):
        (tmp / "t.txt").write_bytes(data)
        return calibration_windows(tmp / "t.txt", fx.tokenizer, 4, 16)

    def recipe(data, tmp):
        (tmp / "r.yaml").write_bytes(data)
        return load_recipe(tmp / "r.yaml")

    def gguf(data, tmp):
        (tmp / "m.gguf").write_bytes(data)
        return gguf_to_hf(tmp / "m.gguf", tmp / "hf")

    def in_checkpoint(name):
        return lambda data, tmp: compressor.load(_checkpoint_with(fx, tmp, name, data))

    return {
        "safetensors": ((fx.ckpt / "model.safetensors").read_bytes(), safetensors),
        "config": ((fx.ckpt / "config.json").read_bytes(), in_checkpoint("config.json")),
        "compression": ((fx.ckpt / "compression.json").read_bytes(), in_checkpoint("compression.json")),
        "checkpoint": ((fx.ckpt / "model.safetensors").read_bytes(), in_checkpoint("model.safetensors")),
        "recipe": (fx.recipe.read_bytes(), recipe),
        "text": (fx.text.read_bytes(), text),
        "gguf": (fx.gguf.read_bytes(), gguf),
    }


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fuzz(name: str, seed_bytes: bytes, run, n: int, rng: random.Random, timeout: float, save: bool,
         work: Path) -> dict:
    from compressor.errors import InputError
    seeds = [seed_bytes] + [p.read_bytes() for p in sorted((CORPUS / name).glob("*")) if p.is_file()]
    counts = Counter()
    crashes: dict[str, tuple[str, bytes]] = {}
    rss0, t0 = _rss_mib(), time.time()
    for i in range(n):
        data = seeds[0] if i == 0 else (seeds[i] if i < len(seeds) else mutate(rng.choice(seeds), rng))
        tmp = Path(tempfile.mkdtemp(dir=work))
        try:
            with deadline(timeout):
                run(data, tmp)
            counts["loaded"] += 1
        except InputError:
            counts["typed error"] += 1
        except Hang:
            counts["hang"] += 1
            crashes.setdefault(f"hang over {timeout} s", ("", data))
        except Exception as e:  # noqa: BLE001  (what the fuzzer is looking for)
            counts["untyped error"] += 1
            where = traceback.extract_tb(e.__traceback__)[-1]
            key = f"{type(e).__name__} at {Path(where.filename).name}:{where.lineno}"
            crashes.setdefault(key, (f"{type(e).__name__}: {str(e)[:200]}", data))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if save:
        for key, (_, data) in crashes.items():
            d = CORPUS / name
            d.mkdir(parents=True, exist_ok=True)
            (d / f"crash-{hashlib.sha256(data).hexdigest()[:16]}").write_bytes(data)
    return {"inputs": n, **counts, "seconds": time.time() - t0, "rss_growth_mib": _rss_mib() - rss0,
            "crashes": {k: v[0] for k, v in crashes.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10_000, help="inputs per parser (default 10,000)")
    ap.add_argument("--parser", action="append", help="only these parsers (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds an input may take")
    ap.add_argument("--rss-mib", type=float, default=1024, help="peak RSS growth allowed per parser")
    ap.add_argument("--save-crashes", action="store_true", help=f"add crashing inputs to {CORPUS}")
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)
    os.environ["TQDM_DISABLE"] = "1"
    warnings.simplefilter("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        fx = Fixtures(root)
        table = parsers(fx)
        chosen = args.parser or list(table)
        unknown = [p for p in chosen if p not in table]
        if unknown:
            ap.error(f"unknown parser {unknown[0]!r}; known: {', '.join(table)}")
        results = {}
        for i, name in enumerate(chosen):
            seed, run = table[name]
            results[name] = fuzz(name, seed, run, args.n, random.Random(args.seed * 1000 + i), args.timeout,
                                 args.save_crashes, root)
            r = results[name]
            print(f"{name}: {r['inputs']} inputs in {r['seconds']:.0f} s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    cols = ["inputs", "loaded", "typed error", "untyped error", "hang", "rss_growth_mib"]
    print(f"\nfuzz_loaders: seed {args.seed}, timeout {args.timeout} s")
    print(f"  {'parser':<12}" + "".join(f"{c:>15}" for c in cols))
    bad = False
    for name, r in results.items():
        print(f"  {name:<12}" + "".join(f"{r.get(c, 0):>15.0f}" for c in cols))
        if r.get("untyped error") or r.get("hang") or r["rss_growth_mib"] > args.rss_mib:
            bad = True
    for name, r in results.items():
        for key, msg in r["crashes"].items():
            print(f"  CRASH {name}: {key}: {msg}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
