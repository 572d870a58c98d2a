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
recomputed if any other weight of the block changed since). Likewise, when a group is a single
Linear that ends its parent submodule (llama's o_proj in self_attn), its inputs are kept and the
block's later forwards run that Linear on them in place of the whole parent, so attention is
computed once per block instead of three times (checked against a real forward on one batch; off
as soon as a weight changes that the parent's output depends on; `SHORTCUT = False` turns it off).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .errors import NumericError
from .machine import release_memory
from .hessian import Hessian, InputStats
from .sequential import (BlockInputs, catch_block_inputs, collect_inputs, find_blocks, group_inputs, input_hooks,
                         last_group_inputs, residual_update, run_block, trace_groups)

__all__ = ["layerwise", "blockwise", "outside_blocks", "LayerwiseBlock", "check_in_blocks", "find_blocks"]


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


def _weights_state(module: nn.Module, skip) -> list[tuple[int, int]]:
    """(data pointer, version) of every parameter of `module` but `skip` (one parameter, or a list)."""
    skip = {id(p) for p in (skip if isinstance(skip, (list, tuple)) else [skip])}
    return [(p.data_ptr(), p._version) for p in module.parameters() if id(p) not in skip]


SHORTCUT = True     # set False to recompute every submodule (the shortcut gives the same numbers)


@dataclass
class _Memo:
    """The inputs a single-Linear group's layer received, kept so that later forwards of the block
    can replace the layer's parent submodule (llama's self_attn for o_proj) by the layer alone."""
    head: str                                # local name of the Linear
    kept: list[torch.Tensor]                 # its input, per batch
    free: list[nn.Parameter]                 # may change: the Linear's weight, the later groups' weights
    state: list[tuple[int, int]]             # the block's other weights when they were kept
    ok: bool | None = None                   # checked on the first batch at first use
    rest: tuple = field(default_factory=tuple)
    is_tuple: bool = False

    @property
    def parent(self) -> str:
        return self.head.rpartition(".")[0]


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
        self._memo: _Memo | None = None
        self._batch = {id(x): i for i, x in enumerate(inputs.hidden)}

    def full_name(self, local: str) -> str:
        return f"{self.name}.{local}"

    def _feed(self, group: list[str], fn: Callable[[torch.Tensor], None]) -> None:
        """Pass every batch's input of `group` to `fn`, through the block as it stands now."""
        head = group[0]
        with self._shortcut():
            if group == self.groups[-1] and len(group) == 1 and self.next_inputs is None:
                kept, out = last_group_inputs(self.module, self.inputs, head, fn)
                lin = self.linears[head]
                self._pending = (head, kept, out, lin.weight.data.clone(), _weights_state(self.module, lin.weight))
            elif SHORTCUT and self._memoizable(group):
                kept: list[torch.Tensor] = []
                group_inputs(self.module, self.inputs, head, lambda x: (kept.append(x), fn(x)))
                later = self.groups[self.groups.index(group) + 1:]
                free = [self.linears[head].weight] + [p for g in later for n in g for p in self.linears[n].parameters()]
                self._memo = _Memo(head, kept, free, _weights_state(self.module, free))
            else:
                group_inputs(self.module, self.inputs, head, fn)

    # --- the shortcut: a parent submodule replaced by its last Linear on kept inputs ---------
    def _memoizable(self, group: list[str]) -> bool:
        """A single Linear inside a submodule that no later group reaches into (o_proj in self_attn)."""
        parent = group[0].rpartition(".")[0]
        if len(group) != 1 or not parent:
            return False
        later = self.groups[self.groups.index(group) + 1:]
        return not any(n.startswith(parent + ".") for g in later for n in g)

    def _memo_holds(self, m: _Memo) -> bool:
        """Whether the parent's output is still its last Linear applied to the kept inputs: no weight
        changed but that Linear's and the later groups' (which run after the parent), and (once, on
        the first batch) a real forward agrees."""
        lin = self.linears[m.head]
        if _weights_state(self.module, m.free) != m.state:
            return False
        if m.ok is None:
            got = []
            h = self.module.get_submodule(m.parent).register_forward_hook(lambda mod, a, out: got.append(out))
            try:
                run_block(self.module, BlockInputs(self.inputs.hidden[:1], self.inputs.kwargs))
            finally:
                h.remove()
            out = got[0]
            m.is_tuple = isinstance(out, tuple)
            y, m.rest = (out[0], tuple(out[1:])) if m.is_tuple else (out, ())
            with torch.no_grad():
                ref = lin(m.kept[0])
            m.ok = (all(r is None for r in m.rest) and isinstance(y, torch.Tensor) and y.shape == ref.shape
                    and bool((y - ref).norm() <= 1e-5 * y.norm().clamp_min(1e-30)))
        return m.ok

    @contextlib.contextmanager
    def _shortcut(self):
        """While active, the memoized parent returns ``Linear(kept input of this batch)`` without running."""
        m = self._memo
        if m is None or not self._memo_holds(m):
            yield
            return
        parent, lin = self.module.get_submodule(m.parent), self.linears[m.head]
        real, cur = parent.forward, [None]

        def which(mod, args, kwargs):            # the batch this block forward runs on
            x = args[0] if args else kwargs.get("hidden_states")
            cur[0] = self._batch.get(id(x))

        def forward(*a, **k):
            if cur[0] is None:
                return real(*a, **k)
            y = lin(m.kept[cur[0]])
            return (y, *m.rest) if m.is_tuple else y

        h = self.module.register_forward_pre_hook(which, with_kwargs=True)
        parent.forward = forward
        try:
            yield
        finally:
            h.remove()
            del parent.forward

    def hessian(self, group: list[str]) -> Hessian:
        """``H = 2 XᵀX / n`` of the group's input over every calibration batch, finished."""
        head = group[0]
        dev = self.inputs.hidden[0].device
        refs = self._ref_x.pop(head, None) if self._ref_x is not None else None
        h = Hessian(self.linears[head].in_features, reference=refs is not None, device=dev)
        it = iter(refs) if refs is not None else None
        self._feed(group, lambda x: h.add(x, next(it, None) if it is not None else None))
        h.finish()
        if not torch.isfinite(h.H).all():
            raise NumericError(f"{self.full_name(head)}: its calibration inputs hold NaN/Inf (the Hessian is not "
                               f"finite); an earlier layer of this block is numerically broken, so nothing was written")
        return h

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
        with self._shortcut():
            return self._advance(outputs)

    def _advance(self, outputs: BlockInputs | None) -> BlockInputs:
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
            self._memo = None
        return self.next_inputs


def layerwise(model: nn.Module, ids: torch.Tensor, targets: dict[str, nn.Module], ctx: Any, desc: str,
              reference: int | None = None, commit: bool = False,
              generator: torch.Generator | None = None) -> Iterator[LayerwiseBlock]:
    """Yield each decoder block of `model` with its targeted Linears, on calibration windows `ids`.

    Args:
        ids: (n, seqlen) int64 calibration windows.
        targets: full name -> Linear, the layers the pass works on (others are left alone).
        ctx: the pass `Context` (``device``, ``progress``).
        reference: None, or carry the *float* model's stream too, on the first batches holding
            `reference` windows (0: all): each block's float inputs feed `Hessian.reference_terms`.
        commit: the pass's main loop, whose every effect is on the block and on ``ctx.layer_stats``. When
            ``ctx.work_dir`` is set, each finished block is committed there (`compressor.workdir.LoopStore`),
            and with ``ctx.resume`` the loop restores the committed blocks and their inputs and starts after
            them: the result is bit-identical to an uninterrupted run. One such loop per pass.
        generator: a random generator the loop body draws from; its state is committed with each block
            and restored on resume.
    """
    prefix, blocks = find_blocks(model)
    device = torch.device(getattr(ctx, "device", "cpu"))
    stream = getattr(ctx, "stream", None)
    if stream is not None:
        if not commit:
            raise ValueError(f"{desc}: a streamed run (--stream) sweeps the blocks once per pass; this pass needs a "
                             f"second sweep: run without --stream")
        stream.load_stem()                       # the catcher runs the embedding (and the rotary tables)
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
    store = _store(ctx) if commit else None
    done = store.blocks_done() if store is not None and getattr(ctx, "resume", False) else 0
    if done:
        inp, ref_inp = _restore(store, done, blocks, prefix, ctx, inp, ref_inp, generator, device,
                                streamed=stream is not None)
    bar = tqdm(range(len(blocks)), desc=desc, unit="block", initial=done, disable=not getattr(ctx, "progress", True))
    for b in range(done, len(blocks)):
        block = blocks[b] if stream is None else stream.load(b)
        pre = f"{prefix}.{b}."
        home = next(block.parameters()).device
        if home != device:
            block.to(device)
        linears = {n[len(pre):]: block.get_submodule(n[len(pre):]) for n in targets if n.startswith(pre)}
        blk = LayerwiseBlock(b, prefix, block, linears, inp)
        if ref_inp is not None:                  # the float block once, before the pass changes it
            blk._ref_x, blk.reference_outputs = collect_inputs(block, ref_inp, [g[0] for g in blk.groups],
                                                               store=torch.float16)
            ref_inp = blk.reference_outputs
        yield blk
        inp = blk.advance()
        _check_finite(inp.hidden, f"{prefix}.{b}")
        del blk
        if home != device:
            block.to(home)
        if store is not None:
            stats = {n: v for n, v in ctx.layer_stats.items() if n.startswith(pre)}
            store.commit_block(b, block, stats, inp.hidden, None if ref_inp is None else ref_inp.hidden,
                               None if generator is None else generator.get_state())
        if stream is not None:
            stream.free(b)                       # (and trims the heap)
        else:
            release_memory()                     # the block's activations freed: glibc's fragments back to the OS
        bar.update(1)
    bar.close()


def outside_blocks(model: nn.Module, names) -> list[str]:
    """The names among `names` that lie outside the decoder blocks (all of them when there are none)."""
    try:
        prefix, _ = find_blocks(model)
    except ValueError:
        return list(names)
    return [n for n in names if not n.startswith(prefix + ".")]


def blockwise(model: nn.Module, ctx: Any, desc: str) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(full name, module)`` of each decoder block, for a pass that needs no data (rtn, magnitude).

    Without a stream this is a plain walk. In a streamed run (``ctx.stream``) each block is read before it is
    yielded, committed to the pass's `LoopStore` and freed after; with ``ctx.resume`` the blocks committed
    before a crash are skipped (their layer stats restored).
    """
    stream = getattr(ctx, "stream", None)
    try:
        prefix, blocks = find_blocks(model)
    except ValueError:
        if stream is not None:
            raise
        return                                   # no decoder blocks: the pass treats every target as outside
    store = _store(ctx) if stream is not None else None
    done = store.blocks_done(inputs=False) if store is not None and getattr(ctx, "resume", False) else 0
    for b in range(done):
        for name, v in store.block_stats(b).items():
            ctx.layer_stats.setdefault(name, {}).update(v)
    for b in tqdm(range(done, len(blocks)), desc=desc, unit="block", initial=done, total=len(blocks),
                  disable=not getattr(ctx, "progress", True)):
        name = f"{prefix}.{b}"
        yield name, (blocks[b] if stream is None else stream.load(b))
        if store is not None:
            stats = {n: v for n, v in ctx.layer_stats.items() if n.startswith(name + ".")}
            store.commit_block(b, blocks[b], stats, None, None)
        if stream is not None:
            stream.free(b)


def _check_finite(hidden: list[torch.Tensor], block: str) -> None:
    """The calibration stream after `block` must be finite: NaN/Inf there would be quantized into every later
    block, so the run stops, naming the first block that produced it."""
    for i, h in enumerate(hidden):
        if not torch.isfinite(h).all():
            raise NumericError(f"{block}: its output on calibration batch {i} has {int((~torch.isfinite(h)).sum())} "
                               f"NaN/Inf values; the block (or the pass on it) is numerically broken, so nothing "
                               f"was written")


def _store(ctx: Any):
    """The `LoopStore` of the pass `ctx` is running, or None when the run keeps no work directory."""
    from .workdir import LoopStore, pass_dir
    work, index = getattr(ctx, "work_dir", None), getattr(ctx, "pass_index", None)
    if work is None or index is None:
        return None
    return LoopStore(pass_dir(work, index, ctx.pass_name) / "layerwise")


def _restore(store, done: int, blocks, prefix: str, ctx: Any, inp: BlockInputs, ref_inp: BlockInputs | None,
             generator: torch.Generator | None, device: torch.device, streamed: bool = False):
    """Blocks ``0 .. done-1`` as committed, their layer stats into ``ctx``; the inputs of block `done`.
    A streamed run leaves the committed blocks on disk (the next pass or the save reads them)."""
    rng = None
    for b in range(done):
        if streamed:
            stats, rng = store.block_stats(b), store.block_rng(b) if b == done - 1 else None
        else:
            stats, rng = store.restore_block(b, blocks[b])
        for name, v in stats.items():
            ctx.layer_stats.setdefault(name, {}).update(v)
    if generator is not None and rng is not None:
        generator.set_state(rng)
    hidden, ref = store.inputs(done - 1)
    inp = BlockInputs([h.to(device) for h in hidden], inp.kwargs)
    if ref_inp is not None:
        ref_inp = BlockInputs([h.to(device) for h in ref], ref_inp.kwargs)
    return inp, ref_inp
