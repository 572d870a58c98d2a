"""Layer-sequential calibration: run a model one decoder block at a time on calibration windows.

The IST-DASLab/gptq scheme: a catcher grabs the inputs of block 0, then each block is processed
and its outputs become the next block's inputs. Only one block's activations are alive at a time
(``n_samples x seqlen x hidden`` floats), so peak memory stays near the model's own size.

Within a block, linear layers that read the same tensor (q/k/v; gate/up) form a *group*; groups are
found once by tracing which modules receive the same input object, in execution order. For
true-sequential methods, `group_inputs` runs the block only up to the group it needs (a pre-hook
raises `_Stop`), so later groups see the effect of earlier groups' changes.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["find_blocks", "BlockInputs", "catch_block_inputs", "run_block", "trace_groups", "group_inputs",
           "input_hooks", "kwargs_for", "collect_inputs", "last_group_inputs",
           "residual_update"]


class _Stop(Exception):
    """Raised inside a hook to end a forward pass early."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, blocks): the ModuleList whose length is ``config.num_hidden_layers``."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return name, mod
    raise ValueError(f"cannot find the decoder blocks of {type(model).__name__} (a ModuleList of {n} layers)")


@dataclass
class BlockInputs:
    """Hidden states entering a block, in batches, plus the keyword arguments blocks receive."""
    hidden: list[torch.Tensor]              # each (batch, seqlen, hidden)
    kwargs: dict[str, Any]                  # attention mask, position embeddings, ... (same for all batches)


@contextlib.contextmanager
def input_hooks(modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor], None],
                stop_after: str | None = None) -> Iterator[None]:
    """Call ``fn(name, input)`` before each module runs; optionally stop the forward after `stop_after`.

    Hooks are always removed, even if the forward raises.
    """
    handles = []

    def make(name):
        def hook(mod, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            fn(name, x)
            if name == stop_after:
                raise _Stop
        return hook

    try:
        for name, m in modules.items():
            handles.append(m.register_forward_pre_hook(make(name), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def catch_block_inputs(model: nn.Module, ids: torch.Tensor, batch_size: int = 8) -> BlockInputs:
    """Run the model up to block 0 on `ids` (n, seqlen) and keep what enters it."""
    _, blocks = find_blocks(model)
    hidden: list[torch.Tensor] = []
    kwargs: dict[str, Any] = {}

    def grab(mod, args, kw):
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        if not kwargs:
            kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Stop

    h = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(0, ids.shape[0], batch_size):
            try:
                model(ids[i:i + batch_size], use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    kwargs.pop("past_key_values", None)
    kwargs["use_cache"] = False
    return BlockInputs(hidden, kwargs)


def kwargs_for(kwargs: dict[str, Any], batch: int) -> dict[str, Any]:
    """Slice batch-dependent kwargs (a mask or position tensor caught on a larger batch)."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] > batch:
            v = v[:batch]
        elif isinstance(v, tuple) and all(isinstance(t, torch.Tensor) for t in v):
            v = tuple(t[:batch] if t.dim() > 0 and t.shape[0] > batch else t for t in v)
        out[k] = v
    return out


@torch.no_grad()
def run_block(block: nn.Module, inp: BlockInputs) -> BlockInputs:
    """Full forward of `block` over every batch; returns the next block's inputs."""
    outs = []
    for x in inp.hidden:
        y = block(x, **kwargs_for(inp.kwargs, x.shape[0]))
        outs.append(y[0] if isinstance(y, tuple) else y)
    return BlockInputs(outs, inp.kwargs)


def _input_of(block: nn.Module, x: torch.Tensor, kwargs: dict[str, Any], name: str) -> torch.Tensor:
    """Run `block` on `x` only as far as submodule `name`; return that module's input."""
    got: list[torch.Tensor] = []
    with input_hooks({name: block.get_submodule(name)}, lambda _, t: got.append(t), stop_after=name):
        try:
            block(x, **kwargs_for(kwargs, x.shape[0]))
        except _Stop:
            pass
    return got[0]


@torch.no_grad()
def group_inputs(block: nn.Module, inp: BlockInputs, name: str, fn: Callable[[torch.Tensor], None]) -> None:
    """Run `block` on every batch only as far as submodule `name`; pass its input to `fn`."""
    for x in inp.hidden:
        fn(_input_of(block, x, inp.kwargs, name))


@torch.no_grad()
def trace_groups(block: nn.Module, inp: BlockInputs, names: dict[str, nn.Module]) -> list[list[str]]:
    """Group the linear layers of a block by shared input, in execution order (one short forward)."""
    order: list[tuple[str, int]] = []
    alive: list[torch.Tensor] = []      # keep inputs alive so that no id() is reused during the trace
    with input_hooks(names, lambda n, x: (alive.append(x), order.append((n, id(x))))):
        x = inp.hidden[0][:1]
        block(x, **kwargs_for(inp.kwargs, 1))
    groups: list[list[str]] = []
    seen: dict[int, int] = {}
    for n, key in order:
        if n in (g for grp in groups for g in grp):
            continue
        if key in seen:
            groups[seen[key]].append(n)
        else:
            seen[key] = len(groups)
            groups.append([n])
    return groups


@torch.no_grad()
def collect_inputs(block: nn.Module, inp: BlockInputs, names: list[str],
                   store: torch.dtype | None = None) -> tuple[dict[str, list[torch.Tensor]], BlockInputs]:
    """One full forward of `block` per batch, keeping the inputs of submodules `names` (per batch)
    and the block's outputs. For a block that does not change (a float reference), this replaces
    one early-stopped forward per group.

    `store` (e.g. float16) halves the memory of the kept inputs; a tensor outside its range is
    kept as it is.
    """
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def keep(n: str, t: torch.Tensor) -> None:
        if store is not None and t.is_floating_point() and t.abs().max() < torch.finfo(store).max / 2:
            t = t.to(store)
        got[n].append(t)

    with input_hooks({n: block.get_submodule(n) for n in names}, keep):
        out = run_block(block, inp)
    return got, out


@torch.no_grad()
def last_group_inputs(block: nn.Module, inp: BlockInputs, name: str,
                      fn: Callable[[torch.Tensor], None]) -> tuple[list[torch.Tensor], BlockInputs]:
    """Full forwards of `block` that pass submodule `name`'s input to `fn` and keep it.

    Returns (inputs of `name` per batch, block outputs with the *current* weights). When `name` is
    the last layer of the block and feeds the output through a residual sum (llama's down_proj),
    `residual_update` turns these outputs into the outputs after `name` changes, saving a forward.
    """
    kept: list[torch.Tensor] = []
    with input_hooks({name: block.get_submodule(name)}, lambda _, t: (kept.append(t), fn(t))):
        out = run_block(block, inp)
    return kept, out


@torch.no_grad()
def residual_update(block: nn.Module, inp: BlockInputs, out: BlockInputs, name: str, x: list[torch.Tensor],
                    delta: torch.Tensor, rtol: float = 1e-3) -> BlockInputs:
    """Outputs of `block` after submodule `name`'s weight changed by `delta` (new - old).

    Assumes out = ... + name(x), i.e. the layer's output reaches the block output through a plain
    residual sum, so the change is x @ delta^T. The assumption is checked on the first batch
    against a real forward; if it does not hold, every batch is recomputed.
    """
    if delta.shape[0] != out.hidden[0].shape[-1]:       # its output is not the block's width (up_proj alone)
        return run_block(block, inp)
    new = [y + F.linear(xi, delta.to(xi.dtype)).reshape(y.shape) for y, xi in zip(out.hidden, x)]
    check = run_block(block, BlockInputs(inp.hidden[:1], inp.kwargs)).hidden[0]
    err = (check - new[0]).norm() / check.norm().clamp_min(1e-30)
    if err > rtol:
        return run_block(block, inp)
    new[0] = check
    return BlockInputs(new, out.kwargs)
