"""Layer streaming (`compress --stream`): compress a model bigger than memory, one decoder block at a time.

The model is built on the meta device from its config; nothing is read until a pass needs it:
  * a decoder block, when a pass's sweep reaches it (`compressor.layerwise.layerwise` for calibrated passes,
    `compressor.layerwise.blockwise` for data-free ones), from the source's safetensors shards for the first
    pass and from the previous pass's committed blocks for the others;
  * the tensors outside the blocks that the calibration loop's catcher runs (embedding, rotary tables), once
    per calibrated pass; an untied output head is never read before the save.
After its pass is done with it, a block is committed to ``OUT.work/pass-NN-NAME/layerwise/block-BBBB``
(`compressor.workdir.LoopStore`: atomic, sha256) and its tensors go back to the meta device, so peak RSS is
about one block (at the model's fp32 compute width) plus the calibration stream, whatever the model's size.
A recipe of several passes is several sweeps, each reading the previous one's blocks: every pass sees what it
would see in memory, so the result is the non-streamed one, bit for bit.

`write_checkpoint` then writes ``model.safetensors`` without ever holding the model: a first walk takes each
output tensor's name, dtype and shape (one block at a time), the header is laid out as safetensors'
own ``save_file`` lays it out (tensors ordered by dtype then name, the same JSON, padded to 8 bytes), and a
second walk writes each tensor at its offset. The file is byte-identical to a non-streamed run's
(tests/test_stream.py); config.json and the tokenizer are the same too.

Streamable passes say so (`PassConfig.stream_refusal` returns None): rtn, gptq, awq, wanda, sparsegpt and
magnitude with uniform allocation, on Linears inside the decoder blocks. Evaluation (--eval-data, --eval-tasks)
needs the whole model and is refused with --stream; measure the checkpoint afterwards (`compress-bench`).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from .errors import InputError
from .sequential import find_blocks
from .workdir import LoopStore, _tensors, pass_dir, restore_modules

__all__ = ["Stream", "ShardReader", "SafetensorsLayout", "write_checkpoint", "StreamError"]


class StreamError(InputError):
    """A model or recipe that --stream cannot run."""


# ---------------------------------------------------------------------------------------------------------
# reading the source one tensor at a time
# ---------------------------------------------------------------------------------------------------------
class ShardReader:
    """Tensors of an HF directory's ``*.safetensors`` shards, read one at a time by name (the shards are
    checked first: a truncated or corrupt one is named before any work)."""

    def __init__(self, path: Path):
        from .models import check_safetensors
        self.where: dict[str, Path] = {}
        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise StreamError(f"{path}: no *.safetensors shards to stream from (--stream reads a Hugging Face "
                              f"directory; convert a .gguf by running once without --stream)")
        for f in files:
            for k in check_safetensors(f):
                if k != "__metadata__":
                    self.where[k] = f

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Tensor `name`, floating ones at `dtype` (as ``from_pretrained(dtype=...)`` loads them), in memory of
        its own (not pages of the mapped shard)."""
        from safetensors import safe_open
        if name not in self.where:
            raise StreamError(f"the source has no tensor {name!r}, which the model's config.json builds; --stream "
                              f"reads the standard layout: run without --stream")
        with safe_open(str(self.where[name]), framework="pt") as f:
            t = f.get_tensor(name)
        return t.to(dtype, copy=True) if t.is_floating_point() else t.clone()


class Stream:
    """A model on the meta device whose blocks are read, committed and freed one at a time (module docstring).

    `compressor.api.compress_` calls `begin_pass` / `end_pass` around each pass; the sweeps call `load_stem`,
    `load` and `free`; `compressor.layerwise` commits each finished block to `store`.
    """

    def __init__(self, source: Path, model: nn.Module, work: Path, dtype: torch.dtype = torch.float32):
        self.source, self.model, self.work, self.dtype = Path(source), model, Path(work), dtype
        self.reader = ShardReader(self.source)
        self.prefix, self.blocks = find_blocks(model)
        self.store: LoopStore | None = None          # the running pass's commits
        self.prev: LoopStore | None = None           # the blocks as the last finished pass left them; None: source
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        tied = out is not None and inp is not None and out.weight is inp.weight
        self._head = None if out is None or tied else next(n for n, m in model.named_modules() if m is out)

    # --- passes ---------------------------------------------------------------------------------------
    def begin_pass(self, index: int, name: str) -> None:
        self.store = LoopStore(pass_dir(self.work, index, name) / "layerwise")

    def end_pass(self) -> None:
        """The running pass's blocks become what the next pass reads; the ones before are dropped. A pass
        that swept no block (the head pass works on the stem) leaves the previous pass's blocks current."""
        store, self.store = self.store, None
        if self.prev is None or (store.root.is_dir() and any(store.root.iterdir())):
            old, self.prev = self.prev, store
            if old is not None:
                shutil.rmtree(old.root.parent, ignore_errors=True)
        else:
            shutil.rmtree(store.root.parent, ignore_errors=True)
        self.free_stem()

    def resume_after(self, index: int, name: str) -> None:
        """Continue after committed pass `index` (`name`): the blocks of the last pass up to it that swept
        them are what the next pass reads."""
        swept = sorted(d for d in self.work.glob("pass-??-*/layerwise") if int(d.parent.name[5:7]) <= index
                       and any(d.iterdir()))
        self.prev = LoopStore(swept[-1] if swept else pass_dir(self.work, index, name) / "layerwise")

    # --- tensors --------------------------------------------------------------------------------------
    def _outside(self) -> list[tuple[str, torch.Tensor]]:
        pre = self.prefix + "."
        return [(n, t) for n, t in _tensors(self.model) if not n.startswith(pre)]

    def load_stem(self) -> None:
        """Read what lies outside the blocks (embedding, final norm), but an untied output head."""
        want = {n: t for n, t in self._outside() if t.is_meta and not (self._head and n.startswith(self._head + "."))}
        if want:
            sd = {n: self.reader.get(n, self.dtype if t.is_floating_point() else t.dtype) for n, t in want.items()
                  if n in self.reader.where}
            self.model.load_state_dict(sd, strict=False, assign=True)
            self.model.tie_weights()

    def free_stem(self) -> None:
        """The parameters outside the blocks back to the meta device (buffers, the rotary tables, stay)."""
        pre = self.prefix + "."
        for name, mod in self.model.named_modules():
            if name == self.prefix or name.startswith(pre):
                continue
            for leaf, p in list(mod._parameters.items()):
                if p is not None and not p.is_meta:
                    mod._parameters[leaf] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
        self.model.tie_weights()

    def load(self, b: int) -> nn.Module:
        """Block `b` read into memory: from the source (first pass) or as the previous pass committed it."""
        block = self.blocks[b]
        if self.prev is None:
            pre = f"{self.prefix}.{b}."
            tensors = {n: self.reader.get(pre + n, self.dtype if t.is_floating_point() else t.dtype)
                       for n, t in _tensors(block) if t.is_meta}
            restore_modules(block, tensors, {"modules": {}, "ties": {}})
        else:
            self.prev.restore_block(b, block)
        return block

    def free(self, b: int) -> None:
        """Block `b`'s tensors back to the meta device (after its commit), and the freed heap back to the OS:
        without the trim, glibc keeps ~70 MB per 7B-sized block in fragments and RSS grows with the depth."""
        from .machine import release_memory
        self.blocks[b].to("meta")
        release_memory()


# ---------------------------------------------------------------------------------------------------------
# writing a safetensors file tensor by tensor, as save_file would
# ---------------------------------------------------------------------------------------------------------
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


class SafetensorsLayout:
    """Where each tensor goes in a safetensors file, laid out as ``safetensors.torch.save_file`` lays it out:
    the order is taken from safetensors itself (a file of one-element stand-ins with the same names and dtypes),
    so a change of its rule in a later version is followed, and the test compares whole files."""

    def __init__(self, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
        from safetensors.torch import save
        for n, (dt, _) in specs.items():
            if dt not in _DTYPES:
                raise ValueError(f"{n}: dtype {dt} has no safetensors name here")
        stand_in = save({n: torch.zeros(1, dtype=dt) for n, (dt, _) in specs.items()}, metadata=metadata)
        (n,) = struct.unpack("<Q", stand_in[:8])
        order = [k for k in json.loads(stand_in[8:8 + n]) if k != "__metadata__"]
        self.offsets: dict[str, tuple[int, int]] = {}
        head: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        pos = 0
        for k in order:
            dt, shape = specs[k]
            end = pos + dt.itemsize * math.prod(shape)
            head[k] = {"dtype": _DTYPES[dt], "shape": list(shape), "data_offsets": [pos, end]}
            self.offsets[k] = (pos, end)
            pos = end
        text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        self.header = struct.pack("<Q", len(text)) + text
        self.size = len(self.header) + pos


def _bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


# ---------------------------------------------------------------------------------------------------------
# the checkpoint
# ---------------------------------------------------------------------------------------------------------
def _stem_tensors(stream: Stream, float_dtype: torch.dtype, data: bool):
    """(name, tensor) outside the blocks as `compressor.checkpoint.save` stores them (embeddings at
    `float_dtype`, a tied weight once); meta tensors of the right dtype and shape when not `data`."""
    model = stream.model
    embeds = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    pre = stream.prefix + "."
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if name.startswith(pre):
            continue
        if id(t) in seen:
            continue
        seen.add(id(t))
        dt = float_dtype if name in embeds else t.dtype
        if not data:
            yield name, torch.empty(t.shape, dtype=dt, device="meta")
        elif t.is_meta:
            yield name, stream.reader.get(name, t.dtype).to(dt)
        else:
            yield name, t.detach().to(dt)


def _block_tensors(stream: Stream, b: int) -> Iterator[tuple[str, torch.Tensor]]:
    block = stream.load(b)
    try:
        yield from ((f"{stream.prefix}.{b}.{k}", v) for k, v in block.state_dict().items())
    finally:
        stream.free(b)


def write_checkpoint(stream: Stream, tokenizer, out_dir: str | Path, *, recipe: dict[str, Any],
                     layer_stats: dict[str, Any], source: dict[str, Any], overwrite: bool = False,
                     embed_dtype: torch.dtype = torch.float16, extra: dict[str, Any] | None = None,
                     progress: bool = True) -> Path:
    """The checkpoint `compressor.checkpoint.save` would write for the streamed model, one tensor at a time."""
    from tqdm.auto import tqdm

    from .checkpoint import (WEIGHTS, _check_reloadable, _meta_model, _plain_config, atomic_dir, module_specs,
                             write_description)
    from .nn.formats import build_module
    model, store = stream.model, stream.prev
    # The module types each block ended with, on the meta device: what compression.json records.
    for b, block in enumerate(stream.blocks):
        for name, spec in store.block_meta(b)["modules"].items():
            block.set_submodule(name, build_module(spec).to("meta"))
    plain = _meta_model(_plain_config(model))
    specs = module_specs(model, plain)
    layout_specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for name, t in _stem_tensors(stream, embed_dtype, data=False):
        layout_specs[name] = (t.dtype, tuple(t.shape))
    for b in range(len(stream.blocks)):
        for name, t in _block_tensors(stream, b):
            layout_specs[name] = (t.dtype, tuple(t.shape))
    _check_reloadable(model, {k: torch.empty(s, dtype=d, device="meta") for k, (d, s) in layout_specs.items()},
                      specs, plain)
    layout = SafetensorsLayout(layout_specs, {"format": "pt"})
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        fd = os.open(tmp / WEIGHTS, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.pwrite(fd, layout.header, 0)
            base = len(layout.header)

            def put(name: str, t: torch.Tensor) -> None:
                lo, hi = layout.offsets[name]
                buf = _bytes(t)
                if len(buf) != hi - lo:
                    raise RuntimeError(f"{name}: {len(buf)} bytes where the layout has {hi - lo}")
                os.pwrite(fd, buf, base + lo)

            for name, t in _stem_tensors(stream, embed_dtype, data=True):
                put(name, t)
                del t
            for b in tqdm(range(len(stream.blocks)), desc="write", unit="block", disable=not progress):
                for name, t in _block_tensors(stream, b):
                    put(name, t)
            os.ftruncate(fd, layout.size)
        finally:
            os.close(fd)
        write_description(tmp, model.config, specs, stream.prefix, tokenizer, recipe=recipe,
                          layer_stats=layer_stats, source=source, extra=extra)
    return Path(out_dir)
