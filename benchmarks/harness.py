"""Shared benchmark harness: machine header, cache-busting timing, stream bandwidth, tables, JSON.

`machine_info` is `compressor.machine.machine_info`, the collector `compress-bench` uses too.

Conventions (house style, after nanoGPT/llm.c and Marlin's bench.py):
  * every timing is a median over repetitions, after warm-up;
  * weights rotate over copies totalling more than `ROTATE_BYTES`, so each call reads them from
    DRAM rather than from the last-level cache;
  * ratios are against baselines measured in the same run, on the same machine.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from typing import Callable, Sequence

import torch

from compressor.machine import machine_info  # the one collector, shared with compress-bench

__all__ = ["ROTATE_BYTES", "machine_info", "header", "copies_for", "time_rotating", "stream_read_gbps",
           "print_table", "write_json", "load_spec"]

ROTATE_BYTES = 1 << 30  # 1 GiB, well past any L3 on this class of machine


def header(title: str, info: dict) -> str:
    return (f"# {title}\n# cpu: {info['cpu']} | L3 {info['l3']} | threads: {info['threads']} | "
            f"torch {info['torch']} ({info['torch_cpu_capability']}) | kernels: {info['kernels']}")


def copies_for(nbytes: int, total: int = ROTATE_BYTES) -> int:
    """How many copies of an `nbytes` operand make more than `total` bytes (at least 2)."""
    return max(2, math.ceil((total + 1) / max(nbytes, 1)))


def time_rotating(fn: Callable, args: Sequence[tuple], reps: int = 30, warmup: int = 3,
                  min_time: float = 0.2, max_time: float = 3.0) -> float:
    """Median seconds of ``fn(*args[i % len(args)])``, cycling through the copies in order.

    Every call gets the next copy. The copies were written one after another, so each was last
    touched more than ROTATE_BYTES ago when its turn comes, in the first lap as in later ones; no
    full lap is needed. Runs at least `reps` calls and `min_time` seconds, at most `max_time`.
    """
    for i in range(warmup):
        fn(*args[i % len(args)])
    times, i, start = [], warmup, time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_time:
        a = args[i % len(args)]
        t0 = time.perf_counter()
        fn(*a)
        times.append(time.perf_counter() - t0)
        i += 1
        if time.perf_counter() - start > max_time and len(times) >= 5:
            break
    return statistics.median(times)


def stream_read_gbps(nbytes: int = 2 * ROTATE_BYTES, reps: int = 7) -> dict:
    """Streaming read bandwidth in GB/s, the best of two reads of `nbytes` of float32.

    * ``sum``: a vectorised sum, one add per 4 bytes, one sequential stream per thread;
    * ``gemv``: fp32 matrix-vector products over (4096, 4096) row blocks, which MKL/oneDNN run with
      several concurrent streams per core (on a Xeon one core gets ~11 GB/s from one stream and
      ~18 GB/s from four, because the hardware prefetchers run each stream only so far ahead);
    * ``streams8``: compressor's C++ probe reading eight interleaved streams per thread, when the
      extension is built.

    All do far less arithmetic than the cores can issue, so their time is the time to read the
    buffer from DRAM. Returns {probe: GB/s, ..., "best": GB/s}; "best" is what kernels are judged
    against, so a kernel's fraction of it is a fraction of what this machine can really read.
    """
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    rows = buf.view(-1, 4096)
    x = torch.ones(4096)

    def gemv():
        for i in range(0, rows.shape[0], 4096):
            torch.mv(rows[i:i + 4096], x)

    probes = [("sum", buf.sum), ("gemv", gemv)]
    from compressor import kernels
    if kernels.extension is not None:
        ints = buf.view(torch.int32)
        probes.append(("streams8", lambda: kernels.extension._stream_read(ints, 8)))
    out = {}
    for name, fn in probes:
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = nbytes / statistics.median(times) / 1e9
    del buf, rows, probes
    out["best"] = max(out.values())
    return out


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Markdown table. columns: (key, title, format spec); missing values print as '—'."""
    def cell(r, key, fmt):
        v = r.get(key)
        if v is None:
            return "—"
        return format(v, fmt) if fmt else str(v)
    print("| " + " | ".join(t for _, t, _ in columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for r in rows:
        print("| " + " | ".join(cell(r, k, f) for k, _, f in columns) + " |")


def write_json(path: str, info: dict, rows: list[dict], **extra) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"machine": info, **extra, "rows": rows}, f, indent=1)


def load_spec(spec: str):
    """(model, tokenizer) for a named model, an HF directory, a .gguf file or a compressed checkpoint,
    loaded as compress-bench loads it (checkpoints repacked for the kernels)."""
    from compressor.bench.measure import load_model
    from compressor.checkpoint import is_checkpoint
    from compressor.models import resolve
    model, tok, _ = load_model(spec if is_checkpoint(spec) else resolve(spec))
    return model, tok
