"""GPTQ: accurate post-training quantization from second-order information.

Frantar, Ashkboos, Hoefler, Alistarh. "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023 (arXiv:2210.17323).

For a linear layer with weight W (N x K) and calibration inputs X, GPTQ rounds W column by column
to minimise the layer-output error ||W X - Q X||^2. After rounding column i, the error is spread
over the not-yet-rounded columns using the inverse Hessian H^-1 = (2 X X^T + damp I)^-1 (the
Optimal Brain Surgeon update). Columns are processed in blocks of `blocksize` with lazy updates,
and with `act_order` in order of decreasing diag(H), which then needs `g_idx` in the checkpoint.

Sample recipe::

    calibration: {samples: 64, seqlen: 512}
    passes:
      - gptq: {bits: 4, group_size: 64, sym: false, act_order: true, clip_search: true}
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..hessian import inverse_cholesky
from ..layerwise import check_in_blocks, layerwise
from ..quant.primitives import choose_qparams, mse_clip_search
from .base import Context, register_pass
from .weight_quant import WeightQuantConfig, swap_in_quantized

__all__ = ["gptq_quantize", "GPTQConfig", "layer_output_error", "fp_target_correction", "group_qparams", "FPTarget",
           "relative_output_error"]


# ------------------------------------------------------------------------------------------------
# the algorithm: pure tensor functions
# ------------------------------------------------------------------------------------------------

def group_qparams(w: torch.Tensor, bits: int, sym: bool, clip_search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, g) slice -> scale, zero of shape (N, 1)."""
    clip = mse_clip_search(w, bits, -1, sym, grid=50, maxshrink=0.3) if clip_search else None
    return choose_qparams(w, bits, -1, sym, clip)


def fp_target_correction(W: torch.Tensor, dXtX: torch.Tensor, H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Weights whose output on the quantized stream X best matches the float layer on the float stream.

    Earlier layers are already quantized, so a layer sees inputs X (n x K) that differ from the float
    model's X_ref. Instead of reproducing W X (GPTQ), aim at W X_ref: the least-squares solution of
    min_W* ||X_ref W^T - X W*^T|| is W* = W + W (X_ref - X)^T X (X^T X + damp I)^-1. GPTQ then
    rounds W* on H = X^T X, and by orthogonality of the least-squares residual the two errors add.
    This is the asymmetric-calibration idea of GPTAQ (Li et al., ICML 2025) in closed form.

    Args: W (N, K); dXtX (K, K) = 2 (X_ref - X)^T X / n; H (K, K) = 2 X^T X / n (same scaling).
    """
    Hd = H.double().clone()
    Hd[range(H.shape[0]), range(H.shape[0])] += percdamp * torch.mean(torch.diag(Hd))
    L = torch.linalg.cholesky(Hd).float()          # factor in float64, solve in float32
    return (W.float() + torch.cholesky_solve((W.float() @ dXtX.float()).t(), L).t()).to(W.dtype)


def layer_output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the summed squared output error for inputs whose H = X X^T."""
    D = (W - Q).float()
    return float(((D @ H.float()) * D).sum(dtype=torch.float64))


def relative_output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """`layer_output_error` of Q as a fraction of the layer's own output energy tr(W H Wᵀ)."""
    return layer_output_error(W, Q, H) / max(layer_output_error(W, 0 * W, H), 1e-30)


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, sym: bool,
                  blocksize: int = 128, percdamp: float = 0.01, act_order: bool = False,
                  clip_search: bool = False):
    """Quantize W (N, K) given H (K, K) = 2 X X^T / n.

    Returns:
        q (N, K) uint8 codes in the original channel order, scale (N, G), zero (N, G),
        g_idx (K,) int32 group of each input channel, and the OBS loss sum_i (w_i - q_i)^2 / d_i^2 / 2.
    """
    W = W.clone().float()
    H = H.clone().float()
    N, K = W.shape
    g = K if group_size == -1 else group_size
    maxq = 2 ** bits - 1

    dead = torch.diag(H) == 0                      # inputs that are always zero: any value is exact
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.arange(K)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]

    damp = percdamp * torch.mean(torch.diag(H))
    H[range(K), range(K)] += damp
    Hinv = inverse_cholesky(H)

    codes = torch.zeros(N, K)                      # float while rounding; uint8 at the end
    scales, zeros = [], []
    losses = torch.zeros(N)
    if group_size == -1:
        scale, zero = group_qparams(W, bits, sym, clip_search)
        scales.append(scale), zeros.append(zero)
        s, z = scale[:, 0], zero[:, 0]

    # The column loop runs K times on (N,) vectors, so it is written to issue few tensor ops:
    # err = (w - dq) / d is the OBS error, its square / 2 the loss, and the rank-1 update is addr_.
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        inv_d = (1 / Hinv1.diagonal()).tolist()
        for i in range(i2 - i1):
            col = i1 + i
            if group_size != -1 and col % g == 0:
                # the group's columns with every update so far (inside this block when it fits)
                wg = W1[:, i:i + g] if i + g <= i2 - i1 else W[:, col:col + g]
                scale, zero = group_qparams(wg, bits, sym, clip_search)
                scales.append(scale), zeros.append(zero)
                s, z = scale[:, 0], zero[:, 0]
            w = W1[:, i]
            q = codes[:, col]
            torch.div(w, s, out=q).round_().add_(z).clamp_(0, maxq)
            err = Err1[:, i]
            torch.sub(w, (q - z) * s, out=err).mul_(inv_d[i])
            W1[:, i + 1:].addr_(err, Hinv1[i, i + 1:], alpha=-1)
        losses += Err1.square().sum(1) / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    scale = torch.cat(scales, dim=1)               # (N, G), groups in processing order
    zero = torch.cat(zeros, dim=1)
    invperm = torch.argsort(perm)
    g_idx = (torch.arange(K) // g)[invperm].to(torch.int32)
    return codes[:, invperm].to(torch.uint8).contiguous(), scale, zero, g_idx, float(losses.sum())


# ------------------------------------------------------------------------------------------------
# wiring: layer-sequential calibration over decoder blocks
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FPTarget:
    """The float-stream target fields shared by the Hessian passes (gptq, sparsegpt); see GPTQConfig."""
    fp_target: bool = False
    fp_target_samples: int = 16
    fp_target_damp: float = 0.1

    def check_fp_target(self) -> None:
        if not isinstance(self.fp_target_samples, int) or isinstance(self.fp_target_samples, bool) \
                or self.fp_target_samples < 0:
            raise ValueError(f"{self.name}.fp_target_samples={self.fp_target_samples!r} must be an integer >= 0 "
                             f"(0: all)")
        if not 0 < self.fp_target_damp < 1:
            raise ValueError(f"{self.name}.fp_target_damp={self.fp_target_damp} must be in (0, 1)")
        self.check_bools("fp_target")

    @property
    def reference_windows(self) -> int | None:
        """What `layerwise(..., reference=)` takes: the float stream's window count, or None."""
        return self.fp_target_samples if self.fp_target else None

    def aim(self, W: torch.Tensor, h) -> torch.Tensor:
        """The weights to aim at: W, or the float-stream correction of W when the Hessian has a reference."""
        return W if not h.has_reference else fp_target_correction(W, *h.reference_terms(), self.fp_target_damp)


@register_pass("gptq")
@dataclass(frozen=True)
class GPTQConfig(WeightQuantConfig, FPTarget):
    """GPTQ weight quantization; see the module docstring for the sample recipe.

    act_order: process columns by decreasing Hessian diagonal (stores g_idx, desc_act: true).
    clip_search: MSE search for each group's range (GPTQ's ``mse`` option).
    fp_target: aim each layer at the *float* model's output rather than at its own float weights on
        the already-quantized input stream (asymmetric calibration, see `fp_target_correction`).
    fp_target_samples: calibration windows (the first batches) that also run through the float
        model; the `fp_target` correction is the least-squares fit on these windows only, while
        GPTQ's rounding uses H over every window. The float stream costs one block forward per block
        on these windows. 0: every window.
    fp_target_damp: ridge of that fit, as a fraction of the mean of diag(H) over those windows. Fewer
        windows overfit; a larger ridge shrinks the correction where they carry little information.
        On SmolLM2 w4g64 (16 eval windows, Δppl as a fraction of RTN's): all 64 windows 0.266
        (390 s); 16 windows with ridge 0.01 0.391, with 0.1 0.288 (290 s); no fp_target 0.407 (257 s).
    """
    needs_calibration = True
    streams = True

    blocksize: int = 128
    percdamp: float = 0.01
    act_order: bool = False
    clip_search: bool = False

    def __post_init__(self):
        super().__post_init__()
        self.check_fp_target()
        if self.blocksize < 1 or (self.group_size != -1 and self.blocksize % self.group_size):
            raise ValueError(f"gptq.blocksize={self.blocksize} must be a positive multiple of group_size={self.group_size}")
        if not 0 < self.percdamp < 1:
            raise ValueError(f"gptq.percdamp={self.percdamp} must be in (0, 1)")

    def check(self, model: nn.Module, ctx: Context) -> None:
        super().check(model, ctx)
        check_in_blocks(model, self.modules(model), "gptq")

    @torch.no_grad()
    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        targets = self.modules(model)
        ref = self.reference_windows              # float stream on the first windows
        for blk in layerwise(model, ctx.calibration(), targets, ctx, f"gptq w{self.bits}g{self.group_size}", ref,
                              commit=True):
            results = {}
            for grp in blk.groups:
                t0 = time.perf_counter()
                h = blk.hessian(grp)
                t_h = (time.perf_counter() - t0) / len(grp)
                for name in grp:
                    t1 = time.perf_counter()
                    lin = blk.linears[name]
                    W = lin.weight.data
                    target = self.aim(W, h)
                    q, scale, zero, g_idx, loss = gptq_quantize(target, h.H, self.bits, self.group_size, self.sym,
                                                                self.blocksize, self.percdamp, self.act_order,
                                                                self.clip_search)
                    Wq = (q.float() - zero[:, g_idx.long()]) * scale[:, g_idx.long()]
                    stats = {"gptq_loss": round(loss, 6),
                             "output_error_rel": round(relative_output_error(W, Wq, h.H), 8)}
                    lin.weight.data = Wq.to(W.dtype)          # later groups see the quantized layer
                    results[name] = (lin, W, q, scale, zero, g_idx, stats, t_h + time.perf_counter() - t1)
            blk.advance()                                     # next inputs, through the quantized block
            for name, (lin, W, q, scale, zero, g_idx, stats, sec) in results.items():
                lin.weight.data = W                           # SQNR is measured against the float weight
                swap_in_quantized(model, blk.full_name(name), lin, q, scale, zero, self, ctx,
                                  g_idx=g_idx if self.act_order else None, seconds=round(sec, 3), **stats)
        return model
