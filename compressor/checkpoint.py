"""Compressed checkpoints: write atomically, describe themselves, reload on the meta device.

A checkpoint directory holds
  * ``model.safetensors``: packed GPTQ tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``)
    for quantized Linears, fp16 for the (tied) embedding, fp32 for the small remaining tensors;
  * ``config.json``: the HF config plus ``quantization_config`` (``quant_method: gptq``, bits,
    group_size, desc_act, sym). Symmetric checkpoints load as they are in GPTQModel and in
    transformers through it (tests/export/test_engines.py); GPTQModel refuses asymmetric v1
    checkpoints it did not write, so those go through `compressor.export` (gptq-v2, compressed-tensors, gguf);
  * ``compression.json``: format version, resolved recipe, library versions, hash of the input
    weights, per-layer statistics (``layers``), and ``modules``: for every module of a registered
    type (`compressor.nn.formats`: ``gptq`` for `QuantLinear`, ...) its spec as the module writes
    it, and for every float Linear whose shape differs from what the model's config builds (a
    pruned MLP, a low-rank factor) a ``linear`` spec with its shape. ``modules`` is what `load`
    rebuilds from, so any model the passes produced reloads; a new module type registers itself
    and nothing here changes. Before anything is written, `save` builds the skeleton `load` will
    build and refuses a model whose tensors it would not match (an unregistered module type).
  * the tokenizer files.

Mixed models (some layers 4-bit, some 8-bit) are allowed: ``quantization_config`` then carries the
most common layer settings plus GPTQModel's per-module ``dynamic`` overrides (``"+:^name$"``), and
float Linears inside the quantized blocks a ``"-:^name$"`` entry.

A recipe that ends with ``lora: {save: adapter}`` gives an *adapter directory* instead
(`save_adapter`): peft's ``adapter_config.json`` and ``adapter_model.safetensors`` (load with
``PeftModel.from_pretrained(base, path)``), ``compression.json`` with ``artifact: peft-adapter``,
the recipe, the hash of the source weights and the training loss curve, and the tokenizer. The
base is not stored: `load` re-makes it from the source model and the recipe's passes before lora.

`save` writes to a temporary directory beside the destination and renames it into place, so a
crash or Ctrl-C never leaves a half-written checkpoint.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import glob
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from .files import ADAPTER, FORMAT_VERSION, META, WEIGHTS, CheckpointError, is_checkpoint  # noqa: F401
from .machine import versions as _versions
from .nn.formats import MODULE_TYPES, build_module, format_of, format_of_class, module_spec
from .nn.qembedding import tie_quant_embeddings_

__all__ = ["FORMAT_VERSION", "MODULE_TYPES", "save", "save_adapter", "load", "atomic_dir", "versions",
           "CheckpointError", "module_specs"]

def versions() -> dict[str, str]:
    """The library versions recorded in compression.json."""
    return _versions(("compressor", "torch", "transformers", "safetensors", "peft", "bitsandbytes"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _trace(event: str, path: Path) -> None:
    """With ``COMPRESSOR_TRACE_WRITES=FILE``, append ``event path time`` to FILE, unbuffered: how
    benchmarks/soak_kill.py knows whether a kill landed inside a write."""
    trace = os.environ.get("COMPRESSOR_TRACE_WRITES")
    if trace:
        fd = os.open(trace, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{event} {path} {time.time():.6f}\n".encode())
        finally:
            os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep(dest: Path) -> None:
    """Remove what a killed process left beside `dest`: ``.NAME.tmp-PID-*`` and ``.NAME.old-PID`` of dead PIDs.
    (An ``.old`` directory is only ever a complete previous `dest` being replaced; if `dest` itself is
    missing, the kill landed between the two renames and the old one is put back.)"""
    for p in dest.parent.glob(f".{glob.escape(dest.name)}.*-*"):
        kind, _, rest = p.name[len(dest.name) + 2:].partition("-")
        pid = rest.split("-", 1)[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not dest.exists():
            p.rename(dest)
        else:
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(dest: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `dest`; rename it to `dest` only if the block completes.

    An existing `dest` is refused unless `overwrite`; then it is replaced only after the new one is
    complete (moved aside, new renamed in, old removed). A kill at any moment leaves `dest` as it was or
    complete; what it leaves beside `dest` is swept by the next write to `dest`.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _sweep(dest)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"output {str(dest)!r} already exists; pass --overwrite to replace it")
    _trace("begin", dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())            # mkdtemp makes it 0700; the output gets a normal directory's mode
    try:
        yield tmp
        old = None
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{os.getpid()}"
            dest.rename(old)
        tmp.rename(dest)
        _trace("end", dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _meta_model(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model `config` describes, parameters on the meta device (rotary buffers computed for real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in (config.architectures or [])) else AutoModel
    with init_empty_weights(include_buffers=False):
        return auto.from_config(config, dtype=dtype)


def _skeleton(config, specs: dict[str, dict[str, Any]], dtype: torch.dtype,
              model: nn.Module | None = None) -> nn.Module:
    """`_meta_model` (or `model`, one already built) with every recorded module swapped in: what `load` fills."""
    model = _meta_model(config, dtype) if model is None else model
    for name, spec in specs.items():
        if spec["type"] not in MODULE_TYPES:
            raise CheckpointError(f"module {name} has unknown type {spec['type']!r}; known: {sorted(MODULE_TYPES)}")
        model.set_submodule(name, build_module(spec))
    return model


def _plain_config(model: nn.Module):
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config       # ours to handle; keeps transformers' quantizers out
    return config


def module_specs(model: nn.Module, plain: nn.Module | None = None) -> dict[str, dict[str, Any]]:
    """What compression.json's ``modules`` records for `model` (see the module docstring); `plain` is
    the meta model its config builds, if the caller has one."""
    plain = dict((plain if plain is not None else _meta_model(_plain_config(model))).named_modules())
    out = {}
    for name, mod in model.named_modules():
        fmt = format_of(mod)
        if fmt is None:
            continue
        spec = module_spec(mod)
        if fmt.cls is nn.Linear:              # a float Linear: recorded only where its shape changed
            ref = plain.get(name)
            if type(ref) is nn.Linear and module_spec(ref) == spec:
                continue
        out[name] = spec
    return out


def _quantization_config(specs: dict[str, dict[str, Any]], blocks: str | None) -> dict[str, Any] | None:
    """GPTQ ``quantization_config``: uniform models as every GPTQ loader reads them; mixed ones with
    GPTQModel's ``dynamic`` overrides for the layers that differ from the most common settings."""
    gptq = {n: s for n, s in specs.items() if s["type"] == "gptq"}
    if not gptq:
        return None
    keys = ("bits", "group_size", "sym", "desc_act")
    settings = {n: tuple(s.get(k, False) for k in keys) for n, s in gptq.items()}
    common = collections.Counter(settings.values()).most_common(1)[0][0]
    bits, group_size, sym, desc_act = common
    qc = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
          "desc_act": any(x.get("desc_act", False) for x in gptq.values()), "sym": sym,
          "checkpoint_format": "gptq", "true_sequential": True, "damp_percent": 0.01}
    dynamic = {f"+:^{re.escape(n)}$": dict(zip(keys, v)) for n, v in settings.items() if v != common}
    if blocks is not None:
        dynamic.update({f"-:^{re.escape(n)}$": {} for n, s in specs.items()
                        if s["type"] == "linear" and n.startswith(blocks + ".")})
    if dynamic:
        qc["desc_act"] = desc_act
        qc["dynamic"] = dynamic
    return qc


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


def _check_reloadable(model: nn.Module, sd: dict[str, torch.Tensor], specs: dict[str, Any], plain: nn.Module) -> None:
    """Refuse to write what `load` would not rebuild: names and shapes must match its skeleton
    (`plain`, the meta model of the config, is consumed)."""
    skel = _skeleton(None, specs, torch.float32, model=plain)
    skel.tie_weights()
    want = skel.state_dict()
    bad = [k for k, t in sd.items() if k not in want or tuple(want[k].shape) != tuple(t.shape)]
    if bad:
        k = bad[0]
        shown = f"{k} {tuple(sd[k].shape)}" + (f" (load builds {tuple(want[k].shape)})" if k in want else
                                               " (unknown to load)")
        mods = dict(model.named_modules())
        owners = set()
        for b in bad:                         # the module a tensor belongs to: its longest module prefix
            parts = b.split(".")
            owners.add(next((type(mods[".".join(parts[:i])]) for i in range(len(parts) - 1, 0, -1)
                             if ".".join(parts[:i]) in mods), nn.Linear))
        kinds = sorted(c.__name__ for c in owners if c is not nn.Linear and format_of_class(c) is None)
        hint = (f"; modules of type {', '.join(kinds[:3])} have no checkpoint format (compressor.nn.formats)"
                if kinds else "")
        raise CheckpointError(f"cannot save this model: compressor.load would not rebuild {len(bad)} tensors, "
                              f"e.g. {shown}{hint}")


def save(model: nn.Module, tokenizer, out_dir: str | Path, *, recipe: dict[str, Any], layer_stats: dict[str, Any],
         source: dict[str, Any], overwrite: bool = False, embed_dtype: torch.dtype = torch.float16,
         extra: dict[str, Any] | None = None) -> Path:
    """Write a compressed checkpoint atomically to `out_dir` (see the module docstring)."""
    from safetensors.torch import save_file

    from .sequential import find_blocks

    plain = _meta_model(_plain_config(model))   # built once: the specs compare against it, then the check fills it
    specs = module_specs(model, plain)
    sd = _storage_state_dict(model, embed_dtype)
    _check_reloadable(model, sd, specs, plain)
    try:
        blocks = find_blocks(model)[0]
    except ValueError:
        blocks = None
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        # One metadata key: safetensors writes metadata from a hash map, so several keys come out in
        # a different order from run to run and the file bytes would differ.
        save_file(sd, str(tmp / WEIGHTS), metadata={"format": "pt"})
        write_description(tmp, model.config, specs, blocks, tokenizer, recipe=recipe, layer_stats=layer_stats,
                          source=source, extra=extra)
    return Path(out_dir)


def write_description(tmp: Path, config, specs: dict[str, dict[str, Any]], blocks: str | None, tokenizer, *,
                      recipe: dict[str, Any], layer_stats: dict[str, Any], source: dict[str, Any],
                      extra: dict[str, Any] | None) -> None:
    """Everything of a checkpoint but its weights: config.json (with ``quantization_config``), the tokenizer
    and compression.json (`save`, and `compressor.stream.write_checkpoint`)."""
    cfg = config.to_dict()
    if any(s["type"] == "gptq-tied-embedding" for s in specs.values()):
        cfg["tie_word_embeddings"] = False      # the tie is the embedding's spec: transformers must not tie floats
    qc = _quantization_config(specs, blocks)
    if qc:
        cfg["quantization_config"] = qc
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    meta = {"format_version": FORMAT_VERSION, "recipe": recipe, "source": source, "versions": versions(),
            "producer": "compressor", "modules": specs, "layers": layer_stats, **(extra or {})}
    (tmp / META).write_text(json.dumps(meta, indent=2, default=str))


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


def load(path: str | Path, dtype: torch.dtype = torch.float32, with_tokenizer: bool = False,
         base: str | Path | None = None, for_inference: bool = True):
    """Rebuild a compressed model: skeleton with empty parameters, swap modules, load with assign=True.

    `for_inference` (default): ready it for fast inference with `compressor.nn.prepare_` (kernels
    repacked now, the fp16 head read as fp16, and ``generate`` on the fast decoder where the model
    allows). ``for_inference=False`` gives the model exactly as saved, e.g. to train or re-save it.

    Needs neither GPTQModel nor auto-gptq. Returns the model (and the tokenizer if asked).
    An adapter directory comes back as a peft model on its base, re-made from `base` (default: the
    source recorded in compression.json) by the recipe's passes before lora.
    """
    from transformers import AutoTokenizer

    from .errors import read_json
    from .models import read_config, read_safetensors

    path = Path(path)
    if not is_checkpoint(path):
        raise CheckpointError(f"{str(path)!r} is not a compressed checkpoint (no {META}); "
                              f"for an uncompressed model use compressor.models.resolve")
    meta = read_json(path / META, CheckpointError, META)
    if meta.get("artifact") == "onnx-export":
        raise CheckpointError(f"{path} is an ONNX export, run by ONNX Runtime (compress-bench --engine ort {path}, or "
                              f"optimum's ORTModelForCausalLM); compressor.load reads the checkpoint it came from")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta.get('format_version')!r}, this compressor reads {FORMAT_VERSION}")
    if meta.get("artifact") == ADAPTER:
        model = _load_adapter(path, meta, base, dtype)
        return (model, AutoTokenizer.from_pretrained(path)) if with_tokenizer else model
    specs = meta.get("modules", {})
    if not (isinstance(specs, dict) and all(isinstance(v, dict) and isinstance(v.get("type"), str)
                                            for v in specs.values())):
        raise CheckpointError(f"{path / META}: 'modules' must map module names to specs with a 'type'; the file "
                              f"is corrupt")
    wfile = path / WEIGHTS
    if not wfile.is_file():
        raise CheckpointError(f"{path}: missing {WEIGHTS}")
    sd = read_safetensors(wfile)
    config = read_config(path, CheckpointError)
    if hasattr(config, "quantization_config"):
        del config.quantization_config       # ours to handle; keeps transformers' GPTQ quantizer out
    try:
        model = _skeleton(config, specs, dtype)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ArithmeticError, RuntimeError) as e:
        raise CheckpointError(f"{path}: config.json and {META} do not describe a model that can be built "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    expected = model.state_dict()
    half_embed = _half_embedding_key(model) if for_inference and dtype == torch.float32 else None
    for k, t in sd.items():
        if k == half_embed and t.dtype == torch.float16:
            continue                 # kept in fp16: prepare_ runs the tied head and embedding on it (HalfLinear)
        if k in expected and t.is_floating_point() and expected[k].is_floating_point():
            sd[k] = t.to(dtype)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
        model.tie_weights()
        tie_quant_embeddings_(model)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except RuntimeError as e:
        raise CheckpointError(f"{path}: {WEIGHTS} does not match the model config.json and {META} describe "
                              f"({str(e).splitlines()[1].strip()[:200] if len(str(e).splitlines()) > 1 else e})") from None
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if unexpected or still_meta:
        raise CheckpointError(f"{path}: weights do not match the model: missing {still_meta[:3]}, "
                              f"unexpected {unexpected[:3]}")
    model.eval().requires_grad_(False)       # for inference; a trainer turns on what it trains
    if for_inference and dtype == torch.float32:
        from .machine import release_memory
        from .nn import prepare_
        sd.clear()                   # the model holds the tensors now; released layers must free theirs
        _own_(model, keep_codes=True)          # before prepare_: the fast decoder takes these tensors as they are
        prepare_(model, release=True)
        _own_(model, keep_codes=False)         # codes of layers with no kernel layout (still read as they are)
        release_memory()
    _report_kernels(model, path)
    if with_tokenizer:
        return model, AutoTokenizer.from_pretrained(path)
    return model


def _own_(model: nn.Module, keep_codes: bool) -> None:
    """Give every parameter and buffer that still views the checkpoint file (safetensors maps it) memory of
    its own. One small tensor left on the mapping (a norm weight) keeps the whole file resident: ~84 MB of
    RSS on SmolLM2-135M, as much again as the packed weights. `keep_codes`: leave the GPTQ buffers of
    `QuantLinear` layers, which `prepare_` repacks and then drops, where they are."""
    from .nn import QuantLinear
    for mod in model.modules():
        codes = ("qweight", "qzeros", "scales", "g_idx") if keep_codes and isinstance(mod, QuantLinear) else ()
        for name, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is None or name in codes or t.device.type != "cpu" or t.numel() == 0 or not _borrowed(t):
                continue
            if name in mod._parameters:
                t.data = t.data.clone()
            else:
                mod._buffers[name] = t.clone()


def _borrowed(t: torch.Tensor) -> bool:
    """Whether `t`'s memory is not the allocator's own: a file mapping (safetensors loads lazily) or another
    library's buffer; torch cannot resize such storage."""
    return not t.untyped_storage().resizable()


def _half_embedding_key(model: nn.Module) -> str | None:
    """The state-dict key of a float input embedding tied to the output head, which `load` may leave in
    fp16 for inference (the fp16 kernels run the head on it), or None."""
    from . import kernels
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    cfg = getattr(model, "config", None)
    if kernels.extension is None or type(emb) is not nn.Embedding or not getattr(cfg, "tie_word_embeddings", False):
        return None
    return next((f"{n}.weight" for n, m in model.named_modules() if m is emb), None)


def _report_kernels(model: nn.Module, path: Path) -> None:
    """Log which kernels the quantized layers will run on (a fallback to the reference has already been
    warned about loudly, once, by `compressor.kernels.build`)."""
    from . import kernels
    from .nn import QuantLinear
    n = sum(isinstance(m, QuantLinear) for m in model.modules())
    if n:
        logging.getLogger("compressor").info("%s: %d quantized layers run on %s", path, n, kernels.backend())
