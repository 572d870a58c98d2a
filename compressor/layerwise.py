"""The layer-wise calibration loop every calibrated pass uses (GPTQ, AWQ; SparseGPT, Wanda, SVD-LLM next).

    for blk in layerwise(model, ctx.calibration(), targets, ctx, desc="gptq"):
        for group in blk.groups:                 # Linears sharing an input, in execution order
            h = blk.hessian(group)               # 2 XᵀX / n through the block as it stands now
            ...                                  # change the group's weights
        blk.advance()                            # next block's inputs, through the changed block
        ...                                      # swap in compressed modules

The IST-DASLab/gptq scheme: the inputs of block 0 are caught once, each block is processed, and its
outputs become the next block's inputs, so a block sees inputs that went through the blocks already
compressed before it. One block's activations (``n_samples x seqlen x hidden``) are alive at a time,
and the block is moved to ``ctx.device`` while it is processed.

What a block gives on request, per group (the early-stopped forwards of `compressor.sequential`
make it true-sequential: a group's inputs include the changes made to the groups before it):
  * `LayerwiseBlock.hessian`: the input Hessian (`compressor.hessian.Hessian`), with the cross
    term against the float model's stream when the loop carries one (``reference=``);
  * `LayerwiseBlock.input_stats`: per-input-channel sums (Wanda's norms, AWQ's mean |x|);
  * `LayerwiseBlock.forward`: one full forward that hands each named Linear's input to a function
    and returns the block's outputs (AWQ samples all groups in one forward);
  * `LayerwiseBlock.reference_outputs`: the float block's outputs on the float stream.

`advance` computes the next inputs once (automatically after the loop body if the pass did not):
through the block as it stands, or from outputs the pass hands it. When the last group is a single
Linear that reaches the block output through a residual sum (llama's down_proj), its Hessian is
taken from full forwards whose outputs are kept, and `advance` adds ``x @ Δᵀ`` for that layer's
weight change instead of running the block again (checked against a real forward on one batch;
recomputed if any other weight of the block changed since).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .hessian import Hessian, InputStats
from .sequential import (BlockInputs, catch_block_inputs, collect_inputs, find_blocks, group_inputs, input_hooks,
                         last_group_inputs, residual_update, run_block, trace_groups)

__all__ = ["layerwise", "LayerwiseBlock", "check_in_blocks", "find_blocks"]


def check_in_blocks(model: nn.Module, names, who: str) -> None:
    """Refuse target Linears outside the decoder blocks (the loop only visits blocks)."""
    prefix, _ = find_blocks(model)
    outside = [n for n in names if not n.startswith(prefix + ".")]
    if outside:
        raise ValueError(f"{who} works on Linears inside the decoder blocks ({prefix}.*); {outside[:3]} lie "
                         f"outside: add them to ignore")


def _to(inp: BlockInputs, device: torch.device) -> BlockInputs:
    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, tuple):
            return tuple(move(t) for t in v)
        return v
    return BlockInputs([h.to(device) for h in inp.hidden], {k: move(v) for k, v in inp.kwargs.items()})


def _weights_state(module: nn.Module, skip: nn.Parameter | None) -> list[tuple[int, int]]:
    return [(p.data_ptr(), p._version) for p in module.parameters() if p is not skip]


class LayerwiseBlock:
    """One decoder block while a layer-wise pass works on it; see the module docstring."""

    def __init__(self, index: int, prefix: str, module: nn.Module, linears: dict[str, nn.Linear],
                 inputs: BlockInputs, ref_x: dict[str, list[torch.Tensor]] | None = None,
                 ref_out: BlockInputs | None = None):
        self.index, self.name, self.module = index, f"{prefix}.{index}", module
        self.linears = linears                   # local name -> targeted Linear of this block
        self.inputs = inputs
        self.groups: list[list[str]] = trace_groups(module, inputs, linears)
        self._ref_x = ref_x                      # float-stream inputs of each group's first Linear
        self.reference_outputs = ref_out
        self._pending = None                     # (name, inputs kept, outputs, weight then, others' state)
        self.next_inputs: BlockInputs | None = None

    def full_name(self, local: str) -> str:
        return f"{self.name}.{local}"

    def _feed(self, group: list[str], fn: Callable[[torch.Tensor], None]) -> None:
        """Pass every batch's input of `group` to `fn`, through the block as it stands now."""
        head = group[0]
        if group == self.groups[-1] and len(group) == 1 and self.next_inputs is None:
            kept, out = last_group_inputs(self.module, self.inputs, head, fn)
            lin = self.linears[head]
            self._pending = (head, kept, out, lin.weight.data.clone(), _weights_state(self.module, lin.weight))
        else:
            group_inputs(self.module, self.inputs, head, fn)

    def hessian(self, group: list[str]) -> Hessian:
        """``H = 2 XᵀX / n`` of the group's input over every calibration batch, finished."""
        head = group[0]
        dev = self.inputs.hidden[0].device
        refs = self._ref_x.pop(head, None) if self._ref_x is not None else None
        h = Hessian(self.linears[head].in_features, reference=refs is not None, device=dev)
        it = iter(refs) if refs is not None else None
        self._feed(group, lambda x: h.add(x, next(it, None) if it is not None else None))
        return h.finish()

    def input_stats(self, group: list[str]) -> InputStats:
        """Per-channel sums of the group's input over every calibration batch."""
        s = InputStats(self.linears[group[0]].in_features, device=self.inputs.hidden[0].device)
        self._feed(group, s.add)
        return s

    def forward(self, fns: dict[str, Callable[[str, torch.Tensor], None]] | None = None) -> BlockInputs:
        """A full forward over every batch, calling ``fns[name](name, input)`` before each named Linear."""
        fns = fns or {}
        with input_hooks({n: self.module.get_submodule(n) for n in fns}, lambda n, x: fns[n](n, x)):
            return run_block(self.module, self.inputs)

    def advance(self, outputs: BlockInputs | None = None) -> BlockInputs:
        """The next block's inputs, computed once: `outputs` if given, else through the block as it is."""
        if self.next_inputs is None:
            if outputs is not None:
                self.next_inputs = outputs
            elif self._pending is not None:
                name, x, out, w0, others = self._pending
                lin = self.linears[name]
                if _weights_state(self.module, lin.weight) == others:
                    self.next_inputs = residual_update(self.module, self.inputs, out, name, x, lin.weight.data - w0)
                else:                            # something else changed since the outputs were kept
                    self.next_inputs = run_block(self.module, self.inputs)
            else:
                self.next_inputs = run_block(self.module, self.inputs)
            self._pending = None
        return self.next_inputs


def layerwise(model: nn.Module, ids: torch.Tensor, targets: dict[str, nn.Module], ctx: Any, desc: str,
              reference: int | None = None) -> Iterator[LayerwiseBlock]:
    """Yield each decoder block of `model` with its targeted Linears, on calibration windows `ids`.

    Args:
        ids: (n, seqlen) int64 calibration windows.
        targets: full name -> Linear, the layers the pass works on (others are left alone).
        ctx: the pass `Context` (``device``, ``progress``).
        reference: None, or carry the *float* model's stream too, on the first batches holding
            `reference` windows (0: all): each block's float inputs feed `Hessian.reference_terms`.
    """
    prefix, blocks = find_blocks(model)
    device = torch.device(getattr(ctx, "device", "cpu"))
    inp = _to(catch_block_inputs(model, ids), device)
    ref_inp = None
    if reference is not None:
        keep, seen = [], 0
        for x in inp.hidden:
            if reference and seen >= reference:
                break
            keep.append(x)
            seen += x.shape[0]
        ref_inp = BlockInputs(keep, inp.kwargs)
    bar = tqdm(blocks, desc=desc, unit="block", disable=not getattr(ctx, "progress", True))
    for b, block in enumerate(bar):
        pre = f"{prefix}.{b}."
        home = next(block.parameters()).device
        if home != device:
            block.to(device)
        linears = {n[len(pre):]: m for n, m in targets.items() if n.startswith(pre)}
        blk = LayerwiseBlock(b, prefix, block, linears, inp)
        if ref_inp is not None:                  # the float block once, before the pass changes it
            blk._ref_x, blk.reference_outputs = collect_inputs(block, ref_inp, [g[0] for g in blk.groups],
                                                               store=torch.float16)
            ref_inp = blk.reference_outputs
        yield blk
        inp = blk.advance()
        del blk
        if home != device:
            block.to(home)
