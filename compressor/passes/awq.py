"""AWQ: activation-aware weight scaling and clipping, ahead of integer rounding.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han. "AWQ: Activation-aware Weight Quantization
for LLM Compression and Acceleration", MLSys 2024 (arXiv:2306.00978).

Salient input channels (large mean |activation|) lose less when their weights are scaled up before
rounding and the input is scaled down by the same factor. For each group of Linears sharing an
input, AWQ searches ``s = mean|x|^alpha`` over a grid of alpha, measuring the group's output error
after fake quantization, and folds ``1/s`` into the op that produced the input (an RMSNorm or
LayerNorm weight, or the rows of a preceding Linear), so the float model is unchanged. It then
searches a per-group clipping range for each Linear's weights on the same output-error criterion.

This pass only transforms float weights; the quantization pass after it (``rtn`` or ``gptq``, same
bits and group size) does the rounding and packing.

Sample recipe::

    passes:
      - awq: {bits: 4, group_size: 64, sym: false}
      - rtn: {bits: 4, group_size: 64, sym: false}
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..layerwise import layerwise
from ..quant.primitives import fake_quantize, group_view
from ..sequential import input_hooks, kwargs_for
from .base import Context, PassConfig, State, register_pass
from .weight_quant import BITS, GROUP_SIZES

__all__ = ["search_scale", "fold_scale", "search_clip", "AWQConfig"]


# ------------------------------------------------------------------------------------------------
# the algorithm: pure tensor functions
# ------------------------------------------------------------------------------------------------

def search_scale(x: torch.Tensor, weights: list[torch.Tensor], bits: int, group_size: int, sym: bool,
                 n_grid: int = 20) -> tuple[torch.Tensor, float]:
    """Best per-input-channel scale for Linears sharing input x.

    Args:
        x: (T, K) input tokens; weights: list of (N_i, K).
    Returns:
        s (K,) and the best alpha. alpha = 0 (s = 1) is on the grid, so the result is never worse
        than no scaling on this criterion.
    """
    x = x.float()
    x_mean = x.abs().mean(0)                                   # (K,)
    W = torch.cat([w.float() for w in weights], 0)             # (N, K)
    # mean_{t,n} (x_t (W - Wq)_n)^2 = tr(D C D^T) / (T N) with C = X^T X: no (T, N) outputs needed
    C = x.t() @ x
    best, best_s, best_a = float("inf"), torch.ones_like(x_mean), 0.0
    for i in range(n_grid):
        a = i / n_grid
        s = x_mean.pow(a).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        D = W - fake_quantize(W * s, bits, group_size, sym) / s
        err = ((D @ C) * D).sum().item() / (x.shape[0] * W.shape[0])
        if err < best:
            best, best_s, best_a = err, s, a
    return best_s, best_a


@torch.no_grad()
def fold_scale(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """Multiply the Linears' input columns by s and divide the producer's output by s.

    `prev` is a norm with a per-channel ``weight`` (and optional ``bias``), or a Linear whose output
    rows feed the Linears. The composed float function is unchanged.
    """
    s = s.to(linears[0].weight.dtype)
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.view(-1, 1))
    else:
        prev.weight.div_(s)
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s)
    for lin in linears:
        lin.weight.mul_(s.view(1, -1))


def search_clip(x: torch.Tensor, w: torch.Tensor, bits: int, group_size: int, sym: bool,
                n_grid: int = 20, max_shrink: float = 0.5, chunk: int = 64) -> torch.Tensor:
    """Per-(row, group) max |w| minimising the group's output error on inputs x.

    Args:
        x: (T, K) input tokens; w: (N, K).
    Returns:
        (N, n_groups) clip values; clamp w to [-v, v] group-wise.
    """
    N, K = w.shape
    g = K if group_size == -1 else group_size
    xg = x.float().reshape(-1, K // g, g)                      # (T, G, g)
    # The error of group (n, G) over the tokens is d C_G d^T / T with C_G = X_G^T X_G (g x g), d the
    # weight error: the same number as mean_t (x_t,G . d)^2 without materialising (T, n, G) outputs.
    C = torch.einsum("tgk,tgl->gkl", xg, xg) / xg.shape[0]    # (G, g, g)
    best_max = torch.empty(N, K // g)
    for r0 in range(0, N, chunk):                              # rows in chunks to bound memory
        wg = group_view(w[r0:r0 + chunk].float(), g)           # (n, G, g)
        org_max = wg.abs().amax(-1, keepdim=True)              # (n, G, 1)
        best_err = torch.full(org_max.shape[:2], float("inf"))
        best = org_max[..., 0].clone()
        for i in range(int(max_shrink * n_grid)):
            mx = org_max * (1 - i / n_grid)
            cw = torch.clamp(wg, -mx, mx).reshape(wg.shape[0], K)
            d = fake_quantize(cw, bits, group_size, sym).reshape(wg.shape) - wg
            err = (torch.einsum("ngk,gkl->ngl", d, C) * d).sum(-1)              # (n, G)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, mx[..., 0], best)
        best_max[r0:r0 + chunk] = best
    return best_max


# ------------------------------------------------------------------------------------------------
# wiring
# ------------------------------------------------------------------------------------------------

# Producers that a forward trace cannot see: the input of down_proj is act(gate(x)) * up(x), which is
# linear in up_proj's output; o_proj reads the attention mix of v_proj's output (foldable only when
# shapes match, i.e. without grouped-query attention).
_LINEAR_PRODUCERS = {"mlp.down_proj": "mlp.up_proj", "self_attn.o_proj": "self_attn.v_proj"}


def _producers(block: nn.Module, inp, groups: list[list[str]], names: dict[str, nn.Linear]) -> dict[str, str]:
    """group head -> name of the module whose output is the group's input (norm or Linear)."""
    outputs: dict[int, str] = {}
    alive = []
    hooks = []

    def record(name):
        def hook(mod, args, out):   # must return None: a returned value would replace the output
            alive.append(out)
            outputs[id(out)] = name
        return hook

    for n, m in block.named_modules():
        if n and not isinstance(m, nn.Linear) and isinstance(getattr(m, "weight", None), torch.Tensor) \
                and m.weight.dim() == 1:
            hooks.append(m.register_forward_hook(record(n)))
    heads: dict[str, int] = {}
    try:
        with input_hooks({g[0]: names[g[0]] for g in groups}, lambda n, x: (alive.append(x), heads.__setitem__(n, id(x)))):
            block(inp.hidden[0][:1], **kwargs_for(inp.kwargs, 1))
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for g in groups:
        if heads.get(g[0]) in outputs:
            out[g[0]] = outputs[heads[g[0]]]
        elif g[0] in _LINEAR_PRODUCERS and _LINEAR_PRODUCERS[g[0]] in names:
            prev = names[_LINEAR_PRODUCERS[g[0]]]
            if all(prev.out_features == names[n].in_features for n in g):
                out[g[0]] = _LINEAR_PRODUCERS[g[0]]
    return out


@register_pass("awq")
@dataclass(frozen=True)
class AWQConfig(PassConfig):
    """AWQ scale and clip search for a following rtn/gptq pass with the same bits and group size."""
    accepts = frozenset({State.FLOAT})
    needs_calibration = True
    streams = True
    requires_quantizer = True

    bits: int = 4
    group_size: int = 64
    sym: bool = False
    n_grid: int = 20
    clip: bool = True
    max_shrink: float = 0.5
    max_tokens: int = 4096          # tokens subsampled per group for the searches

    def __post_init__(self):
        super().__post_init__()
        if self.bits not in BITS:
            raise ValueError(f"awq.bits={self.bits!r} is not supported; allowed: {list(BITS)}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"awq.group_size={self.group_size!r} is not supported; allowed: {list(GROUP_SIZES)}")
        if self.n_grid < 2:
            raise ValueError(f"awq.n_grid={self.n_grid} must be at least 2")
        if not 0 <= self.max_shrink < 1:
            raise ValueError(f"awq.max_shrink={self.max_shrink} must be in [0, 1)")
        if self.max_tokens < 16:
            raise ValueError(f"awq.max_tokens={self.max_tokens} must be at least 16")

    @torch.no_grad()
    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        gen = torch.Generator().manual_seed(ctx.seed)
        for blk in layerwise(model, ctx.calibration(), self.modules(model), ctx, f"awq w{self.bits}g{self.group_size}",
                             commit=True, generator=gen):
            groups, names = blk.groups, blk.linears
            producers = _producers(blk.module, blk.inputs, groups, names)
            # The same random max_tokens token positions for every group, kept as the block runs
            # (one forward, which also gives the next block's inputs: scaling keeps the float function).
            n_tok = sum(x.shape[0] * x.shape[1] for x in blk.inputs.hidden)
            keep = torch.randperm(n_tok, generator=gen)[:self.max_tokens].sort().values
            feats: dict[str, list[torch.Tensor]] = {g[0]: [] for g in groups}
            offset = {g[0]: 0 for g in groups}

            def sample(n: str, x: torch.Tensor) -> None:
                x = x.reshape(-1, x.shape[-1])
                lo = offset[n]
                sel = keep[(keep >= lo) & (keep < lo + x.shape[0])] - lo
                feats[n].append(x[sel].clone())
                offset[n] = lo + x.shape[0]

            blk.advance(blk.forward({g[0]: sample for g in groups}))
            for grp in groups:
                t0 = time.perf_counter()
                x = torch.cat(feats.pop(grp[0]))
                lins = [names[n] for n in grp]
                alpha = None
                prev = producers.get(grp[0])
                if prev is not None and prev not in grp:
                    s, alpha = search_scale(x, [l.weight.data for l in lins], self.bits, self.group_size, self.sym,
                                            self.n_grid)
                    fold_scale(blk.module.get_submodule(prev), lins, s)
                    x = x / s
                if self.clip:
                    for n, lin in zip(grp, lins):
                        if n.endswith(("q_proj", "k_proj")):  # AWQ leaves q/k: clipping them hurts attention
                            continue
                        mx = search_clip(x, lin.weight.data, self.bits, self.group_size, self.sym, self.n_grid,
                                         self.max_shrink).unsqueeze(-1)
                        wg = group_view(lin.weight.data, -1 if self.group_size == -1 else self.group_size)
                        lin.weight.data = torch.clamp(wg, -mx, mx).reshape(lin.weight.shape)
                dt = (time.perf_counter() - t0) / len(grp)
                for n in grp:
                    ctx.record(blk.full_name(n), awq_alpha=alpha, awq_folded_into=producers.get(grp[0]),
                               awq_seconds=round(dt, 3))
        return model
