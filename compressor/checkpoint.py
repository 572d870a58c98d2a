"""Compressed checkpoints: write atomically, describe themselves, reload on the meta device.

A checkpoint directory holds
  * ``model.safetensors``: packed GPTQ tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``)
    for quantized Linears, fp16 for the (tied) embedding, fp32 for the small remaining tensors;
  * ``config.json``: the HF config plus ``quantization_config`` (``quant_method: gptq``, bits,
    group_size, desc_act, sym), so GPTQ-aware loaders in transformers, optimum and vLLM read it;
  * ``compression.json``: format version, resolved recipe, library versions, hash of the input
    weights, and for every compressed module its type and parameters (``modules``) plus per-layer
    statistics (``layers``). ``modules`` is what `load` rebuilds from; new module types (sparse,
    low-rank, NF4) add an entry in `MODULE_TYPES` and nothing else changes.
  * the tokenizer files.

A recipe that ends with ``lora: {save: adapter}`` gives an *adapter directory* instead
(`save_adapter`): peft's ``adapter_config.json`` and ``adapter_model.safetensors`` (load with
``PeftModel.from_pretrained(base, path)``), ``compression.json`` with ``artifact: peft-adapter``,
the recipe, the hash of the source weights and the training loss curve, and the tokenizer. The
base is not stored: `load` re-makes it from the source model and the recipe's passes before lora.

`save` writes to a temporary directory beside the destination and renames it into place, so a
crash or Ctrl-C never leaves a half-written checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from .nn.qlinear import QuantLinear

__all__ = ["FORMAT_VERSION", "MODULE_TYPES", "save", "save_adapter", "load", "atomic_dir", "versions",
           "CheckpointError"]

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "compression.json"
ADAPTER = "peft-adapter"


class CheckpointError(ValueError):
    """A compressed checkpoint that cannot be read."""


def _gptq_module(spec: dict[str, Any]) -> nn.Module:
    return QuantLinear(spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"],
                       bias=spec.get("bias", False))


MODULE_TYPES: dict[str, Callable[[dict[str, Any]], nn.Module]] = {"gptq": _gptq_module}


def versions() -> dict[str, str]:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for pkg in ("compressor", "torch", "transformers", "safetensors", "peft", "bitsandbytes"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


@contextlib.contextmanager
def atomic_dir(dest: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `dest`; rename it to `dest` only if the block completes.

    An existing `dest` is refused unless `overwrite`; then it is replaced only after the new one is
    complete (moved aside, new renamed in, old removed).
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"output {str(dest)!r} already exists; pass --overwrite to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        old = None
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{os.getpid()}"
            dest.rename(old)
        tmp.rename(dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _quantization_config(specs: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    gptq = [s for s in specs.values() if s["type"] == "gptq"]
    if not gptq:
        return None
    s = gptq[0]
    return {"quant_method": "gptq", "bits": s["bits"], "group_size": s["group_size"],
            "desc_act": any(x.get("desc_act", False) for x in gptq), "sym": s["sym"],
            "checkpoint_format": "gptq", "true_sequential": True, "damp_percent": 0.01}


def _storage_state_dict(model: nn.Module, float_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """State dict to write: tied duplicates dropped; embeddings rounded to `float_dtype` in place.

    Rounding happens in place so that the in-memory model is exactly what a reload gives back.
    """
    for mod in model.modules():
        if isinstance(mod, nn.Embedding) and mod.weight.dtype != float_dtype:
            mod.weight.data = mod.weight.data.to(float_dtype).to(mod.weight.dtype)
    embeds = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    seen: set[tuple] = set()
    out = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if key in seen:              # tied weight (lm_head = embedding): stored once, re-tied on load
            continue
        seen.add(key)
        out[name] = (t.to(float_dtype) if name in embeds else t).contiguous()
    return out


def save(model: nn.Module, tokenizer, out_dir: str | Path, *, recipe: dict[str, Any], module_specs: dict[str, Any],
         layer_stats: dict[str, Any], source: dict[str, Any], overwrite: bool = False,
         embed_dtype: torch.dtype = torch.float16, extra: dict[str, Any] | None = None) -> Path:
    """Write a compressed checkpoint atomically to `out_dir`."""
    from safetensors.torch import save_file

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        sd = _storage_state_dict(model, embed_dtype)
        save_file(sd, str(tmp / WEIGHTS), metadata={"format": "pt", "producer": "compressor"})
        cfg = model.config.to_dict()
        qc = _quantization_config(module_specs)
        if qc:
            cfg["quantization_config"] = qc
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = {"format_version": FORMAT_VERSION, "recipe": recipe, "source": source, "versions": versions(),
                "modules": module_specs, "layers": layer_stats, **(extra or {})}
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
    return Path(out_dir)


def save_adapter(model: nn.Module, tokenizer, out_dir: str | Path, *, recipe: dict[str, Any],
                 source: dict[str, Any], overwrite: bool = False, extra: dict[str, Any] | None = None) -> Path:
    """Write a peft model's adapter (peft's own format), compression.json and the tokenizer atomically."""
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)                 # adapter_config.json, adapter_model.safetensors
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        meta = {"format_version": FORMAT_VERSION, "artifact": ADAPTER, "recipe": recipe, "source": source,
                "versions": versions(), **(extra or {})}
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
    return Path(out_dir)


def _load_adapter(path: Path, meta: dict[str, Any], base: str | Path | None, dtype: torch.dtype) -> nn.Module:
    """The source model, put through the recipe's passes before lora, with the adapter on top."""
    import logging

    from .passes.nf4 import import_bnb
    import_bnb()                                            # before peft imports it, quietly
    from peft import PeftModel

    from .api import compress_
    from .models import load_hf, resolve, weights_hash
    from .passes import Context
    from .recipe import Recipe

    src_meta = meta.get("source", {})
    if base is None:
        base = src_meta.get("path") if Path(str(src_meta.get("path", ""))).is_dir() else src_meta.get("spec")
    if base is None:
        raise CheckpointError(f"{path}: adapter without a recorded source model; pass base=")
    src = resolve(base)
    if src_meta.get("sha256") and weights_hash(src) != src_meta["sha256"]:
        logging.getLogger("compressor").warning("%s: base %s differs from the weights the adapter was trained on",
                                                path, src)
    model, _ = load_hf(src, dtype=dtype)
    recipe = meta["recipe"]
    before = [p for p in recipe["passes"][:-1]]
    if before:
        model = compress_(model, Recipe.from_dict({**recipe, "passes": before}), Context(progress=False))
    with warnings.catch_warnings():                         # transformers' deprecation notes, via peft
        warnings.simplefilter("ignore", FutureWarning)
        return PeftModel.from_pretrained(model, str(path)).eval()


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / META).is_file()


def load(path: str | Path, dtype: torch.dtype = torch.float32, with_tokenizer: bool = False,
         base: str | Path | None = None):
    """Rebuild a compressed model: skeleton with empty parameters, swap modules, load with assign=True.

    Needs neither GPTQModel nor auto-gptq. Returns the model (and the tokenizer if asked).
    An adapter directory comes back as a peft model on its base, re-made from `base` (default: the
    source recorded in compression.json) by the recipe's passes before lora.
    """
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from .models import ModelError, check_safetensors

    path = Path(path)
    if not is_checkpoint(path):
        raise CheckpointError(f"{str(path)!r} is not a compressed checkpoint (no {META}); "
                              f"for an uncompressed model use compressor.models.resolve")
    try:
        meta = json.loads((path / META).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / META}: corrupt JSON ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta.get('format_version')!r}, this compressor reads {FORMAT_VERSION}")
    if meta.get("artifact") == ADAPTER:
        model = _load_adapter(path, meta, base, dtype)
        return (model, AutoTokenizer.from_pretrained(path)) if with_tokenizer else model
    wfile = path / WEIGHTS
    if not wfile.is_file():
        raise CheckpointError(f"{path}: missing {WEIGHTS}")
    check_safetensors(wfile)

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config       # ours to handle; keeps transformers' GPTQ quantizer out
    auto = AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in (config.architectures or [])) else AutoModel
    with init_empty_weights(include_buffers=False):  # params on meta; rotary buffers computed for real
        model = auto.from_config(config, dtype=dtype)
    for name, spec in meta["modules"].items():
        if spec["type"] not in MODULE_TYPES:
            raise CheckpointError(f"{path}: module {name} has unknown type {spec['type']!r}; known: {list(MODULE_TYPES)}")
        model.set_submodule(name, MODULE_TYPES[spec["type"]](spec))
    try:
        sd = load_file(str(wfile))
    except Exception as e:
        raise ModelError(f"{wfile}: cannot read safetensors ({e})") from None
    expected = model.state_dict()
    for k, t in sd.items():
        if k in expected and t.is_floating_point() and expected[k].is_floating_point():
            sd[k] = t.to(dtype)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if unexpected or still_meta:
        raise CheckpointError(f"{path}: weights do not match the model: missing {still_meta[:3]}, "
                              f"unexpected {unexpected[:3]}")
    model.eval()
    if with_tokenizer:
        return model, AutoTokenizer.from_pretrained(path)
    return model
