"""SparseGPT (Frantar & Alistarh, *SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot*, ICML 2023), alone or jointly with GPTQ-style quantization.

The OBS update on the same Hessian ``H = 2 XᵀX / n`` as GPTQ (`compressor.hessian`): columns are
processed left to right; every pruned (or rounded) weight's error is pushed onto the columns not yet
processed through the inverse Hessian's Cholesky factor. The mask is chosen adaptively, per block of
``blocksize`` columns, from ``w² / [H⁻¹]_jj²`` on the weights as the updates left them (exactly
``sparsity`` of each block is pruned, so of each layer), or every M columns for an N:M pattern.

With ``bits`` set, each kept weight is also rounded to the group's grid in the same sweep, as in the
paper's joint mode, and the layer is written as a `QuantLinear` (GPTQ layout; a pruned weight is the
group's zero point, so it dequantizes to exactly 0); compression.json records each layer's sparsity.

``fp_target`` aims each layer at the *float* model's output on the float stream rather than at its
own weights on the already-pruned stream (`compressor.passes.gptq.fp_target_correction`), as the
default GPTQ recipe does.

Sample recipe::

    calibration: {samples: 64, seqlen: 512}
    passes:
      - sparsegpt: {sparsity: 0.5, fp_target: true}
      # joint 2:4 + 4-bit:   - sparsegpt: {pattern: "2:4", bits: 4, group_size: 64}
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..hessian import inverse_cholesky
from ..layerwise import layerwise
from ..sparsity import nm_mask
from .base import Context, State, register_pass
from .gptq import FPTarget, group_qparams, relative_output_error
from .pruning import PruneConfig, swap_in_sparse
from .weight_quant import BITS, GROUP_SIZES, WeightQuantConfig, swap_in_quantized

__all__ = ["sparsegpt_prune", "SparseGPTConfig"]


@torch.no_grad()
def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
                    blocksize: int = 128, percdamp: float = 0.01,
                    quant: tuple[int, int, bool, bool] | None = None, subblock: int = 16):
    """Prune (and optionally quantize) W (N, K) given H (K, K) = 2 XᵀX / n.

    Args:
        sparsity: fraction pruned in every block of columns (ignored with `nm`).
        nm: (N, M): keep N of every M consecutive weights of each row.
        quant: None, or (bits, group_size, sym, clip_search) for the joint mode.
        subblock: columns per lazy-update sub-block (`blocksize`: the paper's plain column loop).
    Returns:
        W' (N, K) float32 with exact zeros (dequantized when quantizing), keep mask (N, K) bool,
        (codes uint8, scale (N, G), zero (N, G)) or None, and the OBS loss Σ (w - q)² / d² / 2.
    """
    W = W.clone().float()
    H = H.clone().float()
    N, K = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H[range(K), range(K)] += percdamp * torch.mean(torch.diag(H))
    Hinv = inverse_cholesky(H)

    keep = torch.ones(N, K, dtype=torch.bool)
    losses = torch.zeros(N)
    # Columns are updated in sub-blocks of `subblock`: a column's rank-1 update reaches only the rest of its
    # sub-block, and one matmul per sub-block carries the errors to the rest of the block. Every
    # read (a column, an N:M window, a quantization group's range) starts on a sub-block boundary or
    # inside it, so it sees every earlier update: the same result as updating all columns at once.
    sub = subblock if (blocksize % subblock == 0 and (nm is None or subblock % nm[1] == 0)
                       and (quant is None or quant[1] == -1 or quant[1] % subblock == 0)) else blocksize
    if quant is not None:
        bits, group_size, sym, clip = quant
        g = K if group_size == -1 else group_size
        maxq = 2 ** bits - 1
        codes = torch.zeros(N, K)
        scales, zeros = [], []

    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        cnt = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = Hinv1.diagonal()
        prune1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            n_prune = int(round(sparsity * W1.numel()))
            if n_prune:
                tmp = (W1.square() / d.square()).flatten()
                prune1.view(-1)[torch.topk(tmp, n_prune, largest=False, sorted=False).indices] = True
        inv_d = (1 / d).tolist()
        for j1 in range(0, cnt, sub):               # lazy updates inside the block too (same result)
            j2 = min(j1 + sub, cnt)
            for i in range(j1, j2):
                col = i1 + i
                if nm is not None and i % nm[1] == 0:
                    tmp = W1[:, i:i + nm[1]].square() / d[i:i + nm[1]].square()
                    prune1.scatter_(1, i + torch.topk(tmp, nm[1] - nm[0], dim=1, largest=False).indices, True)
                w = W1[:, i]
                q = w.masked_fill(prune1[:, i], 0)
                if quant is not None:
                    if col % g == 0:                # the group's range over the weights it will keep
                        wg = W1[:, i:i + g] if g <= cnt - i else W[:, col:col + g].clone()
                        if nm is None:
                            wg = wg.masked_fill(prune1[:, i:i + g], 0) if g <= cnt - i else wg
                        else:                       # N:M masks ahead are not chosen yet: predict them
                            wg = wg * nm_mask(wg.square() / d[i:i + g].square(), *nm) if g <= cnt - i else wg
                        scale, zero = group_qparams(wg, bits, sym, clip)
                        scales.append(scale), zeros.append(zero)
                        s, z = scale[:, 0], zero[:, 0]
                    c = torch.div(q, s).round_().add_(z).clamp_(0, maxq)
                    codes[:, col] = c
                    q = (c - z) * s
                Q1[:, i] = q
                err = (w - q) * inv_d[i]
                W1[:, i:j2].addr_(err, Hinv1[i, i:j2], alpha=-1)
                Err1[:, i] = err
            if j2 < cnt:
                W1[:, j2:] -= Err1[:, j1:j2] @ Hinv1[j1:j2, j2:]
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = ~prune1
        losses += Err1.square().sum(1) / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    packed = None
    if quant is not None:
        packed = (codes.to(torch.uint8), torch.cat(scales, 1), torch.cat(zeros, 1))
    return W, keep, packed, float(losses.sum())


@register_pass("sparsegpt")
@dataclass(frozen=True)
class SparseGPTConfig(PruneConfig, FPTarget):
    """SparseGPT: ``sparsity`` in [0, 0.9] or ``pattern: "N:M"``, optional joint ``bits``/``group_size``.

    blocksize: columns whose mask is chosen together (adaptive mask selection; 128 in the paper).
    percdamp: ridge on H, as a fraction of its mean diagonal.
    bits: None (float sparse, bitmask checkpoint) or 3/4/8 (joint: GPTQ layout).
    group_size, sym, clip_search: the grid of the joint mode (as in gptq).
    """
    needs_calibration = True
    streams = True

    blocksize: int = 128
    percdamp: float = 0.01
    bits: int | None = None
    group_size: int = 64
    sym: bool = False
    clip_search: bool = False

    def __post_init__(self):
        super().__post_init__()
        self.check_fp_target()
        self.check_bools("sym", "clip_search")
        if self.bits is not None and self.bits not in BITS:
            raise ValueError(f"sparsegpt.bits={self.bits!r} is not supported; allowed: null (float) or {list(BITS)}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"sparsegpt.group_size={self.group_size!r} is not supported; allowed: {list(GROUP_SIZES)}")
        step = max(self.nm[1] if self.nm else 1, self.group_size if self.bits and self.group_size > 0 else 1)
        if not isinstance(self.blocksize, int) or self.blocksize < 1 or self.blocksize % step:
            raise ValueError(f"sparsegpt.blocksize={self.blocksize!r} must be a positive multiple of {step} "
                             f"(the pattern's M and the group size)")
        if not 0 < self.percdamp < 1:
            raise ValueError(f"sparsegpt.percdamp={self.percdamp} must be in (0, 1)")

    def produces(self, state: State) -> State:
        return State.INT if self.bits is not None else State.FLOAT_SPARSE

    def check_shapes(self, shapes: dict[str, tuple[int, int]]) -> None:
        super().check_shapes(shapes)
        if self.bits is not None:
            WeightQuantConfig.check_shapes(self, shapes)       # packing and group size, as rtn/gptq check them

    @torch.no_grad()
    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        targets = self.modules(model)
        from .wanda import wanda_score
        sparsity = self.block_sparsities(model, ctx, targets, lambda lin, norm: wanda_score(lin.weight.data, norm),
                                         with_inputs=True)
        quant = None if self.bits is None else (self.bits, self.group_size, self.sym, self.clip_search)
        desc = f"sparsegpt {self.pattern or self.sparsity}" + (f" w{self.bits}g{self.group_size}" if quant else "")
        for blk in layerwise(model, ctx.calibration(), targets, ctx, desc, self.reference_windows, commit=True):
            results = {}
            for grp in blk.groups:
                t0 = time.perf_counter()
                h = blk.hessian(grp)
                t_h = (time.perf_counter() - t0) / len(grp)
                for name in grp:
                    t1 = time.perf_counter()
                    lin = blk.linears[name]
                    W = lin.weight.data
                    Wp, keep, packed, loss = sparsegpt_prune(self.aim(W, h), h.H, sparsity[blk.full_name(name)],
                                                             self.nm, self.blocksize, self.percdamp, quant)
                    if packed is None:
                        Wp = Wp.half().float()                     # as it will be stored
                    stats = {"sparsegpt_loss": round(loss, 6),
                             "output_error_rel": round(relative_output_error(W, Wp, h.H), 8)}
                    lin.weight.data = Wp.to(W.dtype)                # later groups see the pruned layer
                    results[name] = (lin, W, keep, packed, stats, t_h + time.perf_counter() - t1)
            blk.advance()
            for name, (lin, W, keep, packed, stats, sec) in results.items():
                full = blk.full_name(name)
                if packed is None:
                    swap_in_sparse(model, full, lin, keep, self, ctx, seconds=round(sec, 3), **stats)
                else:
                    sp = round(float((lin.weight.data == 0).float().mean()), 6)
                    lin.weight.data = W                             # SQNR is measured against the float weight
                    swap_in_quantized(model, full, lin, *packed, self, ctx, seconds=round(sec, 3), sparsity=sp,
                                      pattern=self.pattern, **stats)
        return model
