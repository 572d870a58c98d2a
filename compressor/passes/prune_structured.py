"""Structured width pruning: remove MLP channels and attention heads or KV groups, for a smaller dense model.

Minitron-style (Muralidharan et al., *Compact Language Models via Pruning and Knowledge Distillation*,
2024): importance comes from calibration activations. A unit's importance is the energy it adds to
the block's output on the calibration tokens, through the shared layer-wise loop and Hessian
(`compressor.hessian`, ``H = 2 XᵀX / n`` of the down/o projection's input):

  * MLP channel j (row j of gate/up, column j of down): ``H_jj · ‖W_down[:, j]‖²``;
  * attention head h (its rows of q, its columns of o): ``tr(W_o[:, h] H_hh W_o[:, h]ᵀ)``; a KV group
    (its rows of k and v, with its query heads) scores the sum of its heads.

GQA is respected: ``heads`` removes that many query heads from *every* KV group (SmolLM2: 9 query heads
over 3 KV groups, so ``heads: 1`` leaves 6 over 3) and ``kv_groups`` removes whole groups with their
query heads; neither may empty a group or the layer. After removal, the down (or o) projection is
refit by least squares on the channels it keeps (``refit``), so the block's output moves as little
as the remaining channels allow; with ``fp_target`` the fit aims at the float model's output.

Widths are uniform across layers by default, and the model's config is updated (``intermediate_size``,
``num_attention_heads``, ``num_key_value_heads``), so the checkpoint is a plain ``LlamaForCausalLM``
that ``transformers`` loads with ``from_pretrained``. ``per_layer: true`` lets each layer's MLP width
follow a global ranking of channel importance (from a sweep over the unpruned model); HF configs
cannot express that, so such a checkpoint is read by ``compressor.load`` only (its smaller Linears are
recorded in compression.json's ``modules``). MLP widths are rounded to ``multiple_of`` (64 by default,
so that group-64 quantization and the kernels' tiles still divide them).

Sample recipe::

    calibration: {samples: 64, seqlen: 512}
    passes:
      - prune-structured: {mlp: 0.25}
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..layerwise import find_blocks, layerwise
from .base import FLOATS, Context, PassConfig, register_pass
from .gptq import FPTarget

__all__ = ["PruneStructuredConfig", "refit", "slice_linear"]

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def refit(W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Least-squares weights on the input channels `keep` that best reproduce ``x @ Wᵀ``:
    ``W H[:, S] (H[S, S] + damp I)⁻¹`` (W (N, K), H (K, K), keep (K,) bool) -> (N, |S|)."""
    Hs = H[keep][:, keep].double()
    Hs[range(len(Hs)), range(len(Hs))] += percdamp * torch.mean(torch.diag(Hs)).clamp_min(1e-12)
    rhs = (W.double() @ H[:, keep].double()).t()
    return torch.linalg.solve(Hs, rhs).t().to(W.dtype)


def slice_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                 weight: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear with the kept `rows` (outputs) and `cols` (inputs) of `lin`, or with `weight`."""
    w = lin.weight.data if weight is None else weight
    if weight is None:
        w = w if rows is None else w[rows]
        w = w if cols is None else w[:, cols]
    b = lin.bias
    if b is not None and rows is not None:
        b = b.data[rows]
    out = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    out.weight.data = w.contiguous().clone()
    if b is not None:
        out.bias.data = b.data.clone() if isinstance(b, nn.Parameter) else b.clone()
    return out


@register_pass("prune-structured")
@dataclass(frozen=True)
class PruneStructuredConfig(PassConfig, FPTarget):
    """mlp: fraction of MLP channels removed, in [0, 1). heads: query heads removed from every KV
    group. kv_groups: KV groups removed. multiple_of: MLP width rounding. per_layer: MLP widths per
    layer (compressor.load only). refit: least-squares refit of down/o on what they keep."""
    accepts = FLOATS
    changes_shapes = True
    needs_calibration = True

    mlp: float = 0.0
    heads: int = 0
    kv_groups: int = 0
    multiple_of: int = 64
    per_layer: bool = False
    refit: bool = True
    percdamp: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        self.check_fp_target()
        self.check_bools("per_layer", "refit")
        if isinstance(self.mlp, bool) or not isinstance(self.mlp, (int, float)) or not 0 <= self.mlp < 1:
            raise ValueError(f"prune-structured.mlp={self.mlp!r} must be a fraction in [0, 1) of the MLP width")
        for f in ("heads", "kv_groups"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"prune-structured.{f}={v!r} must be an integer >= 0")
        if not isinstance(self.multiple_of, int) or self.multiple_of < 1:
            raise ValueError(f"prune-structured.multiple_of={self.multiple_of!r} must be a positive integer")
        if self.mlp == 0 and self.heads == 0 and self.kv_groups == 0:
            raise ValueError("prune-structured: nothing to remove; set mlp (a fraction), heads or kv_groups")
        if self.per_layer and (self.heads or self.kv_groups):
            raise ValueError("prune-structured.per_layer applies to MLP widths only; heads and kv_groups are "
                             "removed uniformly (HF attention needs the same head counts in every layer)")

    # --- shapes ------------------------------------------------------------------------------
    def _dims(self, model: nn.Module) -> tuple[int, int, int, int]:
        cfg = model.config
        n_q, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_q
        return n_q, n_kv, head_dim, cfg.intermediate_size

    def mlp_width(self, inter: int) -> int:
        keep = inter * (1 - self.mlp)
        return max(self.multiple_of, int(round(keep / self.multiple_of)) * self.multiple_of)

    def check(self, model: nn.Module, ctx: Context) -> None:
        prefix, blocks = find_blocks(model)
        names = dict(blocks[0].named_modules())
        missing = [n for n in (_ATTN if self.heads or self.kv_groups else ()) + (_MLP if self.mlp else ())
                   if type(names.get(n)) is not nn.Linear]
        if missing:
            raise ValueError(f"prune-structured needs llama-style float blocks (self_attn.q/k/v/o_proj, "
                             f"mlp.gate/up/down_proj as nn.Linear); {prefix}.0 lacks {missing[:3]}")
        n_q, n_kv, _, inter = self._dims(model)
        per_group = n_q // n_kv
        if self.heads >= per_group:
            raise ValueError(f"prune-structured.heads={self.heads} would remove every query head of a KV group "
                             f"({n_q} heads over {n_kv} KV groups: {per_group} per group); use at most "
                             f"{per_group - 1}, or kv_groups to remove whole groups")
        if self.kv_groups >= n_kv:
            raise ValueError(f"prune-structured.kv_groups={self.kv_groups} would remove every KV group "
                             f"(the model has {n_kv}); use at most {n_kv - 1}")
        if self.mlp and self.mlp_width(inter) >= inter:
            raise ValueError(f"prune-structured.mlp={self.mlp} removes nothing from intermediate width {inter} once "
                             f"rounded to a multiple of {self.multiple_of}; raise mlp or lower multiple_of")
        if self.mlp and inter * (1 - self.mlp) < self.multiple_of / 2:
            raise ValueError(f"prune-structured.mlp={self.mlp} would leave an MLP width of 0 "
                             f"(intermediate {inter}, multiple_of {self.multiple_of})")

    # --- the pass ----------------------------------------------------------------------------
    def _per_layer_widths(self, model: nn.Module, ctx: Context, targets: dict[str, nn.Module]) -> list[int]:
        """MLP width of every block from a global ranking of channel importance on the unpruned model."""
        imp: dict[int, torch.Tensor] = {}
        for blk in layerwise(model, ctx.calibration(), targets, ctx, "prune-structured importance"):
            down = blk.linears["mlp.down_proj"]
            imp[blk.index] = blk.input_stats(["mlp.down_proj"]).sum_sq * down.weight.data.float().square().sum(0)
        inter = self._dims(model)[3]
        allv = torch.cat([v for _, v in sorted(imp.items())])
        thresh = torch.sort(allv).values[int(round(self.mlp * allv.numel()))]
        widths = []
        for b in sorted(imp):
            n = int((imp[b] >= thresh).sum())
            widths.append(min(inter, max(self.multiple_of, int(round(n / self.multiple_of)) * self.multiple_of)))
        return widths

    @torch.no_grad()
    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        prefix, blocks = find_blocks(model)
        n_q, n_kv, hd, inter = self._dims(model)
        per_group = n_q // n_kv
        names = (_ATTN if self.heads or self.kv_groups else ()) + (_MLP if self.mlp else ())
        targets = {f"{prefix}.{b}.{n}": blocks[b].get_submodule(n) for b in range(len(blocks)) for n in names}
        widths = self._per_layer_widths(model, ctx, targets) if self.per_layer else \
            [self.mlp_width(inter)] * len(blocks)
        new_kv, new_per_group = n_kv - self.kv_groups, per_group - self.heads
        desc = "prune-structured " + ", ".join(x for x in (f"mlp {self.mlp}" if self.mlp else "",
                                                           f"heads -{self.heads}/group" if self.heads else "",
                                                           f"kv -{self.kv_groups}" if self.kv_groups else "") if x)
        for blk in layerwise(model, ctx.calibration(), targets, ctx, desc, self.reference_windows):
            t0 = time.perf_counter()
            stats = {}
            if self.heads or self.kv_groups:
                h = blk.hessian(["self_attn.o_proj"])
                o = blk.linears["self_attn.o_proj"]
                Wo = o.weight.data.float()
                head_imp = torch.stack([((Wo[:, i * hd:(i + 1) * hd] @ h.H[i * hd:(i + 1) * hd, i * hd:(i + 1) * hd])
                                         * Wo[:, i * hd:(i + 1) * hd]).sum() for i in range(n_q)])
                grp_imp = head_imp.reshape(n_kv, per_group)
                groups = torch.sort(torch.topk(grp_imp.sum(1), new_kv).indices).values
                heads = torch.cat([g * per_group + torch.sort(torch.topk(grp_imp[g], new_per_group).indices).values
                                   for g in groups.tolist()])
                q_rows = (heads[:, None] * hd + torch.arange(hd)).flatten()
                kv_rows = (groups[:, None] * hd + torch.arange(hd)).flatten()
                keep = torch.zeros(n_q * hd, dtype=torch.bool)
                keep[q_rows] = True
                attn = blk.module.self_attn
                w_o = refit(self.aim(o.weight.data, h), h.H, keep, self.percdamp) if self.refit else None
                for n, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
                    setattr(attn, n, slice_linear(getattr(attn, n), rows=rows))
                attn.o_proj = slice_linear(o, cols=keep, weight=w_o)
                attn.num_key_value_groups = new_per_group
                stats.update(kept_heads=heads.tolist(), kept_kv_groups=groups.tolist())
            if self.mlp:
                h = blk.hessian(["mlp.down_proj"])
                down = blk.linears["mlp.down_proj"]
                imp = torch.diag(h.H) * down.weight.data.float().square().sum(0)
                width = widths[blk.index]
                keep = torch.zeros(imp.numel(), dtype=torch.bool)
                keep[torch.topk(imp, width).indices] = True
                rows = keep.nonzero().flatten()
                mlp = blk.module.mlp
                w_d = refit(self.aim(down.weight.data, h), h.H, keep, self.percdamp) if self.refit else None
                mlp.gate_proj = slice_linear(mlp.gate_proj, rows=rows)
                mlp.up_proj = slice_linear(mlp.up_proj, rows=rows)
                mlp.down_proj = slice_linear(down, cols=keep, weight=w_d)
                if hasattr(mlp, "intermediate_size"):
                    mlp.intermediate_size = width
                stats.update(mlp_width=width, mlp_importance_kept=round(float(imp[keep].sum() / imp.sum()), 6))
            blk.advance()
            ctx.record(blk.name, seconds=round(time.perf_counter() - t0, 3), **stats)
        cfg = model.config
        if self.heads or self.kv_groups:
            cfg.head_dim = hd
            cfg.num_attention_heads = new_kv * new_per_group
            cfg.num_key_value_heads = new_kv
        if self.mlp and not self.per_layer:
            cfg.intermediate_size = widths[0]
        return model
