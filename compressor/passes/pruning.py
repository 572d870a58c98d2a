"""Shared config and wiring for the unstructured / N:M pruning passes (magnitude, wanda, sparsegpt).

`PruneConfig` holds what every such pass takes, validates it before any work starts and checks the
pattern against every targeted layer (`check_shapes`):

  * ``sparsity`` in [0, 0.9]: that fraction of every targeted layer's weights becomes zero, or
  * ``pattern: "N:M"``: at most N nonzeros in every M consecutive weights of a row (2:4, 4:8);
  * ``allocation``: ``uniform`` (every block at ``sparsity``), ``owl`` (Yin et al. 2024: blocks
    with more activation outliers, scores above ``owl_m`` x their mean, keep more weights) or
    ``sensitivity`` (blocks whose pruning removes more of the squared score, the diagonal-Hessian
    estimate of the output error, keep more). Both spread the blocks' sparsities linearly over
    ``sparsity ± owl_lambda`` with the mean kept at ``sparsity``, so the model's sparsity is the
    one asked for. Only with ``sparsity`` (a pattern fixes every layer's sparsity).

The scores are |W|·‖X_j‖ (Wanda's) for passes that read calibration data and |W| for `magnitude`;
OWL's statistics come from one layer-wise sweep over the *unpruned* model before the pass runs.
`swap_in_sparse` replaces a Linear by a `SparseLinear` (bitmask checkpoint format) and records its
sparsity in compression.json.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..layerwise import check_in_blocks, find_blocks, layerwise
from ..nn.sparse import SparseLinear
from ..sparsity import allocate, nm_mask, outlier_ratio, parse_pattern, removed_fraction, row_mask, zero_fraction
from .base import FLOATS, Context, PassConfig, State

__all__ = ["PruneConfig", "Allocation", "swap_in_sparse", "MAX_SPARSITY"]

MAX_SPARSITY = 0.9


class Allocation(str, enum.Enum):
    UNIFORM = "uniform"
    OWL = "owl"
    SENSITIVITY = "sensitivity"


@dataclass(frozen=True)
class PruneConfig(PassConfig):
    accepts = FLOATS

    sparsity: float | None = None
    pattern: str | None = None
    allocation: Allocation = Allocation.UNIFORM
    owl_lambda: float = 0.08
    owl_m: float = 5.0

    def __post_init__(self):
        super().__post_init__()
        if (self.sparsity is None) == (self.pattern is None):
            raise ValueError(f"{self.name}: give either sparsity (0 to {MAX_SPARSITY}) or pattern ('2:4', '4:8'), "
                             f"not {'both' if self.pattern is not None else 'neither'}")
        if self.sparsity is not None:
            if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) \
                    or not 0 <= self.sparsity <= MAX_SPARSITY:
                raise ValueError(f"{self.name}.sparsity={self.sparsity!r} must be a number in [0, {MAX_SPARSITY}]")
        else:
            try:
                parse_pattern(self.pattern)
            except ValueError as e:
                raise ValueError(f"{self.name}.{e}") from None
        try:
            object.__setattr__(self, "allocation", Allocation(self.allocation))
        except ValueError:
            raise ValueError(f"{self.name}.allocation={self.allocation!r} is not one of "
                             f"{[a.value for a in Allocation]}") from None
        if self.allocation is not Allocation.UNIFORM and self.pattern is not None:
            raise ValueError(f"{self.name}: allocation={self.allocation.value} needs sparsity, not a pattern "
                             f"(an N:M pattern fixes every layer's sparsity)")
        if not 0 <= self.owl_lambda <= 0.5:
            raise ValueError(f"{self.name}.owl_lambda={self.owl_lambda!r} must be in [0, 0.5]")
        if not self.owl_m > 0:
            raise ValueError(f"{self.name}.owl_m={self.owl_m!r} must be > 0")

    @property
    def nm(self) -> tuple[int, int] | None:
        return None if self.pattern is None else parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        if self.nm is None:
            return float(self.sparsity)
        n, m = self.nm
        return 1 - n / m

    def produces(self, state: State) -> State:
        return State.FLOAT_SPARSE

    def check(self, model: nn.Module, ctx: Context) -> None:
        mods = self.check_targets(model)
        if self.needs_calibration or self.allocation is not Allocation.UNIFORM:
            check_in_blocks(model, mods, self.name)

    def stream_refusal(self, model: nn.Module) -> str | None:
        if self.allocation is not Allocation.UNIFORM:
            return (f"pass {self.name!r} with allocation={self.allocation.value} ranks every block before pruning "
                    f"any (allocation: uniform streams)")
        return super().stream_refusal(model)

    def check_shapes(self, shapes: dict[str, tuple[int, int]]) -> None:
        if self.nm is None:
            return
        n, m = self.nm
        bad = [f"{name} (in_features={k})" for name in self.targeted(shapes) for k in [shapes[name][0]] if k % m]
        if bad:
            raise ValueError(f"{self.name}.pattern={self.pattern!r}: M={m} does not divide in_features of "
                             f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}; add them to ignore")

    # --- masks ------------------------------------------------------------------------------
    def mask(self, score: torch.Tensor, sparsity: float) -> torch.Tensor:
        """Keep mask of one layer from its scores (per row, or N:M)."""
        if self.nm is not None:
            return nm_mask(score, *self.nm)
        return row_mask(score, sparsity)

    def block_sparsities(self, model: nn.Module, ctx: Context, targets: dict[str, nn.Module],
                         score: Callable[[nn.Linear, torch.Tensor | None], torch.Tensor],
                         with_inputs: bool) -> dict[str, float]:
        """Sparsity of every targeted layer: uniform, or allocated per decoder block (see module doc).

        `score(linear, input_norm)` gives a layer's scores; `with_inputs` runs the dense layer-wise
        sweep for ``‖X_j‖`` first (else `input_norm` is None)."""
        s = self.target_sparsity
        if self.allocation is Allocation.UNIFORM:
            return {n: s for n in targets}
        prefix, blocks = find_blocks(model)
        per_block: dict[int, list[torch.Tensor]] = {}

        def stat(scores: list[torch.Tensor]) -> float:
            return outlier_ratio(scores, self.owl_m) if self.allocation is Allocation.OWL else \
                removed_fraction(scores, s)

        stats: dict[int, float] = {}
        if with_inputs:
            for blk in layerwise(model, ctx.calibration(), targets, ctx, f"{self.name} {self.allocation.value}"):
                scores = []
                for grp in blk.groups:
                    norm = blk.input_stats(grp).norm
                    scores += [score(blk.linears[n], norm) for n in grp]
                if scores:
                    stats[blk.index] = stat(scores)
        else:
            for name, lin in targets.items():
                b = int(name[len(prefix) + 1:].split(".")[0])
                per_block.setdefault(b, []).append(score(lin, None))
            stats = {b: stat(v) for b, v in per_block.items()}
        order = sorted(stats)
        alloc = dict(zip(order, allocate([stats[b] for b in order], s, self.owl_lambda)))
        out = {}
        for name in targets:
            b = int(name[len(prefix) + 1:].split(".")[0])
            out[name] = alloc[b]
        for b in order:
            ctx.record(f"{prefix}.{b}", **{f"{self.allocation.value}_score": round(stats[b], 6),
                                           "allocated_sparsity": round(alloc[b], 4)})
        return out


def swap_in_sparse(model: nn.Module, name: str, linear: nn.Linear, mask: torch.Tensor | None, cfg: PruneConfig,
                   ctx: Context, **stats) -> SparseLinear:
    """Replace `linear` (at `name`) by a `SparseLinear` keeping `mask` and record its sparsity."""
    sp = SparseLinear.from_linear(linear, mask, pattern=cfg.pattern)
    model.set_submodule(name, sp)
    ctx.record(name, sparsity=round(zero_fraction(sp.weight), 6), **stats)
    return sp
