"""Shared config and wiring for weight-only integer quantization passes (RTN, GPTQ, ...).

`WeightQuantConfig` holds the fields every such pass has (bits, group size, symmetry), validates
them, and refuses a group size that does not divide a targeted layer (`check_shapes`, run before
any work starts), naming the offending layers and the group sizes that would work.
`swap_in_quantized` replaces a float Linear by a packed `QuantLinear` (which carries its own
checkpoint spec) and records its statistics.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import NumericError
from ..nn.qlinear import QuantLinear
from ..quant.primitives import sqnr_db
from .base import FLOATS, Context, PassConfig, State

__all__ = ["WeightQuantConfig", "swap_in_quantized", "self_check", "NumericError", "GROUP_SIZES", "BITS"]

BITS = (3, 4, 8)
GROUP_SIZES = (-1, 32, 64, 128)


@dataclass(frozen=True)
class WeightQuantConfig(PassConfig):
    accepts = FLOATS

    bits: int = 4
    group_size: int = 64          # -1: per output channel
    sym: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.bits not in BITS:
            raise ValueError(f"{self.name}.bits={self.bits!r} is not supported; allowed: {list(BITS)}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"{self.name}.group_size={self.group_size!r} is not supported; allowed: "
                             f"{list(GROUP_SIZES)} (-1 = per channel)")
        self.check_bools("sym")

    def produces(self, state: State) -> State:
        return State.INT

    def check(self, model: nn.Module, ctx: Context) -> None:
        mods = self.check_targets(model)

    def check_shapes(self, shapes: dict[str, tuple[int, int]]) -> None:
        shapes = {n: shapes[n] for n in self.targeted(shapes)}
        run = 32 if self.bits == 3 else 32 // self.bits
        bad_pack = [f"{n} ({k}x{o})" for n, (k, o) in shapes.items() if k % run or o % run]
        if bad_pack:
            raise ValueError(f"{self.name}: {self.bits}-bit GPTQ packing needs in/out features divisible by "
                             f"{run}; offending layers: {', '.join(bad_pack[:5])}"
                             f"{' ...' if len(bad_pack) > 5 else ''}; add them to ignore")
        if self.group_size == -1:
            return
        bad = {n: k for n, (k, _) in shapes.items() if k % self.group_size}
        if bad:
            widths = sorted(set(k for k, _ in shapes.values()))
            ok = [g for g in GROUP_SIZES if g == -1 or all(w % g == 0 for w in widths)]
            shown = ", ".join(f"{n} (in_features={k})" for n, k in list(bad.items())[:4])
            more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
            raise ValueError(f"{self.name}.group_size={self.group_size} does not divide in_features of "
                             f"{len(bad)} layers: {shown}{more}; group sizes that work here: {ok}")


def self_check(name: str, w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               group_size: int, g_idx: torch.Tensor | None, deq: torch.Tensor) -> None:
    """The packed layer, dequantized (`deq`), must be exactly the pass's own fake-quantized weight,
    ``(q - zero) * scale`` with the scales at their stored fp16, and every number must be finite."""
    for what, t in (("float weight", w), ("scales", scale), ("zero points", zero)):
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise NumericError(f"{name}: {bad} non-finite values in its {what}; the source model or an earlier "
                               f"pass produced NaN/Inf, so nothing was written")
    k = q.shape[1]
    g = (torch.arange(k) // (k if group_size == -1 else group_size)) if g_idx is None else g_idx.long()
    size = k if group_size == -1 else group_size
    for lo in range(0, q.shape[0], 512):        # in row slices: temporaries stay small on 7B-sized layers
        hi = lo + 512
        if g_idx is None:                        # contiguous groups: broadcast, no per-column gather
            fake = ((q[lo:hi].float().view(-1, k // size, size) - zero[lo:hi].float()[:, :, None])
                    * scale[lo:hi].half().float()[:, :, None]).view(-1, k)
        else:
            fake = (q[lo:hi].float() - zero[lo:hi].float()[:, g]) * scale[lo:hi].half().float()[:, g]
        if torch.equal(deq[lo:hi], fake):
            continue
        diff = (deq[lo:hi] - fake).abs()
        row, col = divmod(int(diff.argmax()), k)
        row += lo
        raise NumericError(f"{name}: packed weights do not dequantize to the pass's own (max difference "
                           f"{float(diff.max()):.3g} at row {row}, column {col}); a packing bug, so nothing was "
                           f"written: please report it")


def swap_in_quantized(model: nn.Module, name: str, linear: nn.Linear, q: torch.Tensor, scale: torch.Tensor,
                      zero: torch.Tensor, cfg: WeightQuantConfig, ctx: Context, g_idx: torch.Tensor | None = None,
                      **stats) -> QuantLinear:
    """Replace `linear` (at `name`) by a packed QuantLinear and record its SQNR, after `self_check`."""
    qlin = QuantLinear.from_codes(q, scale, zero, cfg.bits, cfg.group_size, g_idx=g_idx,
                                  bias=None if linear.bias is None else linear.bias.data, sym=cfg.sym,
                                  desc_act=g_idx is not None)
    w = linear.weight.data
    deq = qlin.dequantized_weight()
    self_check(name, w, q, scale, zero, cfg.group_size, g_idx, deq)
    stats["sqnr_db"] = round(sqnr_db(w, deq), 3)
    model.set_submodule(name, qlin)
    ctx.record(name, **stats)
    return qlin
