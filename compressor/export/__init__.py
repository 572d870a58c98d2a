"""Exports: a compressed checkpoint repacked, not re-quantized, into the format an engine loads.

    compressor.export("out/gptq-w4g64", "gguf", "out/gptq-w4g64-gguf")
    compress export gguf out/gptq-w4g64 -o out/gptq-w4g64-gguf

One module per target format registers a writer with `register_export`. Every writer reads the
checkpoint as stored (`Source`: config, compression.json's module specs and the safetensors tensors),
unpacks our integer codes, scales and zero points, and writes them in the target's layout. Each
conversion is exact up to the target's storage dtype (the one inexact value is Q4_1's fp16 offset
``m = -s*z``; see `to_gguf`).

| format               | engines                                        | needs                                  |
|----------------------|------------------------------------------------|----------------------------------------|
| `gptq`               | compressor.load; GPTQ loaders (sym recipes)    | nothing (the checkpoint itself)        |
| `gptq-v2`            | GPTQModel, transformers (via GPTQModel)        | 2/4/8-bit GPTQ layers                  |
| `compressed-tensors` | transformers + compressed-tensors, vLLM        | 4/8-bit, no act-order                  |
| `gguf`               | llama.cpp (llama-cpp-python, ollama, ...)      | llama architecture, 4-bit groups of a multiple of 32, 8-bit sym per channel, no act-order |
| `onnx`               | ONNX Runtime (`compressor.export.ort`)         | llama architecture, 4/8-bit            |

A quantized output head (the ``head`` pass) travels in each format's own quantized form, and an
input embedding tied to it (``gptq-tied-embedding``: no tensor of its own, it reads the head's
rows) as each engine reads an embedding: `Source.dequantized` gives its weight exactly, and
`exact_float` stores it fp16 only where that is exact. See each writer for where the two go.

The output is a directory written atomically (`compressor.checkpoint.atomic_dir`) with the
format's files, the tokenizer, and ``export.json``: the format, the options, the source checkpoint
and its recipe. It holds no ``compression.json``, so `compressor.load` does not mistake it for
one of ours (except `gptq`, which is a copy of the checkpoint).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import InputError

__all__ = ["export", "export_onnx", "export_meta", "check_plan", "FORMATS", "NATIVE", "register_export", "ExportError",
           "Source", "EXPORT_META", "TIED", "exact_float"]

EXPORT_META = "export.json"
ONNX_ARTIFACT = "onnx-export"       # compression.json's artifact in an onnx export directory
NATIVE = "gptq"                     # the format `compressor.checkpoint.save` writes; exporting to it is a copy
TIED = "gptq-tied-embedding"        # `compressor.nn.TiedQuantEmbedding`: reads a quantized head's rows


class ExportError(InputError):
    """A checkpoint that cannot be written in the asked format (names the layer and what to change)."""


@dataclass(frozen=True)
class Exporter:
    name: str
    write: Callable[["Source", Path, dict[str, Any]], dict[str, Any]]
    engines: str
    options: tuple[str, ...] = ()
    bits: tuple[int, ...] = (2, 3, 4, 8)      # code widths the format has a layout for
    static_groups: bool = False               # True: act-order (g_idx) cannot be expressed
    archs: tuple[str, ...] | None = None      # config.json model_type values it writes; None: any
    meta_file: str = EXPORT_META              # the file describing the export (onnx: compression.json)
    requires: tuple[str, str] | None = None   # (module, extra) the writer imports, checked before any work
    check: Callable[[dict[str, Any]], None] | None = None   # raises ExportError for a bad option value


FORMATS: dict[str, Exporter] = {}


def register_export(name: str, engines: str, **limits: Any):
    """Register `write(source, tmp_dir, options) -> dict` (what export.json records) as format `name`.
    `limits` are the `Exporter` fields after `engines` (options, bits, static_groups, archs, meta_file, requires, check):
    `check_plan` checks a recipe against them before any work."""
    def deco(fn):
        FORMATS[name] = Exporter(name, fn, engines, **limits)
        return fn
    return deco


def _exporter(format: str, options: dict[str, Any]) -> Exporter:
    from . import to_compressed_tensors, to_gguf, to_gptq, to_onnx  # noqa: F401  (register the formats)
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {sorted(FORMATS)}")
    exp = FORMATS[format]
    if exp.requires:
        module, extra = exp.requires
        try:
            __import__(module)
        except ImportError:
            raise ExportError(f"export {format} needs the {extra} extra: pip install 'compressor[{extra}]' (from a "
                              f"checkout: pip install -e '.[{extra}]')") from None
    unknown = sorted(set(options) - set(exp.options))
    if unknown:
        raise ExportError(f"export {format}: unknown option {unknown[0]!r}; allowed: {list(exp.options) or 'none'}")
    if exp.check is not None:
        exp.check(options)
    return exp


def check_plan(format: str, options: dict[str, Any], recipe, model_type: str | None = None) -> None:
    """Refuse, before any work, a recipe whose result `format` cannot hold (`compress --format`,
    a recipe's ``save: {format: ...}``): the same conditions the writer checks on the checkpoint,
    read from the passes' configs."""
    exp = _exporter(format, options)
    if format == NATIVE:
        return
    from ..passes import State
    if recipe.artifact != "checkpoint" or recipe.final_state != State.INT:
        raise ExportError(f"format {format!r} holds integer-quantized models; recipe {recipe.source!r} leaves the "
                          f"model {recipe.final_state.value}. End it with a quantization pass (rtn, gptq, awq)")
    for p in recipe.passes:
        if p.changes_shapes:
            raise ExportError(f"format {format!r} builds every layer from config.json; pass {p.name!r} changes "
                              f"layer shapes, which it cannot express. Save the native format (gptq) instead")
        bits = getattr(p, "bits", None)
        if bits is not None and bits not in exp.bits:
            raise ExportError(f"format {format!r} has no {bits}-bit layout (pass {p.name!r}); it takes bits "
                              f"{list(exp.bits)}")
        if exp.static_groups and getattr(p, "act_order", False):
            raise ExportError(f"format {format!r} needs static groups; pass {p.name!r} has act_order: true. Set "
                              f"act_order: false (the recipe gptq-w4g64-noact), or save gptq / gptq-v2")
    if "head" in options and any(p.name == "head" for p in recipe.passes):       # onnx's float-head option
        raise ExportError(f"format {format!r}: option head={options['head']!r} sets how a float head is stored; "
                          f"recipe {recipe.source!r} quantizes the head (its head pass), and that head is written "
                          f"from its own codes. Drop the option, or the head pass")
    if exp.archs is not None and model_type is not None and model_type not in exp.archs:
        raise ExportError(f"format {format!r} writes the {'/'.join(exp.archs)} architecture; this model is "
                          f"{model_type!r}. Use compressed-tensors or gptq-v2 for it")


def exact_float(w: torch.Tensor) -> torch.Tensor:
    """`w` as fp16 where that is exact (a checkpoint's embedding is stored so), else fp32. A dequantized
    row ``(q - z) * s`` is an fp16 scale times an integer of up to 9 bits: exact in fp32 (24-bit
    significand), rounded in fp16 for most entries (82% of a tiny model's int8 head), and that rounding
    moves the logits by ~1e-4 of their range, the bar the engine tests hold exports to."""
    h = w.to(torch.float16)
    return h if torch.equal(h.float(), w.float()) else w.float()


class Source:
    """A compressed checkpoint as stored: config dict, compression.json, tensors, module specs."""

    def __init__(self, path: str | Path):
        from safetensors.torch import load_file

        from ..checkpoint import ADAPTER, META, WEIGHTS, CheckpointError, is_checkpoint
        from ..models import check_safetensors
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
        if not is_checkpoint(self.path):
            raise ExportError(f"{str(path)!r} is not a compressed checkpoint (no {META}); compress it first "
                              f"(compress --recipe ... -o DIR), then export DIR")
        try:
            self.meta = json.loads((self.path / META).read_text())
        except (json.JSONDecodeError, OSError) as e:
            raise CheckpointError(f"{self.path}: cannot read its metadata ({e})") from None
        if self.meta.get("artifact") == ADAPTER:
            raise ExportError(f"{self.path} is a LoRA adapter; merge it first (a recipe whose lora pass has "
                              f"save: merged), then export the merged checkpoint")
        if self.meta.get("artifact") == ONNX_ARTIFACT:
            raise ExportError(f"{self.path} is an ONNX export, not a checkpoint; export the checkpoint it was made "
                              f"from ({self.meta.get('source', {}).get('checkpoint')})")
        try:
            self.config = json.loads((self.path / "config.json").read_text())
        except (json.JSONDecodeError, OSError) as e:
            raise CheckpointError(f"{self.path}: cannot read its config.json ({e})") from None
        check_safetensors(self.path / WEIGHTS)
        self.tensors: dict[str, torch.Tensor] = load_file(str(self.path / WEIGHTS))
        self.specs: dict[str, dict[str, Any]] = self.meta.get("modules", {})

    @classmethod
    def float_model(cls, path: str | Path) -> "Source":
        """An uncompressed HF model directory (config.json + one model.safetensors) read as a Source
        with no compressed modules: what a float reference in another engine is written from (a
        gguf F16 file for llama.cpp's own quantizer, benchmarks/engines.py)."""
        from safetensors.torch import load_file
        self = cls.__new__(cls)
        self.path = Path(path)
        self.config = json.loads((self.path / "config.json").read_text())
        self.meta, self.specs = {}, {}
        files = sorted(self.path.glob("*.safetensors"))
        if len(files) != 1:
            raise ExportError(f"{self.path}: expected one *.safetensors file, found {len(files)}")
        self.tensors = load_file(str(files[0]))
        return self

    def quantized(self) -> dict[str, dict[str, Any]]:
        return {n: s for n, s in self.specs.items() if s["type"] == "gptq"}

    def require(self, fmt: str, types: tuple[str, ...] = ("gptq",)) -> None:
        """Refuse modules of a type `fmt` cannot express (low-rank factors, pruned shapes, ...)."""
        bad = {n: s["type"] for n, s in self.specs.items() if s["type"] not in types}
        if bad:
            n, t = next(iter(bad.items()))
            what = "a float Linear whose shape a pass changed" if t == "linear" else f"of type {t!r}"
            raise ExportError(f"cannot export to {fmt}: {len(bad)} modules have no {fmt} form, e.g. {n} "
                              f"({what}); {fmt} engines build every layer from config.json. Export a "
                              f"checkpoint whose recipe only quantizes (rtn, gptq, awq)")

    def codes(self, name: str):
        """(q (N, K) uint8, scale (N, G) fp32 from fp16, zero (N, G) fp32 integers, g_idx (K,)) of a GPTQ layer."""
        from ..quant.packing import unpack_gptq
        t = {k: self.tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        return unpack_gptq(t, self.specs[name]["bits"])

    def dequantized(self, name: str) -> torch.Tensor:
        """(N, K) fp32 weight of GPTQ layer `name`, ``(q - zero[g_idx]) * scale[g_idx]``: the numbers
        `QuantLinear.dequantized_weight` and `TiedQuantEmbedding` compute, bit for bit."""
        q, scale, zero, g_idx = self.codes(name)
        g = g_idx.long()
        return (q.float() - zero[:, g]) * scale[:, g]

    def tied_embeddings(self) -> dict[str, str]:
        """embedding name -> the quantized head it reads (`TIED` specs). No engine knows this tie: each
        writer stores the embedding in a form its engine reads (the rows `dequantized`, or the head's
        codes where the engine gathers them). ExportError if the head is not a GPTQ layer of this checkpoint."""
        tied = {n: s["tied_to"] for n, s in self.specs.items() if s["type"] == TIED}
        for emb, head in tied.items():
            hs = self.specs.get(head, {})
            if hs.get("type") != "gptq" or (hs["out_features"], hs["in_features"]) != (
                    self.specs[emb]["num_embeddings"], self.specs[emb]["embedding_dim"]):
                raise ExportError(f"{self.path}: embedding {emb} is tied to {head!r}, which is not a matching GPTQ "
                                  f"layer of this checkpoint ({hs.get('type', 'absent')}); the checkpoint is "
                                  f"inconsistent. Re-run its recipe")
        return tied

    def untied_tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors plus ``{emb}.weight`` for each tied embedding: its head `dequantized`, as
        `exact_float` (what HF-style loaders, which build a float Embedding, read)."""
        out = dict(self.tensors)
        for emb, head in self.tied_embeddings().items():
            out[f"{emb}.weight"] = exact_float(self.dequantized(head)).contiguous()
        return out

    def desc_act(self, name: str) -> bool:
        s = self.specs[name]
        if s.get("desc_act") is not None:
            return bool(s["desc_act"])
        g = s["in_features"] if s["group_size"] == -1 else s["group_size"]
        return not torch.equal(self.tensors[f"{name}.g_idx"].long(), torch.arange(s["in_features"]) // g)

    def refuse_act_order(self, fmt: str) -> None:
        acts = [n for n in self.quantized() if self.desc_act(n)]
        if acts:
            raise ExportError(f"cannot export to {fmt}: {len(acts)} layers were quantized in act-order (e.g. "
                              f"{acts[0]}), whose groups are not contiguous runs of input channels; {fmt} needs "
                              f"static groups. Re-run the recipe with act_order: false in its gptq pass (the "
                              f"recipe gptq-w4g64-noact), or export to gptq / gptq-v2, which carry g_idx")

    def copy_tokenizer(self, dest: Path) -> None:
        for f in self.path.iterdir():
            if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja",
                                                            "generation_config.json", "vocab.json", "merges.txt"):
                shutil.copy2(f, dest / f.name)


def export(ckpt: str | Path, format: str, out: str | Path, *, overwrite: bool = False,
           **options: Any) -> Path:
    """Write checkpoint `ckpt` in `format` (see `FORMATS`) to the directory `out`, atomically."""
    from ..checkpoint import atomic_dir, versions
    exp = _exporter(format, options)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output {str(out)!r} already exists; pass --overwrite to replace it")
    src = Source(ckpt)
    if Path(ckpt).resolve() == out.resolve():
        raise ExportError(f"export output {str(out)!r} is the checkpoint itself; choose another directory")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        described = exp.write(src, tmp, dict(options))
        meta = {"format": format, "engines": exp.engines, "options": options, **described,
                "source": {"checkpoint": str(Path(ckpt).resolve()), "recipe": src.meta.get("recipe"),
                           "model": src.meta.get("source")}, "versions": versions(), "producer": "compressor"}
        (tmp / exp.meta_file).write_text(json.dumps(meta, indent=2, default=str))
    return out


def export_onnx(ckpt: str | Path, out: str | Path, *, overwrite: bool = False, **options: Any) -> Path:
    """`export` to ``onnx`` (`to_onnx`): options ``accuracy_level`` (0 exact, 4 int8 activations) and
    ``head`` (fp16, int8)."""
    return export(ckpt, "onnx", out, overwrite=overwrite, **options)


def export_meta(path: str | Path) -> dict[str, Any] | None:
    """What an export directory says it holds (export.json, or an onnx export's compression.json), or None."""
    from ..checkpoint import META
    for name in (EXPORT_META, META):
        try:
            meta = json.loads((Path(path) / name).read_text())
        except (OSError, ValueError):
            continue
        if name == EXPORT_META or meta.get("artifact") == ONNX_ARTIFACT:
            return meta
    return None
