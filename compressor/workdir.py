"""``OUT.work/``: the progress of an interrupted `compress`, committed atomically, and how `--resume` reads it.

    OUT.work/
      fingerprint.json            what must match for --resume (`fingerprint`, `check_fingerprint`)
      pass-00-gptq/               progress of recipe pass 0, one loop of `compressor.layerwise` ("loop-0")
        loop-0/block-0000/        a finished decoder block: its modules' specs and tensors, its layer stats
        loop-0/inputs-0000/       the next block's inputs (and the float stream's), only the latest is kept
      pass-00.done/               the model after pass 0, whole, and the context the later passes read
      lora-state.pt               a training pass's own state (`compressor.train`)

Every entry is a directory written under a temporary name and renamed into place, with a ``meta.json``
holding the sha256 of each tensor file: a kill leaves either the entry, complete, or nothing. A file whose
hash does not match is refused by name (`WorkDirError`), never silently recomputed.

What is committed is what the rest of the run reads: module specs (`compressor.nn.formats`), tensors in their
own dtype (so a resumed run computes on the very same numbers), and `Context` fields. Timings are not state:
a resumed run's ``seconds`` are those its commits recorded.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import InputError

__all__ = ["WorkDirError", "fingerprint", "write_fingerprint", "check_fingerprint", "save_modules",
           "restore_modules", "committable", "commit", "read_commit", "LoopStore", "pass_dir", "done_dir", "has_progress"]

FINGERPRINT = "fingerprint.json"
TENSORS = "tensors.safetensors"
META = "meta.json"
_RNG = "__generator_state__"


class WorkDirError(InputError):
    """A work directory that cannot be resumed: a different run's, or a damaged one."""


# --- fingerprint -------------------------------------------------------------------------------------
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha_file(path: Path) -> str:
    """sha256 of a file, read in 16 MiB pieces (never the whole file in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(*, source_sha256: str, recipe: dict[str, Any], calibration: torch.Tensor | None,
                calib_data: str | None, train_data: str | None, stream: bool = False) -> dict[str, Any]:
    """What a resumed run must share with the one that wrote the work directory."""
    from .checkpoint import versions
    files = {}
    for key, f in (("calib_file", calib_data), ("train_file", train_data)):
        if f is not None:
            files[key] = _sha_file(Path(f))
    return {"source_weights": source_sha256,
            "recipe": _sha(json.dumps(recipe, sort_keys=True, default=str).encode()),
            "calibration": None if calibration is None else _sha(calibration.numpy().tobytes()),
            **files,
            "versions": versions(),
            "threads": torch.get_num_threads(),
            **({"stream": True} if stream else {}),
            "python": platform.python_version()}


def write_fingerprint(work: Path, fp: dict[str, Any]) -> None:
    work.mkdir(parents=True, exist_ok=True)
    tmp = work / f".{FINGERPRINT}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(fp, indent=2, sort_keys=True))
    tmp.replace(work / FINGERPRINT)


def check_fingerprint(work: Path, fp: dict[str, Any]) -> None:
    """Refuse to resume `work` when its fingerprint differs from `fp`, listing every field that differs."""
    path = work / FINGERPRINT
    try:
        old = json.loads(path.read_text())
    except FileNotFoundError:
        raise WorkDirError(f"{path}: --resume found no fingerprint, so nothing it could safely continue; "
                           f"run with --overwrite to start over") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WorkDirError(f"{path}: unreadable ({e}); run with --overwrite to start over") from None
    if not isinstance(old, dict):
        raise WorkDirError(f"{path}: not a JSON object; run with --overwrite to start over")
    differ = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
    if differ:
        shown = "; ".join(f"{k}: {_short(old.get(k))} then, {_short(fp.get(k))} now" for k in differ)
        raise WorkDirError(f"--resume refused: {work} was written by a different run ({shown}). Rerun it as it "
                           f"was, or pass --overwrite to start over")


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= 80 else s[:77] + "..."


# --- atomic entries -----------------------------------------------------------------------------------
def commit(dest: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write `tensors` (safetensors) and `meta` (JSON, plus the tensors' sha256) as directory `dest`, atomically
    (`compressor.checkpoint.atomic_dir`). An existing `dest` is replaced (a rerun of a step writes the same)."""
    from safetensors.torch import save_file
    from .checkpoint import atomic_dir
    with atomic_dir(dest, overwrite=True) as tmp:
        save_file(_unshared(tensors), str(tmp / TENSORS), metadata={"format": "pt"})
        meta = {**meta, "sha256": _sha_file(tmp / TENSORS)}
        (tmp / META).write_text(json.dumps(meta, indent=1, default=str))


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, none sharing storage with another (safetensors refuses views of one buffer)."""
    out, storages = {}, set()
    for k, t in tensors.items():
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in storages:
            t = t.clone()
        storages.add(ptr)
        out[k] = t
    return out


def read_commit(src: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of a `commit`; WorkDirError naming the file when it is damaged."""
    from safetensors.torch import load
    try:
        meta = json.loads((src / META).read_text())
        data = (src / TENSORS).read_bytes()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WorkDirError(f"{src}: damaged commit ({e}); run with --overwrite to start over") from None
    if not isinstance(meta, dict) or meta.get("sha256") != _sha(data):
        raise WorkDirError(f"{src / TENSORS}: its sha256 does not match {src / META}; the work directory was "
                           f"changed after it was written: run with --overwrite to start over")
    return load(data), meta


# --- modules ------------------------------------------------------------------------------------------
def _tensors(module: nn.Module):
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def save_modules(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, specs) that `restore_modules` turns back into `module`: every submodule with a format
    recorded by spec, and every parameter and buffer as it is in memory, not in its checkpoint form (a
    SparseLinear trains in fp32 but saves fp16): the rest of the run computes on the very same numbers.
    A tensor reachable under two names (a tied head) is stored once."""
    from .nn.formats import format_of, module_spec
    specs = {n: module_spec(m) for n, m in module.named_modules() if n and format_of(m) is not None}
    seen: dict[int, str] = {}
    tensors, ties = {}, {}
    for name, t in _tensors(module):
        if id(t) in seen:
            ties[name] = seen[id(t)]
            continue
        seen[id(t)] = name
        tensors[name] = t.detach().cpu()
    return tensors, {"modules": specs, "ties": ties}


@torch.no_grad()
def restore_modules(module: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Make `module` what `save_modules` saw: swap in each recorded module type, then put every committed
    tensor in place (copied into a tensor of the same shape and dtype, else set as it is), ties as ties."""
    from .nn.formats import build_module
    for name, spec in meta["modules"].items():
        if not _same_spec(module.get_submodule(name), spec):
            module.set_submodule(name, build_module(spec))
    placed: dict[str, torch.Tensor] = {}
    ties = meta.get("ties", {})
    for name in [*tensors, *ties]:
        owner, _, leaf = name.rpartition(".")
        try:
            mod = module.get_submodule(owner)
        except AttributeError:
            raise WorkDirError(f"the committed state names {name}, which the model does not have; run with "
                               f"--overwrite to start over") from None
        slots = mod._parameters if leaf in mod._parameters else mod._buffers if leaf in mod._buffers else None
        if slots is None:
            raise WorkDirError(f"the committed state names {name}, which the model does not have; run with "
                               f"--overwrite to start over")
        if name in ties:
            slots[leaf] = placed[ties[name]]
            continue
        t, old = tensors[name], slots[leaf]
        if old is not None and not old.is_meta and old.shape == t.shape and old.dtype == t.dtype:
            old.copy_(t)
        elif slots is mod._parameters:
            old = nn.Parameter(t.to(_device(old)), requires_grad=old.requires_grad if old is not None else False)
            slots[leaf] = old
        else:
            old = slots[leaf] = t.to(_device(old))
        placed[name] = old
    if meta.get("partial"):          # a streamed commit: the stem's changed modules only, the rest is meta
        return
    missing = [n for n, t in _tensors(module) if n not in placed and n not in ties or t.is_meta]
    if missing:
        raise WorkDirError(f"the committed state does not fit the model: it lacks {missing[:3]}; run with "
                           f"--overwrite to start over")


def _device(t: torch.Tensor | None) -> torch.device:
    return torch.device("cpu") if t is None or t.is_meta else t.device


def committable(module: nn.Module, known: set[type]) -> bool:
    """Whether `save_modules` can describe `module`: every submodule is of a registered format or of a
    type in `known` (the model's own classes, which a fresh load rebuilds)."""
    from .nn.formats import format_of
    return all(format_of(m) is not None or type(m) in known for m in module.modules())


def _same_spec(module: nn.Module, spec: dict[str, Any]) -> bool:
    from .nn.formats import format_of, module_spec
    return format_of(module) is not None and module_spec(module) == spec


# --- layout -------------------------------------------------------------------------------------------
def pass_dir(work: Path, index: int, name: str) -> Path:
    return work / f"pass-{index:02d}-{name}"


def done_dir(work: Path, index: int) -> Path:
    return work / f"pass-{index:02d}.done"


def has_progress(work: Path) -> bool:
    """Whether `work` holds anything --resume could continue from (a fingerprint alone is not progress)."""
    return work.is_dir() and any(p.name != FINGERPRINT and not p.name.startswith(".") for p in work.iterdir())


class LoopStore:
    """The commits of one `compressor.layerwise` loop: finished blocks and the latest inputs."""

    def __init__(self, root: Path):
        self.root = root

    def blocks_done(self, inputs: bool = True) -> int:
        """How many leading blocks are committed, with the inputs of the next one (if `inputs`: a calibrated
        loop; a data-free sweep has none)."""
        n = 0
        while (self.root / f"block-{n:04d}").is_dir():
            n += 1
        while inputs and n and not (self.root / f"inputs-{n - 1:04d}").is_dir():
            n -= 1                      # a block whose inputs did not land is redone
        return n

    def commit_block(self, b: int, block: nn.Module, stats: dict[str, Any], hidden: list[torch.Tensor] | None,
                     ref_hidden: list[torch.Tensor] | None, rng: torch.Tensor | None = None) -> None:
        """Block `b` finished: its state (and the loop's generator state), then the next block's inputs;
        older inputs are dropped after."""
        tensors, meta = save_modules(block)
        if rng is not None:
            tensors[_RNG] = rng
        commit(self.root / f"block-{b:04d}", tensors, {**meta, "layer_stats": stats})
        if hidden is None:
            return
        inputs = {f"hidden.{i}": h for i, h in enumerate(hidden)}
        if ref_hidden is not None:
            inputs.update({f"reference.{i}": h for i, h in enumerate(ref_hidden)})
        commit(self.root / f"inputs-{b:04d}", inputs, {"batches": len(hidden),
                                                         "reference": None if ref_hidden is None else len(ref_hidden)})
        old = self.root / f"inputs-{b - 1:04d}"
        if b and old.exists():
            shutil.rmtree(old, ignore_errors=True)

    def restore_block(self, b: int, block: nn.Module) -> tuple[dict[str, Any], torch.Tensor | None]:
        """Block `b` as committed; (its layer stats, the generator state after it or None)."""
        tensors, meta = read_commit(self.root / f"block-{b:04d}")
        rng = tensors.pop(_RNG, None)
        restore_modules(block, tensors, meta)
        return meta.get("layer_stats", {}), rng

    def block_meta(self, b: int) -> dict[str, Any]:
        """The meta.json committed with block `b` (module specs, layer stats); its tensors are not read."""
        try:
            meta = json.loads((self.root / f"block-{b:04d}" / META).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WorkDirError(f"{self.root / f'block-{b:04d}'}: damaged commit ({e}); run with --overwrite to "
                               f"start over") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("modules", {}), dict):
            raise WorkDirError(f"{self.root / f'block-{b:04d}' / META}: not a commit's meta; run with --overwrite "
                               f"to start over")
        return meta

    def block_stats(self, b: int) -> dict[str, Any]:
        """The layer stats committed with block `b` (its tensors are not read)."""
        return self.block_meta(b).get("layer_stats", {})

    def block_rng(self, b: int) -> torch.Tensor | None:
        """The loop's generator state committed with block `b`, or None."""
        from safetensors import safe_open
        with safe_open(str(self.root / f"block-{b:04d}" / TENSORS), framework="pt") as f:
            return f.get_tensor(_RNG) if _RNG in f.keys() else None

    def inputs(self, b: int) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        tensors, meta = read_commit(self.root / f"inputs-{b:04d}")
        hidden = [tensors[f"hidden.{i}"] for i in range(meta["batches"])]
        ref = None if meta.get("reference") is None else [tensors[f"reference.{i}"] for i in range(meta["reference"])]
        return hidden, ref
