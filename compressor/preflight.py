"""Before any work: what a run will need (peak RAM, disk, time), printed, and refused when it cannot fit.

`estimate` counts from the model's shapes, the recipe and the calibration size, on top of what the
process already holds (its RSS now: libraries, the loaded model, the tokenizer):

  * RAM. A calibrated pass (`compressor.layerwise`) keeps the calibration stream of one block, its next
    inputs and its outputs (3 x tokens x hidden x 4 bytes), the float stream's windows in fp16 when it has
    one, and per block the largest Linear input it collects (tokens x in_features x 4), the inputs and
    outputs its shortcuts keep (2 x tokens x hidden x 4) and the MLP's activations of a batch. A work-directory
    commit of the stream (`compressor.workdir`) adds one copy. The save holds the packed state dict and its
    file image. With --stream (`compressor.stream`) the model is not in memory: one block at fp32 and a
    layer's rounding copies instead, and the save (tensor by tensor) comes after the sweeps, so the peak is
    the larger of the two phases. Training passes add their optimiser and activations (not modelled yet:
    reported as such).
  * Disk: the checkpoint (packed codes, scales, the float tensors at their stored width), the work
    directory (the stream, one block, the model after each pass but the last), and their sum is checked
    against the output's file system.
  * Time: the flops of the block forwards, the Hessians, the GPTQ solve and the clip search, at this
    machine's measured matmul rate, plus the column loop's Python steps at its measured per-op latency, plus
    the rounding, packing and self-check of every quantized weight at its measured cost per weight.
    The constants were fitted on SmolLM2-135M with gptq-w4g64 (README: "Preflight"); other recipes are
    counted by the same terms and are rougher.

`check_fits` refuses a run whose RAM estimate exceeds what the machine has available, or whose disk
estimate exceeds the free space where the output goes, naming both figures and what to change.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import InputError

__all__ = ["Estimate", "estimate", "check_fits", "PreflightError", "machine_rates", "peak_rss_mib"]

MIB = 1 << 20
_CALIBRATED = ("gptq", "awq", "sparsegpt", "wanda")     # passes that run the layer-wise calibration loop
_GRID = 100                                             # mse_clip_search candidates
_FWD_PER_BLOCK = 2.0         # full-block forward equivalents per block (the float stream on a quarter of the
                             # windows, the early-stopped collects, the shortcuts of compressor.layerwise): fitted
                             # on SmolLM2 gptq-w4g64, 2 cores of a Zen 4 EPYC (README: Reliability)
_SOLVER_KxK = 16             # fp32 K x K matrices' worth alive while GPTQ/SparseGPT solve the widest layer
_BATCH = 8                   # windows per forward batch in the calibration loop


class PreflightError(InputError):
    """A run that cannot fit this machine, refused before any work."""


@dataclass
class Estimate:
    peak_rss: int                                    # bytes
    disk: int                                        # bytes: output plus work directory
    seconds: float
    ram: dict[str, int] = field(default_factory=dict)        # named parts of peak_rss
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / MIB:,.0f}" for k, v in self.ram.items() if v)
        s = (f"preflight: peak RAM ~{self.peak_rss / MIB:,.0f} MiB ({parts}), disk ~{self.disk / MIB:,.0f} MiB, "
             f"time ~{_hms(self.seconds)}")
        return s + "".join(f"; {n}" for n in self.notes)

    def to_dict(self) -> dict[str, Any]:
        return {"peak_rss_mib": round(self.peak_rss / MIB, 1), "disk_mib": round(self.disk / MIB, 1),
                "seconds": round(self.seconds, 1), "ram_mib": {k: round(v / MIB, 1) for k, v in self.ram.items()}}


def _hms(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


_RATES: dict[int, tuple[float, float]] = {}


def machine_rates() -> tuple[float, float]:
    """(fp32 matmul flop/s, seconds per small tensor op) on this machine at the current thread count,
    measured once per process in about 0.2 s."""
    threads = torch.get_num_threads()
    if threads not in _RATES:
        a, b = torch.randn(2048, 576), torch.randn(576, 1536)
        torch.mm(a, b)
        t = time.perf_counter()
        for _ in range(5):
            torch.mm(a, b)
        flops = 5 * 2 * 2048 * 576 * 1536 / (time.perf_counter() - t)
        w, v = torch.randn(1536, 128), torch.randn(1536)
        t = time.perf_counter()
        for _ in range(400):
            w[:, 1:].addr_(v, w[0, 1:], alpha=-1)
            torch.div(v, 1.5, out=v)
        op = (time.perf_counter() - t) / 800
        _RATES[threads] = (flops, op)
    return _RATES[threads]


_PACK: dict[int, float] = {}


def pack_seconds_per_weight() -> float:
    """Seconds per weight element of what every quantizing pass does to each layer at the end (qparams,
    rounding, GPTQ packing, the dequantized self-check, SQNR), measured once per process on a 1024 x 2048
    layer in about 0.1 s."""
    threads = torch.get_num_threads()
    if threads not in _PACK:
        from .passes.base import Context
        from .passes.rtn import RTNConfig
        from .passes.weight_quant import swap_in_quantized
        from .quant.primitives import choose_qparams, quantize
        for rows in (64, 1024):                  # the first, small one warms up
            lin = nn.Linear(2048, rows, bias=False)
            t = time.perf_counter()
            scale, zero = choose_qparams(lin.weight.data, 4, 64, False)
            q = quantize(lin.weight.data, scale, zero, 4, 64)
            swap_in_quantized(nn.Sequential(lin), "0", lin, q, scale, zero, RTNConfig(), Context(progress=False))
            _PACK[threads] = (time.perf_counter() - t) / lin.weight.numel()
    return _PACK[threads]


def peak_rss_mib() -> float:
    """This process's peak RSS so far, MiB (Linux reports ru_maxrss in KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def _blocks(model: nn.Module) -> list[list[nn.Linear]]:
    from .layerwise import find_blocks
    try:
        _, blocks = find_blocks(model)
    except (ValueError, AttributeError):
        return []
    return [[m for m in b.modules() if isinstance(getattr(m, "in_features", None), int)] for b in blocks]


def _block_names(model: nn.Module) -> list[str]:
    from .layerwise import find_blocks
    try:
        return [find_blocks(model)[0]]
    except (ValueError, AttributeError):
        return []


def _stored_bytes(model: nn.Module, bits: int | None, group: int) -> int:
    """The checkpoint's size: targeted Linears packed at `bits` (scales and zeros fp16 per group), the rest fp16
    for the embedding and head, fp32 for the small tensors."""
    linear_ids, packed = set(), 0
    for blk in _blocks(model):
        for lin in blk:
            linear_ids.add(id(lin))
            k, n = lin.in_features, lin.out_features
            if bits is None:
                packed += 2 * k * n
            else:
                g = k if group == -1 else group
                packed += k * n * bits // 8 + (k // g) * n * 4 + k * 4
    seen, other = set(), 0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        linear_ids.add(id(head))                 # stored once, as the embedding (a meta model may not tie them)
    for m in model.modules():
        if id(m) in linear_ids:
            continue
        for p in m.parameters(recurse=False):
            if id(p) not in seen:                # (a tied weight is one object; meta tensors share data_ptr 0)
                seen.add(id(p))
                other += p.numel() * (2 if p.dim() == 2 else 4)
    return packed + other


def estimate(model: nn.Module, recipe, ctx, rss_now: int | None = None) -> Estimate:
    """What `compress` will need for `recipe` on `model` (see the module docstring)."""
    blocks = _blocks(model)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None) or (blocks[0][0].in_features if blocks else 0)
    calibrated = [p for p in recipe.passes if p.name in _CALIBRATED]
    trains = [p for p in recipe.passes if p.needs_train_data]
    quant = next((p for p in reversed(recipe.passes) if getattr(p, "bits", None)), None)
    bits, group = (getattr(quant, "bits", None), getattr(quant, "group_size", 64)) if quant else (None, 64)
    n, seqlen = (ctx.calib_samples, ctx.calib_seqlen) if calibrated else (0, 0)
    tokens = n * seqlen
    largest_in = max((lin.in_features for b in blocks for lin in b), default=0)
    largest_out = max((lin.out_features for b in blocks for lin in b), default=0)
    stored = _stored_bytes(model, bits, group)
    model_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())

    ram = {"now": rss_now if rss_now is not None else _rss()}
    if calibrated:
        refs = [getattr(p, "reference_windows", None) for p in calibrated]
        ref_windows = max((n if r == 0 else min(r, n) for r in refs if r is not None), default=0)
        ram["calibration stream"] = 3 * tokens * hidden * 4 + 2 * ref_windows * seqlen * hidden * 2
        # the last group's inputs and the block's outputs kept for the residual shortcut, the attention output
        # kept for the o_proj shortcut (compressor.layerwise), and the MLP's activations of one batch
        ram["block inputs"] = tokens * largest_in * 4 + 2 * tokens * hidden * 4 + 2 * _BATCH * seqlen * largest_out * 4
        ram["work-dir commit"] = tokens * hidden * 4 if ctx.work_dir is not None else 0
        if any(p.name in ("gptq", "sparsegpt") for p in calibrated):
            # the widest layer's K x K matrices alive at once: the Hessian and its cross term, the damped float64
            # copy and factor of the float-stream correction, the inverse and the column loop's blocks; fitted
            # on SmolLM2 (K 1536) and a 7B-width block (K 11008) with gptq-w4g64
            ram["solver"] = _SOLVER_KxK * largest_in * largest_in * 4
    if getattr(ctx, "stream", None) is not None:
        # compress --stream: the model is on the meta device; one block is read at a time (at fp32), a layer's
        # rounding makes a few copies of it, calibrated passes read the embedding, and the save writes tensor by
        # tensor (the largest outside the blocks, read at fp16 and widened).
        layer = max((lin.in_features * lin.out_features for b in blocks for lin in b), default=0)
        ram["one block"] = max((sum(lin.in_features * lin.out_features for lin in b) for b in blocks), default=0) * 4 \
            + 3 * layer * 4
        outside = [p for n, p in model.named_parameters() if not any(n.startswith(f"{x}.") for x in _block_names(model))]
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        ram["embedding"] = emb.weight.numel() * 4 if calibrated and emb is not None else 0
        ram["save"] = max((p.numel() for p in outside), default=0) * 6
        # the save runs after the sweeps have freed their block: the larger of the two phases
        peak = ram["now"] + max(sum(v for k, v in ram.items() if k not in ("now", "save")), ram["save"])
    else:
        ram["save"] = 2 * stored
        peak = sum(ram.values())

    disk = stored
    if getattr(ctx, "stream", None) is not None:
        disk += 2 * stored                       # the blocks committed by the last two passes
    elif ctx.work_dir is not None:
        disk += (tokens * hidden * 4 if calibrated else 0) + (model_bytes if len(recipe.passes) > 1 else 0)

    flops, steps, packed = 0.0, 0.0, 0
    weights = sum(lin.in_features * lin.out_features for b in blocks for lin in b)
    for p in recipe.passes:
        if getattr(p, "bits", None):
            packed += weights                    # rounding, packing and the self-check of every layer
        if p.name not in _CALIBRATED:
            flops += 20.0 * weights
            continue
        for blk in blocks:
            params = sum(lin.in_features * lin.out_features for lin in blk)
            flops += _FWD_PER_BLOCK * (2 * tokens * params + 2 * tokens * seqlen * hidden)
            ks = {lin.in_features: lin for lin in blk}       # one Hessian per distinct input (q/k/v share)
            flops += sum(2 * tokens * k * k for k in ks)
            for lin in blk:
                k, nn_ = lin.in_features, lin.out_features
                g = k if getattr(p, "group_size", -1) == -1 else p.group_size
                if p.name in ("gptq", "sparsegpt"):
                    flops += 2 * nn_ * k * k + 2 * k ** 3 / 3          # the lazy-batch update, Cholesky inverse
                    steps += 6 * k                                     # the column loop's tensor ops
                if getattr(p, "clip_search", False):
                    flops += 6 * nn_ * k * _GRID                       # elementwise, counted at matmul rate / 10
                    steps += (k // g) * 8
    rate, op = machine_rates()
    seconds = flops / rate + steps * op + 1.0 * len(blocks) * len(calibrated) + packed * pack_seconds_per_weight()
    notes = []
    if trains:
        notes.append(f"the training of {', '.join(p.name for p in trains)} is not in the estimate")
    return Estimate(int(peak), int(disk), seconds, ram, notes)


def check_fits(est: Estimate, out: str | Path, available: int | None = None, free_disk: int | None = None) -> None:
    """Refuse (`PreflightError`) a run whose estimate exceeds the RAM available or the output's free disk."""
    import psutil
    avail = available if available is not None else psutil.virtual_memory().available + est.ram.get("now", 0)
    if est.peak_rss > avail:
        stream = est.ram.get("calibration stream", 0) + est.ram.get("block inputs", 0)
        hint = (f"fewer calibration windows (calibration: {{samples: N}}; the stream and block inputs take "
                f"{stream / MIB:,.0f} MiB), or compress --stream to read one block at a time" if stream
                else "compress --stream to read one block at a time, or a machine with more memory")
        raise PreflightError(f"preflight: this run needs about {est.peak_rss / MIB:,.0f} MiB of RAM and "
                             f"{avail / MIB:,.0f} MiB is available; use {hint}")
    out = Path(out)
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    free = free_disk if free_disk is not None else shutil.disk_usage(parent).free
    if est.disk > free:
        raise PreflightError(f"preflight: the output and work directory need about {est.disk / MIB:,.0f} MiB and "
                             f"{parent} has {free / MIB:,.0f} MiB free; free space or write elsewhere (-o)")
