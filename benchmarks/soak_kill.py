"""Soak: SIGKILL `compress` at random moments and check that there is never a third state.

    python benchmarks/soak_kill.py                 # 200 kills (about 25 minutes on 2 cores)
    python benchmarks/soak_kill.py --kills 10      # the CI version (tests/test_soak_kill.py)

A tiny 4-layer llama (built here, no data needed) is compressed by five runs in turn: rtn, gptq with
act-order, awq then gptq (block commits and a pass commit), and rtn and awq then gptq with ``--stream`` (every
pass's blocks committed, the checkpoint written tensor by tensor; the same bytes are expected). Every child runs on one thread, as do the
uninterrupted reference runs, so "identical" means identical bytes. Each child is sent SIGKILL either at a
uniformly random moment of its life, or, for half of them, a random moment inside a random one of the
writes the reference run made (`COMPRESSOR_TRACE_WRITES` makes every atomic write log when it begins and
when its rename is done, so a kill between the two is a kill mid-write; the count proves the test is not
vacuous).

After each kill the output must be absent, or complete: it loads, its bytes are the reference's and so are
its logits. Anything else is corrupt (does not load) or false-complete (loads, differs). Then, when the
work directory holds progress (a kill during calibration or the final save), ``--resume`` must finish with
the reference's bytes. What a kill leaves beside the output (``.out.tmp-PID-*``) is counted, and must be
swept by the resumed run.

Prints one table of counts and, with --json, writes them. Exits 1 when anything is corrupt or
false-complete, a resume differs, litter survives a resume, or fewer than --min-mid-write of the kills
landed mid-write.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPES = {
    "rtn": "passes:\n  - rtn: {bits: 4, group_size: 32}\n",
    "gptq": "calibration: {samples: 8, seqlen: 64}\npasses:\n  - gptq: {bits: 4, group_size: 32, act_order: true}\n",
    "awq-gptq": ("calibration: {samples: 8, seqlen: 64}\npasses:\n"
                 "  - awq: {bits: 4, group_size: 32, sym: false, clip: false}\n"
                 "  - gptq: {bits: 4, group_size: 32, sym: false, act_order: true}\n"),
}
# The same recipes through `compress --stream` (block commits in every pass, the checkpoint written tensor by
# tensor): the same reference bytes are expected.
STREAMED = {"rtn-stream": "rtn", "awq-gptq-stream": "awq-gptq"}
WORDS = ("the quick brown fox jumps over a lazy dog while models grow smaller and faster than before "
         "quantization rounds weights onto a grid").split()


def _env(trace: Path | None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("COMPRESSOR_TRACE_WRITES", None)
    if trace is not None:
        env["COMPRESSOR_TRACE_WRITES"] = str(trace)
    return env


def _cmd(model: Path, recipe: Path, out: Path, calib: Path, *extra: str) -> list[str]:
    stream = ("--stream",) if recipe.stem.endswith("-stream") else ()
    return [sys.executable, "-m", "compressor.cli", "--recipe", str(recipe), str(model), "-o", str(out),
            "--calib-data", str(calib), "--quiet", *stream, *extra]


def _events(trace: Path) -> list[tuple[str, str, float]]:
    if not trace.exists():
        return []
    out = []
    for line in trace.read_text().splitlines():
        parts = line.rsplit(" ", 1)
        if len(parts) == 2 and " " in parts[0]:
            kind, path = parts[0].split(" ", 1)
            out.append((kind, path, float(parts[1])))
    return out


def _open_write(events: list[tuple[str, str, float]]) -> str | None:
    """The destination of a write that began and whose rename did not finish, if any."""
    open_ = {}
    for kind, path, _ in events:
        if kind == "begin":
            open_[path] = True
        elif kind == "end":
            open_.pop(path, None)
    return next(iter(open_), None)


def _litter(out: Path) -> list[Path]:
    return [p for p in out.parent.glob(f".{out.name}.*")] + [p for p in out.parent.glob(f".{out.name}.work.*")]


class Reference:
    """An uninterrupted run of one recipe: its bytes, logits, life time and writes (start offset, duration)."""

    def __init__(self, name: str, model: Path, recipe: Path, calib: Path, root: Path, ids):
        import compressor
        import torch
        out, trace = root / f"ref-{name}", root / f"ref-{name}.trace"
        t0 = time.time()
        subprocess.run(_cmd(model, recipe, out, calib), env=_env(trace), check=True, capture_output=True)
        self.life = time.time() - t0
        self.bytes = (out / "model.safetensors").read_bytes()
        with torch.no_grad():
            self.logits = compressor.load(out)(input_ids=ids).logits
        begins, self.writes = {}, []
        for kind, path, t in _events(trace):
            if kind == "begin":
                begins[path] = t
            elif kind == "end" and path in begins:
                self.writes.append((begins[path] - t0, t - begins.pop(path)))


def check_output(out: Path, ref: Reference, ids) -> str:
    """absent, complete, corrupt (does not load) or false-complete (loads, differs from the reference)."""
    import compressor
    import torch
    if not out.exists():
        return "absent"
    try:
        model = compressor.load(out)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        same = (out / "model.safetensors").read_bytes() == ref.bytes and torch.equal(logits, ref.logits)
    except Exception:               # anything at all that stops it loading is a corrupt output
        return "corrupt"
    return "complete" if same else "false-complete"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, help="work here (default: a temporary directory, removed after)")
    ap.add_argument("--min-mid-write", type=float, default=0.2, help="fraction of kills that must land mid-write")
    ap.add_argument("--json", type=Path, help="write the counts here too")
    ap.add_argument("--recipes", help="comma list (default: all): rtn, gptq, awq-gptq, rtn-stream, awq-gptq-stream")
    args = ap.parse_args(argv)
    if args.kills < 1:
        ap.error(f"--kills {args.kills}: must be at least 1")
    import torch
    from compressor.testing import make_tiny_llama
    from compressor.workdir import has_progress

    root = args.dir or Path(tempfile.mkdtemp(prefix="soak-"))
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    model = make_tiny_llama(root / "llama", hidden=128, inter=256, layers=4, seed=args.seed)
    calib = root / "calib.txt"
    calib.write_text(" ".join(rng.choice(WORDS) for _ in range(20000)))
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(args.seed))
    recipes = {}
    chosen = args.recipes.split(",") if args.recipes else [*RECIPES, *STREAMED]
    unknown = [n for n in chosen if n not in RECIPES and n not in STREAMED]
    if unknown:
        ap.error(f"unknown recipe {unknown[0]!r}; choose from {', '.join([*RECIPES, *STREAMED])}")
    for name in chosen:
        text = RECIPES[STREAMED.get(name, name)]
        (root / f"{name}.yaml").write_text(text)
        recipes[name] = (root / f"{name}.yaml", Reference(name, model, root / f"{name}.yaml", calib, root, ids))
        print(f"reference {name}: {recipes[name][1].life:.1f} s, {len(recipes[name][1].writes)} atomic writes",
              flush=True)

    c = dict.fromkeys(["runs", "kills", "kills mid-write", "finished before the kill", "absent", "complete",
                       "corrupt", "false-complete", "resumed", "resumes bit-identical", "litter after kill",
                       "litter after resume"], 0)
    names = list(recipes)
    t_start = time.time()
    for i in range(args.kills):
        name = names[i % len(names)]
        recipe, ref = recipes[name]
        run = root / f"run-{i:04d}"
        run.mkdir()
        out, trace = run / "out", run / "trace"
        proc = subprocess.Popen(_cmd(model, recipe, out, calib), env=_env(trace),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.time()
        if rng.random() < 0.5 or not ref.writes:        # a random moment of its life
            time.sleep(rng.uniform(0, ref.life * 1.05))
        else:                                           # a random moment inside a random write
            k = rng.randrange(len(ref.writes))
            start, dur = ref.writes[k]
            while proc.poll() is None and sum(e[0] == "begin" for e in _events(trace)) <= k:
                time.sleep(0.0005)
            time.sleep(rng.uniform(0, dur))
        c["runs"] += 1
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.returncode != -signal.SIGKILL:
            c["finished before the kill"] += 1
        else:
            c["kills"] += 1
            c["kills mid-write"] += _open_write(_events(trace)) is not None
        state = check_output(out, ref, ids)
        c[state] += 1
        litter = _litter(out)
        c["litter after kill"] += bool(litter)
        work = out.parent / f"{out.name}.work"
        if state == "absent" and has_progress(work):
            c["resumed"] += 1
            r = subprocess.run(_cmd(model, recipe, out, calib, "--resume"), env=_env(None), capture_output=True,
                               text=True)
            if r.returncode == 0 and check_output(out, ref, ids) == "complete":
                c["resumes bit-identical"] += 1
            else:
                print(f"run {i} ({name}): resume failed or differs: {r.stderr.strip()[-400:]}", flush=True)
            c["litter after resume"] += bool(_litter(out))
        if state in ("corrupt", "false-complete"):
            print(f"run {i} ({name}): {state} output kept in {run}", flush=True)
        else:
            shutil.rmtree(run, ignore_errors=True)
        if (i + 1) % 10 == 0:
            print(f"  {i + 1}/{args.kills} runs, {time.time() - t_start:.0f} s: "
                  + ", ".join(f"{k} {v}" for k, v in c.items() if v), flush=True)

    mid = c["kills mid-write"] / max(c["kills"], 1)
    print(f"\nsoak_kill: {args.kills} runs, seed {args.seed}, recipes {', '.join(names)}, "
          f"{time.time() - t_start:.0f} s")
    width = max(map(len, c))
    for k, v in c.items():
        extra = f"  ({mid:.0%} of kills)" if k == "kills mid-write" else ""
        print(f"  {k:<{width}}  {v:>5}{extra}")
    if args.json:
        args.json.write_text(json.dumps({**c, "mid_write_fraction": mid, "seed": args.seed}, indent=1))
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    bad = []
    if c["corrupt"] or c["false-complete"]:
        bad.append(f"{c['corrupt']} corrupt and {c['false-complete']} false-complete outputs")
    if c["resumes bit-identical"] != c["resumed"]:
        bad.append(f"{c['resumed'] - c['resumes bit-identical']} of {c['resumed']} resumes differ")
    if c["litter after resume"]:
        bad.append(f"{c['litter after resume']} resumed runs left temporary directories behind")
    if mid < args.min_mid_write:
        bad.append(f"only {mid:.0%} of kills landed mid-write (< {args.min_mid_write:.0%}): the test proves little")
    for b in bad:
        print(f"FAIL: {b}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
