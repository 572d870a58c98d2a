"""The first-GPU check of the CUDA and Triton dequant-matmul kernels: correctness, speed, SmolLM2 decode.

Written without a GPU, to be run the first time one is there (under 5 minutes on one GPU):

1. which GPU backends of `compressor.kernels` can run (``cuda``: the extension of cuda/, ``triton``:
   `compressor.kernels.triton_gptq`), and what ``auto`` (the registered op) resolves to;
2. correctness of every available backend, and of ``auto``, against ``backend="reference"`` and a float64
   ``x @ W.T`` computed from the integer codes, over awkward shapes (M in {1, 3, 16, 17, 64, 256}, N in
   {192, 576, 1536, 99}, K = 576, 640 for g128), 4-bit g32/g64/g128 sym/asym with and without act-order,
   8-bit per channel sym/asym, fp16 and bf16 activations, one case with bias (the sweep of Marlin's
   test.py, Frantar et al., 2024);
3. speed on Llama-7B layer shapes, 4-bit g128 asym and 8-bit per channel, against fp16 ``F.linear`` timed
   in the same run: CUDA events around CUDA-graph replays of calls over weight copies that total several
   times the L2 cache, so every call reads its weight from DRAM, as in decoding (Marlin's bench.py reports
   GB/s the same way); then the acceptance goals of the 4-bit kernels, PASS or MISS;
4. greedy decode of SmolLM2-135M, batch 1: our 4-bit checkpoint (``--checkpoint``) against the fp16 HF
   model, tok/s and how many of the 128 greedy tokens are equal.

    python benchmarks/bench_cuda.py [--checkpoint DIR] [--out out/bench_cuda.json] [--quick]

Exit status: 0 all correct; 1 a mismatch or a kernel error anywhere (printed in full first); 2 no CUDA
GPU (one line on stderr, before any work); 3 no GPU backend can run. A MISS of a speed goal is reported,
not an error. Development run without a GPU: ``--device cpu --quick`` runs the same loops with ``auto``
(the C++ kernels of csrc/cpu/) against the reference, fp32 and bf16 activations (what the CPU kernels
take), and times with `time.perf_counter` (`harness.time_rotating`) instead of CUDA events.

`compressor` is imported only after the CUDA check: importing it loads (or compiles) the kernels, which
is work that a machine without a GPU should not do.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))          # harness, bench_decode
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))         # the repo's compressor, unless one is installed (with its CUDA extension)

DEFAULT_CHECKPOINT = ROOT / "out" / "engines" / "gptq-w4g64"
BUILD_CHECKPOINT = ("compress --recipe gptq-w4g64 smollm2-135m -o out/engines/gptq-w4g64 "
                    "--calib-data ../shared/data/wikitext2-valid.tokens")
GPU_BACKENDS = ("cuda", "triton")


# ---------------------------------------------------------------------------------------------
# layers: random codes and qparams, as tests/kernels/gptq_layers.py::packed_layer builds them
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Quant:
    bits: int
    group: int          # input channels per group; -1: one group per output channel
    sym: bool           # zero = 2**(bits-1): the layout drops the zeros
    act: bool           # act-order: a random g_idx of equal groups (the op gathers x[..., perm])

    @property
    def name(self) -> str:
        g = "-per-ch" if self.group == -1 else f"g{self.group}"
        return f"w{self.bits}{g}-{'sym' if self.sym else 'asym'}{'-act' if self.act else ''}"

    @property
    def in_features(self) -> int:
        return 640 if self.group == 128 else 576      # SmolLM2's 576 is not a multiple of 128


QUANTS = ([Quant(4, g, sym, act) for g in (32, 64, 128) for sym in (True, False) for act in (False, True)]
          + [Quant(8, -1, True, False), Quant(8, -1, False, False)])


def random_codes(n: int, k: int, quant: Quant, seed: int):
    """(q (N, K) int64 codes, scale (N, G) fp32 holding fp16 values, zero (N, G) fp32 integers, g_idx (K,) int32)."""
    g = torch.Generator().manual_seed(seed)
    gs = k if quant.group == -1 else quant.group
    q = torch.randint(0, 2 ** quant.bits, (n, k), generator=g)
    scale = (torch.rand(n, k // gs, generator=g) * 0.02 + 0.001).half().float()
    zero = (torch.full((n, k // gs), 2.0 ** (quant.bits - 1)) if quant.sym
            else torch.randint(1, 2 ** quant.bits, (n, k // gs), generator=g).float())
    g_idx = (torch.randperm(k, generator=g) // gs if quant.act else torch.arange(k) // gs).to(torch.int32)
    return q, scale, zero, g_idx


def random_layer(n: int, k: int, quant: Quant, seed: int):
    """(`PackedWeight` on the CPU, (N, K) float64 weight in the original channel order). The weight is exact:
    an integer of at most 8 bits times an fp16 scale fits the 24-bit fp32 mantissa, let alone float64."""
    from compressor.kernels import pack
    q, scale, zero, g_idx = random_codes(n, k, quant, seed)
    gl = g_idx.long()
    w = (q.double() - zero.double()[:, gl]) * scale.double()[:, gl]             # (N, K)
    return pack(q, scale, zero, quant.bits, quant.group, g_idx), w


def copy_to(packed, device):
    """A copy of `packed` of its own on `device` (`PackedWeight.to` does not copy on the same device)."""
    mv = lambda t: None if t is None else t.to(device, copy=True)  # noqa: E731
    return dataclasses.replace(packed, qweight=mv(packed.qweight), scales=mv(packed.scales),
                               zeros=mv(packed.zeros), perm=mv(packed.perm))


def packed_bytes(packed) -> int:
    """Bytes a call reads of the weight: codes, scales, zeros (and the act-order permutation)."""
    return sum(t.numel() * t.element_size() for t in (packed.qweight, packed.scales, packed.zeros, packed.perm)
               if t is not None)


# ---------------------------------------------------------------------------------------------
# 1. which kernels can run
# ---------------------------------------------------------------------------------------------

def no_cuda_message() -> str | None:
    """None when a CUDA GPU is usable, else the one line saying why not."""
    with warnings.catch_warnings(record=True) as caught:     # a CUDA torch without a driver warns here
        warnings.simplefilter("always")
        ok = torch.cuda.is_available()
        count = torch.cuda.device_count() if ok else 0
    if ok and count:
        return None
    why = "; ".join(" ".join(str(w.message).split()) for w in caught)
    return (f"bench_cuda.py needs a CUDA GPU: torch {torch.__version__} reports torch.version.cuda="
            f"{torch.version.cuda}, torch.cuda.is_available()={ok}" + (f" ({why})" if why else ""))


def gpu_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"device": device.type}
    import importlib.metadata as md
    p = torch.cuda.get_device_properties(device)
    try:
        triton_version = md.version("triton")
    except md.PackageNotFoundError:
        triton_version = None
    return {"device": "cuda", "name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2 ** 30, 1), "l2_bytes": getattr(p, "L2_cache_size", 0) or None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "triton": triton_version}


def availability(device: torch.device) -> tuple[dict[str, str | None], str]:
    """({GPU backend: None if it runs on `device`, else why not}, what ``auto`` runs on `device`)."""
    from compressor import kernels
    from compressor.kernels import ops
    why = {b: kernels.unavailable(b, device) for b in GPU_BACKENDS}
    auto = ops.cuda_extension_source if device.type == "cuda" else kernels.backend()
    return why, auto


# ---------------------------------------------------------------------------------------------
# 2. correctness
# ---------------------------------------------------------------------------------------------

# Error bound, relative to max|y| of the float64 product: two machine epsilons of the activation dtype.
# The kernel rounds its output to the dtype (<= eps/2 of |y| <= max|y|); the reference also rounds the
# dequantized weight to the dtype, an error of ~eps/sqrt(3) per product with random signs, so ~eps/sqrt(3)
# of the typical |y| in a K-term sum; fp32 summation order costs ~1e-6. Measured on the CPU over these
# shapes: the reference is within 4.9e-4 (fp16) and 4.8e-3 (bf16) of max|y| of float64, 4x and 3.3x below
# the bound; kernel vs reference may differ by the sum of both (the C++ bf16 kernel: 6.7e-3; the Triton
# kernel in its interpreter, fp16: 1e-5, as it rounds the weight as the reference does). A wrong group,
# zero, tile or permutation errs by a good fraction of max|y|. fp16 also catches a 1% scale error
# (1e-2 > 2e-3); bf16 does not, but the same kernels run the same shapes in fp16. fp32 is for the CPU
# development run only: the C++ kernel splits fp32 activations into three int8 slices (<= 3e-6 relative,
# compressor/kernels/__init__.py), plus fp32 sums over K <= 640.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}

CHECK_M = (1, 3, 16, 17, 64, 256)
CHECK_N = (192, 576, 1536, 99)              # SmolLM2's k/v, hidden and MLP widths, and an odd N
QUICK_M = (1, 3, 17)
QUICK_N = (99, 192)
BIAS_CASE = (Quant(4, 128, False, True), 3, 99)   # (quant, M, N), run once per backend and dtype
# activations checked: what a model on CUDA runs; on the CPU, what the C++ kernels take (they refuse fp16)
CHECK_DTYPES = {"cuda": (torch.float16, torch.bfloat16), "cpu": (torch.float32, torch.bfloat16)}


def compare(y: torch.Tensor | None, y_ref: torch.Tensor | None, y64: torch.Tensor, dtype: torch.dtype) -> dict:
    """Errors of `y` relative to max|y64|, vs `y_ref` (None: no oracle) and vs `y64`, and whether within tolerance.

    Returns {"err_ref", "err_f64", "ok", "problem"}; a wrong shape or dtype, or a NaN/inf, is not ok."""
    tol = TOLERANCE[dtype]
    out = {"err_ref": None, "err_f64": None, "ok": False, "problem": None}
    if y is None:
        out["problem"] = "no output"
        return out
    if tuple(y.shape) != tuple(y64.shape) or y.dtype != dtype or y.device != y64.device:
        out["problem"] = (f"returned {tuple(y.shape)} {y.dtype} on {y.device}, "
                          f"want {tuple(y64.shape)} {dtype} on {y64.device}")
        return out
    scale = y64.abs().max().item() or 1.0
    yd = y.double()
    out["err_f64"] = (yd - y64).abs().max().item() / scale
    if y_ref is not None:
        out["err_ref"] = (yd - y_ref.double()).abs().max().item() / scale
    if not bool(torch.isfinite(y).all()):
        out["problem"] = "non-finite output"
        out["err_f64"] = float("inf")
        return out
    out["ok"] = out["err_f64"] <= tol and (out["err_ref"] is None or out["err_ref"] <= tol)
    return out


def _call(packed, x, bias, backend) -> tuple[torch.Tensor | None, str | None]:
    try:
        return packed(x, bias, backend=backend), None
    except Exception as e:                      # a kernel that raises is a failed case, not the end of the run
        return None, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def check(device: torch.device, backends: list[str], dtypes: list[torch.dtype], ms, ns, quants=QUANTS,
          bias_case=BIAS_CASE) -> list[dict]:
    """Every (quant, N, dtype, M) case on every backend: one dict per (case, backend), the reference's own
    error vs float64 included as backend "reference". After a backend raises, the rest of its cases of the
    same quant and dtype are skipped (and failed): a kernel that does not compile fails every M alike."""
    cases = [(q, n, tuple(ms), False) for q in quants for n in ns]
    bq, bm, bn = bias_case
    cases.append((bq, bn, (bm,), True))
    results, raised = [], {}
    for i, (quant, n, m_list, with_bias) in enumerate(cases):
        k = quant.in_features
        packed, w = random_layer(n, k, quant, seed=i)
        packed, w = packed.to(device), w.to(device)                      # w: (N, K) float64
        for dtype in dtypes:
            for m in m_list:
                g = torch.Generator().manual_seed(1000 * i + m)
                x = torch.randn(m, k, generator=g).to(dtype).to(device)  # (M, K)
                bias = (torch.randn(n, generator=g) * 0.1).to(dtype).to(device) if with_bias else None
                y64 = x.double() @ w.t()                                 # (M, N)
                if bias is not None:
                    y64 = y64 + bias.double()
                case = {"dtype": str(dtype).removeprefix("torch."), "bits": quant.bits, "quant": quant.name,
                        "M": m, "N": n, "K": k, "bias": with_bias}
                y_ref, err = _call(packed, x, bias, "reference")
                results.append({"backend": "reference", **case, **compare(y_ref, None, y64, dtype), "error": err})
                for b in backends:
                    key = (b, quant.name, dtype)
                    if key in raised:
                        results.append({"backend": b, **case, **compare(None, None, y64, dtype),
                                        "error": f"skipped: this quant and dtype raised ({raised[key]})"})
                        continue
                    y, err = _call(packed, x, bias, b)
                    if err:
                        raised[key] = err
                    results.append({"backend": b, **case, **compare(y, y_ref, y64, dtype), "error": err})
    return results


def summarise(results: list[dict]) -> list[dict]:
    """One row per (backend, dtype, bits): cases, mismatches, worst errors, tolerance."""
    rows: dict[tuple, dict] = {}
    for r in results:
        key = (r["backend"], r["dtype"], r["bits"])
        s = rows.setdefault(key, {"backend": r["backend"], "dtype": r["dtype"], "bits": r["bits"], "cases": 0,
                                  "mismatches": 0, "worst_ref": None, "worst_f64": None,
                                  "tol": TOLERANCE[getattr(torch, r["dtype"])]})
        s["cases"] += 1
        s["mismatches"] += not r["ok"]
        for src, dst in (("err_ref", "worst_ref"), ("err_f64", "worst_f64")):
            if r[src] is not None:
                s[dst] = r[src] if s[dst] is None else max(s[dst], r[src])
    return list(rows.values())


def describe(r: dict) -> str:
    """One failed case, for the mismatch list."""
    tol = TOLERANCE[getattr(torch, r["dtype"])]
    what = (r["error"] or r["problem"]
            or f"err vs reference {_e(r['err_ref'])}, vs float64 {_e(r['err_f64'])} (tol {tol:.1e})")
    bias = " +bias" if r["bias"] else ""
    return f"{r['backend']} {r['dtype']} {r['quant']} M={r['M']} N={r['N']} K={r['K']}{bias}: {what}"


def _e(v) -> str:
    return "—" if v is None else f"{v:.2e}"


# ---------------------------------------------------------------------------------------------
# 3. speed
# ---------------------------------------------------------------------------------------------

SPEED_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]   # (out, in), as nn.Linear.weight
SPEED_M = (1, 4, 16, 64, 256)
QUICK_SHAPES = [(512, 1024)]
QUICK_SPEED_M = (1, 16)
SPEED_QUANTS = [Quant(4, 128, False, False), Quant(8, -1, True, False)]
ACT = {"cuda": torch.float16, "cpu": torch.float32}     # the activation dtype timed (and decoded) per device
GRAPH_CALLS = 16        # calls per CUDA graph replay at least (more when there are more weight copies)
ROUNDS = 3              # kernels of one (shape, M) take turns this many times; each keeps the median of all
REPS = 10               # timed replays per kernel per round
GOALS = [(1, 3.0), (16, 2.5), (256, 1.0)]               # (M, times faster than fp16 F.linear at least)
GOAL_SHAPES = [(4096, 4096), (11008, 4096)]
GOAL_QUANT = SPEED_QUANTS[0].name                       # 4-bit g128 asym


def rotate_bytes(device: torch.device, quick: bool) -> int:
    """Total bytes the weight copies of one kernel span: 4 x the GPU's L2 (256 MB when torch does not say),
    or on the CPU the harness's 1 GiB (16 MB with --quick, where the figures mean nothing)."""
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        return 4 * l2 if l2 else 256 << 20
    import harness
    return 16 << 20 if quick else harness.ROTATE_BYTES


def cuda_timer(fn: Callable, copies: list) -> tuple[Callable[[int], list[float]], str, object]:
    """(measure(reps) -> seconds per call of each replay, mode, the graph to keep alive).

    The calls, over the copies in turn, are captured in one CUDA graph and each replay is timed with CUDA
    events: at M=1 a kernel reads 8 MB in a few µs, less than Python takes to launch it, and a graph
    measures the GPU's time rather than the launch path's. A call that cannot be captured (a host sync, a
    launch on the legacy stream) is timed eagerly instead, and the mode says so."""
    n = max(GRAPH_CALLS, len(copies))

    def lap():
        for i in range(n):
            fn(copies[i % len(copies)])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):           # warm-up off the default stream, as capture wants: compiles Triton,
        for i in range(3):                  # sizes cuBLAS's workspace
            fn(copies[i % len(copies)])
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph, mode = torch.cuda.CUDAGraph(), "graph"
    try:
        with torch.cuda.graph(graph):
            lap()
        graph.replay()
        torch.cuda.synchronize()
        run = graph.replay
    except Exception as e:
        torch.cuda.synchronize()
        graph, run = None, lap
        mode = f"eager ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
        lap()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def measure(reps: int) -> list[float]:
        out = []
        for _ in range(reps):
            start.record()
            run()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3 / n)
        return out
    return measure, mode, graph


def cpu_timer(fn: Callable, copies: list, quick: bool) -> tuple[Callable[[int], list[float]], str, object]:
    """The same interface on the CPU: `harness.time_rotating` (time.perf_counter), one median per round."""
    import harness
    args = [(c,) for c in copies]
    limits = dict(min_time=0.01, max_time=0.1) if quick else dict(min_time=0.05, max_time=0.6)

    def measure(reps: int) -> list[float]:
        return [harness.time_rotating(fn, args, reps=reps, warmup=2, **limits)]
    return measure, "perf_counter", None


@dataclass
class Kernel:
    quant: str              # "" for the float baseline
    backend: str            # the baseline's label for it
    copies: list            # weight copies spanning `rotate_bytes`
    weight_bytes: int       # of one copy
    run: Callable           # run(x, copy) -> y


def speed(device: torch.device, backends: list[str], shapes, ms, quick: bool) -> tuple[list[dict], str]:
    """Time the float baseline and every backend on every (shape, M), interleaved. Returns (rows, baseline)."""
    import harness
    act = ACT[device.type]
    baseline = f"{str(act).removeprefix('torch.').replace('float', 'fp')} F.linear"
    total = rotate_bytes(device, quick)
    rows = []
    for si, (n, k) in enumerate(shapes):
        kerns = []
        w = (torch.randn(n, k, generator=torch.Generator().manual_seed(si)) * 0.02).to(act)      # (N, K)
        nb = w.numel() * w.element_size()
        kerns.append(Kernel("", baseline, [w.to(device, copy=True) for _ in range(harness.copies_for(nb, total))],
                            nb, lambda x, w_: F.linear(x, w_)))
        del w
        for quant in SPEED_QUANTS:
            from compressor.kernels import pack
            q, scale, zero, g_idx = random_codes(n, k, quant, seed=si)
            one = pack(q, scale, zero, quant.bits, quant.group, g_idx)
            del q
            nb = packed_bytes(one)
            copies = [copy_to(one, device) for _ in range(harness.copies_for(nb, total))]
            for b in backends:
                kerns.append(Kernel(quant.name, b, copies, nb, lambda x, p, b=b: p(x, None, backend=b)))
        for m in ms:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(act).to(device)   # (M, K)
            io_bytes = x.numel() * x.element_size() + m * n * x.element_size()      # x read, y written
            timers, samples, errors = {}, {}, {}
            for j, kern in enumerate(kerns):
                fn = lambda c, kern=kern: kern.run(x, c)  # noqa: E731
                try:
                    timers[j] = (cuda_timer(fn, kern.copies) if device.type == "cuda"
                                 else cpu_timer(fn, kern.copies, quick))
                    samples[j] = []
                except Exception as e:
                    errors[j] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            for _ in range(ROUNDS):
                for j, (measure, _, _) in list(timers.items()):
                    try:
                        samples[j] += measure(REPS)
                    except Exception as e:
                        errors[j] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                        del timers[j]
            for j, kern in enumerate(kerns):
                row = {"shape": f"{n}x{k}", "out": n, "in": k, "M": m, "quant": kern.quant, "backend": kern.backend,
                       "bytes": kern.weight_bytes + io_bytes, "copies": len(kern.copies), "us": None, "GBps": None,
                       "timing": None, "error": errors.get(j)}
                if j in timers:
                    t = statistics.median(samples[j])
                    row.update(us=t * 1e6, GBps=row["bytes"] / t / 1e9, timing=timers[j][1])
                rows.append(row)
            del timers
        del kerns, copies, one                 # this shape's copies, before the next shape's are made
    base = {(r["out"], r["in"], r["M"]): r["us"] for r in rows if r["backend"] == baseline}
    for r in rows:
        b = base.get((r["out"], r["in"], r["M"]))
        r["x_base"] = b / r["us"] if b and r["us"] else None
    return rows, baseline


def acceptance(rows: list[dict], backends: list[str], baseline: str) -> list[dict]:
    """The speed goals of the 4-bit g128 kernels, per backend: PASS, MISS, or n/a when not measured."""
    out = []
    for m, bar in GOALS:
        for n, k in GOAL_SHAPES:
            for b in backends:
                r = next((r for r in rows if (r["out"], r["in"], r["M"], r["quant"], r["backend"]) ==
                          (n, k, m, GOAL_QUANT, b)), None)
                v = None if r is None else r["x_base"]
                out.append({"goal": f"{GOAL_QUANT} M={m} ({n},{k}) >= {bar}x {baseline}", "backend": b, "bar": bar,
                            "value": v, "status": "n/a" if v is None else ("PASS" if v >= bar else "MISS")})
    return out


# ---------------------------------------------------------------------------------------------
# 4. SmolLM2 decode
# ---------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_timed(model, ids: torch.Tensor, tokens: int, runs: int, device: torch.device, pad: int) -> dict:
    """Greedy decode of exactly `tokens` tokens: one warm-up, then the median of `runs` (wall clock, synced)."""
    gen = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=pad,
               attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(ids, **gen)
        _sync(device)
        warmup = time.perf_counter() - t0
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            out = model.generate(ids, **gen)
            _sync(device)
            times.append(time.perf_counter() - t0)
    new = out[0, ids.shape[1]:].tolist()
    if len(new) != tokens:
        raise RuntimeError(f"generated {len(new)} tokens, asked for {tokens}")
    t = statistics.median(times)
    return {"tok_s": tokens / t, "s_per_run": t, "runs": times, "warmup_s": warmup, "tokens": new}


def decode(checkpoint: Path, source: Path, device: torch.device, backends: list[str], prompt: int, tokens: int,
           runs: int) -> list[dict]:
    """The float model of `source` in the device's activation dtype, then the checkpoint under each backend."""
    import compressor
    from bench_decode import PROMPT               # the CPU decode benchmark's prompt, so the figures compare
    from compressor import kernels
    from compressor.nn import QuantLinear, prepare_
    from transformers import AutoModelForCausalLM, AutoTokenizer
    act = ACT[device.type]
    rows = []
    tok = AutoTokenizer.from_pretrained(checkpoint)               # the source's, saved beside the weights
    ids = tok(PROMPT, return_tensors="pt").input_ids[:, :prompt].to(device)
    if ids.shape[1] != prompt:
        raise RuntimeError(f"the prompt has {ids.shape[1]} tokens, need {prompt}")
    pad = tok.eos_token_id
    try:
        # .to(dtype) too: a transformers that predates `dtype=` (it said torch_dtype) would load fp32 silently
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=act).to(device=device, dtype=act).eval()
        rows.append({"model": f"HF {str(act).removeprefix('torch.')}", "backend": "—",
                     **generate_timed(hf, ids, tokens, runs, device, pad)})
        del hf
    except Exception as e:
        rows.append({"model": "HF", "backend": "—", "error": f"{type(e).__name__}: {e}"})
    try:
        model = prepare_(compressor.load(checkpoint, dtype=act).to(device))
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        on_kernels = sum(m.packed() is not None for m in layers)
        for b in backends:
            with kernels.use_backend(b):
                try:
                    r = generate_timed(model, ids, tokens, runs, device, pad)
                except Exception as e:
                    r = {"error": f"{type(e).__name__}: {e}"}
            rows.append({"model": checkpoint.name, "backend": b,
                         "layers": f"{on_kernels}/{len(layers)} in kernel layout", **r})
    except Exception as e:
        rows.append({"model": checkpoint.name, "backend": "—", "error": f"{type(e).__name__}: {e}"})
    base = rows[0] if "tok_s" in rows[0] else None
    for r in rows:
        if base and "tok_s" in r:
            r["x_hf"] = r["tok_s"] / base["tok_s"]
            same = [a == b for a, b in zip(r["tokens"], base["tokens"])]
            r["same_tokens"] = sum(same)
            r["first_diff"] = same.index(False) if not all(same) else None    # greedy: later tokens follow it
    return rows


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------

def write_json_atomic(path: str | Path, payload: dict) -> None:
    """`payload` as JSON at `path`, written to a temporary file beside it and renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, default=str)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                    help="compressed checkpoint for the decode part ('none' to skip; default out/engines/gptq-w4g64)")
    ap.add_argument("--source", default="smollm2-135m", help="the float model it came from (a name or HF directory)")
    ap.add_argument("--out", help="write every figure as JSON here (default out/bench_cuda.json on CUDA)")
    ap.add_argument("--quick", action="store_true", help="reduced shapes, and 16 decoded tokens once")
    ap.add_argument("--parts", nargs="+", choices=("correctness", "speed", "decode"),
                    default=["correctness", "speed", "decode"])
    ap.add_argument("--tokens", type=int, help="new tokens per decode (default 128; 16 with --quick)")
    ap.add_argument("--runs", type=int, help="timed decodes after the warm-up (default 3; 1 with --quick)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help=argparse.SUPPRESS)  # development
    args = ap.parse_args(argv)

    if args.device == "cuda":
        why = no_cuda_message()
        if why is not None:
            print(why, file=sys.stderr)
            return 2
    device = torch.device(args.device)
    out_path = args.out or (str(ROOT / "out" / "bench_cuda.json") if device.type == "cuda" else None)
    tokens = args.tokens or (16 if args.quick else 128)
    runs = args.runs or (1 if args.quick else 3)

    import harness
    info = harness.machine_info()
    gpu = gpu_info(device)
    print(f"# bench_cuda: dequant-matmul kernels on {device.type}{' (--quick)' if args.quick else ''}")
    if device.type == "cuda":
        print(f"# gpu: {gpu['name']} (sm_{gpu['capability'].replace('.', '')}, {gpu['sms']} SMs, "
              f"{gpu['memory_gib']} GiB, L2 {(gpu['l2_bytes'] or 0) >> 20} MiB) | torch {gpu['torch']} | "
              f"CUDA {gpu['cuda']} | triton {gpu['triton']}")
    print(f"# host: {info['cpu']} | threads {info['threads']} | torch {info['torch']} | CPU kernels: {info['kernels']}")

    why, auto = availability(device)
    print("\n## backends")
    for b, reason in why.items():
        print(f"- {b}: {'available' if reason is None else 'unavailable: ' + reason}")
    print(f"- auto (the registered op) on {device.type}: {auto}")
    gpu_ok = [b for b, reason in why.items() if reason is None]
    if device.type == "cuda" and not gpu_ok:
        print("no GPU backend can run: nothing to check (build the CUDA extension or install triton)")
        return 3
    # correctness: auto too, the path a model takes. On the CPU only auto: TRITON_INTERPRET=1 makes triton
    # "available" there, but the interpreter has no bf16 (compressor/kernels/triton_gptq.py)
    checked = ["auto"] + gpu_ok if device.type == "cuda" else ["auto"]
    timed = gpu_ok if device.type == "cuda" else ["auto"]
    report = {"machine": info, "gpu": gpu, "backends": {"unavailable": why, "auto": auto, "checked": checked,
                                                        "timed": timed}}
    failed = 0

    if "correctness" in args.parts:
        with torch.inference_mode():
            results = check(device, checked, list(CHECK_DTYPES[device.type]), QUICK_M if args.quick else CHECK_M,
                            QUICK_N if args.quick else CHECK_N)
        summary = summarise(results)
        bad = [r for r in results if not r["ok"]]
        failed += len(bad)
        print(f"\n## correctness: {len(results)} (case, backend) pairs, errors relative to max|y| of float64 x @ W.T")
        harness.print_table(summary, [("backend", "backend", ""), ("dtype", "dtype", ""), ("bits", "bits", ""),
                                      ("cases", "cases", ""), ("worst_ref", "worst vs reference", ".2e"),
                                      ("worst_f64", "worst vs float64", ".2e"), ("tol", "tolerance", ".1e"),
                                      ("mismatches", "mismatches", "")])
        for r in bad[:30]:
            print(f"- MISMATCH {describe(r)}")
        if len(bad) > 30:
            print(f"- ... and {len(bad) - 30} more (all in the JSON)")
        print(f"{len(bad)} mismatches")
        report["correctness"] = {"tolerance": {str(k).removeprefix("torch."): v for k, v in TOLERANCE.items()},
                                 "cases": len(results), "mismatches": len(bad), "summary": summary, "failures": bad}

    if "speed" in args.parts:
        with torch.inference_mode():
            rows, baseline = speed(device, timed, QUICK_SHAPES if args.quick else SPEED_SHAPES,
                                   QUICK_SPEED_M if args.quick else SPEED_M, args.quick)
        print(f"\n## speed: median of {ROUNDS}x{REPS} timings, weights rotated over "
              f"{rotate_bytes(device, args.quick) >> 20} MiB of copies; GB/s of weight + x read and y written")
        harness.print_table(rows, [("shape", "out x in", ""), ("M", "M", ""), ("quant", "quant", ""),
                                   ("backend", "backend", ""), ("us", "µs", ".1f"), ("GBps", "GB/s", ".0f"),
                                   ("x_base", f"vs {baseline}", ".2f"), ("timing", "timing", "")])
        errs = [r for r in rows if r["error"]]
        for r in errs:
            print(f"- ERROR {r['backend']} {r['quant']} {r['shape']} M={r['M']}: {r['error']}")
        failed += len(errs)
        goals = acceptance(rows, timed, baseline)
        print("\n## acceptance goals (a MISS is reported, not an error)")
        for g in goals:
            v = "not measured" if g["value"] is None else f"{g['value']:.2f}x"
            print(f"- {g['status']} {g['backend']}: {g['goal']}: {v}")
        report["speed"] = {"baseline": baseline, "rotate_bytes": rotate_bytes(device, args.quick), "rows": rows,
                           "acceptance": goals}

    if "decode" in args.parts:
        print(f"\n## decode: {args.source}, greedy, batch 1, {args.prompt}-token prompt + {tokens} tokens, "
              f"median of {runs} after a warm-up")
        ckpt = None if args.checkpoint == "none" else Path(args.checkpoint)
        source = None
        if ckpt is not None and not (ckpt / "compression.json").is_file():
            print(f"decode skipped: no checkpoint at {ckpt}; build it from the repo root with\n    {BUILD_CHECKPOINT}")
            ckpt = None
        if ckpt is not None:
            from compressor.models import resolve
            try:
                source = resolve(args.source)
            except Exception as e:
                print(f"decode skipped: cannot resolve the source model {args.source!r} ({e})")
        if ckpt is not None and source is not None:
            backends = ["auto"] + (["triton"] if device.type == "cuda" and set(gpu_ok) == set(GPU_BACKENDS) else [])
            rows = decode(ckpt, source, device, backends, args.prompt, tokens, runs)
            harness.print_table(rows, [("model", "model", ""), ("backend", "backend", ""), ("tok_s", "tok/s", ".1f"),
                                       ("x_hf", "vs HF", ".2f"), ("same_tokens", f"tokens = HF (of {tokens})", ""),
                                       ("first_diff", "first different", ""),
                                       ("warmup_s", "warm-up s", ".1f"), ("layers", "quantized layers", "")])
            errs = [r for r in rows if "error" in r]
            for r in errs:
                print(f"- ERROR {r['model']} {r['backend']}: {r['error']}")
            failed += len(errs)
            report["decode"] = [{k: v for k, v in r.items() if k != "tokens"} for r in rows]

    rc = 1 if failed else 0
    report["exit_code"] = rc
    if out_path:
        write_json_atomic(out_path, report)
        print(f"\nwrote {out_path}")
    print(f"\n## result: {'FAIL, ' + str(failed) + ' mismatches or errors' if failed else 'all correct'} (exit {rc})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
