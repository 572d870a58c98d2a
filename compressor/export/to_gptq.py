"""GPTQ exports: ``gptq`` (auto-gptq v1, the checkpoint as it is) and ``gptq-v2`` (GPTQModel's layout).

The two layouts differ in one thing: v1 stores each zero point minus 1 in ``qzeros`` (auto-gptq's
historical convention, which loaders add back), v2 stores the zero point itself. GPTQModel refuses
asymmetric v1 checkpoints that it did not produce (old zero-point bugs), and reads asymmetric
models in v2, marked by ``checkpoint_format: gptq_v2`` in ``quantization_config`` and in
``quantize_config.json``. ``qweight``, ``scales`` and ``g_idx`` are the same bytes in both.

A quantized head (the ``head`` pass) with the decoder's bit width stays GPTQ, the same bytes: GPTQ
loaders quantize ``lm_head`` when ``quantization_config`` says ``lm_head: true`` (GPTQModel's flag,
which vLLM's gptq and gptq_marlin read too), and its ``dynamic`` entry gives its group. A head of
another width (the shipped recipes' int8 head) is written as its dequantized float rows
(`_float_head`): GPTQModel's CPU kernels take one width per model. No loader knows our tied
embedding (`compressor.nn.TiedQuantEmbedding`), so both formats write it as a float
``model.embed_tokens.weight`` (`Source.untied_tensors`), and ``gptq`` drops its spec from
compression.json: `compressor.load` then reads a plain embedding with the same numbers.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from ..quant.packing import pack_bits, unpack_bits
from . import TIED, ExportError, Source, register_export

__all__ = ["v1_to_v2_qzeros"]

log = logging.getLogger("compressor")


@register_export("gptq", engines="compressor.load; transformers/GPTQModel/vLLM for sym recipes")
def write_v1(src: Source, tmp: Path, options: dict[str, Any]) -> dict[str, Any]:
    for f in src.path.iterdir():
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    if src.tied_embeddings() or "lm_head" in src.quantized():
        _untie_copy(src, tmp)
    asym = [n for n, s in _kept(src).items() if not s.get("sym", False)]
    if asym:
        log.warning("gptq export: %d layers are asymmetric (e.g. %s); GPTQModel (and transformers through it) "
                    "refuses asymmetric v1 checkpoints it did not write. Export gptq-v2 for those loaders.",
                    len(asym), asym[0])
    return {"layers": len(src.quantized()), "asymmetric_layers": len(asym)}


def _untie_copy(src: Source, tmp: Path) -> None:
    """The copied checkpoint `tmp` of `src`, whose head is quantized, as GPTQ loaders read it: tied
    embeddings as float tensors (their specs out of compression.json), ``lm_head: true``."""
    from safetensors.torch import save_file

    from ..checkpoint import META, WEIGHTS, _quantization_config
    float_head = _float_head(src)
    if src.tied_embeddings() or float_head:
        save_file(_tensors(src), str(tmp / WEIGHTS), metadata={"format": "pt"})
        meta = dict(src.meta, modules={n: s for n, s in src.specs.items()
                                       if s["type"] != TIED and not (float_head and n == "lm_head")})
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
    cfg = dict(src.config)
    kept = _kept(src)
    specs = {n: s for n, s in src.specs.items() if n in kept or s["type"] != "gptq"}
    qc = _quantization_config(specs, _blocks_prefix(kept)) if float_head else cfg.get("quantization_config")
    cfg["quantization_config"] = _with_head(qc or {}, kept)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


def _float_head(src: Source) -> bool:
    """A quantized head whose bits differ from the decoder's (the int8 head of a 4-bit recipe) is written as a
    float ``lm_head.weight``, its dequantized rows, exact: GPTQModel's CPU kernels (TorchAtenLinear) take
    one bit width per model and refuse the mix, and transformers' GPTQ loading reads no quantized head."""
    q = src.quantized()
    if "lm_head" not in q:
        return False
    body = {s["bits"] for n, s in q.items() if n != "lm_head"}
    return bool(body) and q["lm_head"]["bits"] not in body


def _kept(src: Source) -> dict[str, Any]:
    """The GPTQ layers the export keeps quantized (all but a `_float_head`)."""
    q = src.quantized()
    return {n: s for n, s in q.items() if not (n == "lm_head" and _float_head(src))}


def _tensors(src: Source) -> dict[str, Any]:
    """`Source.untied_tensors`, with a `_float_head` as ``lm_head.weight``."""
    from . import exact_float
    tensors = src.untied_tensors()
    if _float_head(src):
        for k in [k for k in tensors if k.startswith("lm_head.") and k != "lm_head.bias"]:
            del tensors[k]
        tensors["lm_head.weight"] = exact_float(src.dequantized("lm_head")).contiguous()
    return tensors


def _with_head(qc: dict[str, Any], q: dict[str, Any]) -> dict[str, Any]:
    """`qc` with ``lm_head: true`` when the head is among the quantized layers `q` (else loaders leave it
    a float Linear and find no ``lm_head.weight``)."""
    if "lm_head" not in q:
        return qc
    log.warning("gptq export: lm_head is quantized (lm_head: true), which GPTQModel and vLLM load; transformers' "
                "own GPTQ loading (optimum) converts only the decoder blocks' Linears and would leave lm_head "
                "uninitialized. Load this export with GPTQModel or vLLM, or export compressed-tensors for transformers")
    return {**qc, "lm_head": True}


def v1_to_v2_qzeros(qzeros, bits: int):
    """v1 ``qzeros`` (zero - 1, packed along N) -> v2 (the zero point itself), unpacked and repacked
    so that no field carries into its neighbour (GPTQModel's add-a-constant trick overflows on a
    stored 2**bits - 1)."""
    z = unpack_bits(qzeros, bits, dim=1).long() + 1
    if z.numel() and int(z.max()) >= 2 ** bits:
        raise ExportError(f"a {bits}-bit zero point of {int(z.max())} does not fit the v2 layout")
    return pack_bits(z, bits, dim=1)


@register_export("gptq-v2", engines="GPTQModel; transformers (through GPTQModel)")
def write_v2(src: Source, tmp: Path, options: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import save_file

    from ..checkpoint import WEIGHTS, _quantization_config
    src.require("gptq-v2", types=("gptq", TIED))
    q = _kept(src)
    if not q:
        raise ExportError(f"{src.path} has no GPTQ layers; gptq-v2 is a quantized format")
    tensors = _tensors(src)
    for name, spec in q.items():
        tensors[f"{name}.qzeros"] = v1_to_v2_qzeros(tensors[f"{name}.qzeros"], spec["bits"]).contiguous()
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    cfg = dict(src.config)
    specs = {n: s for n, s in src.specs.items() if n in q or s["type"] != "gptq"}    # without a float head
    qc = _with_head(_quantization_config(specs, _blocks_prefix(q)) or {}, q)
    from .. import __version__
    qc.update({"checkpoint_format": "gptq_v2", "format": "gptq_v2", "pack_dtype": "int32",
               "meta": {"quantizer": [f"compressor:{__version__}"]}})
    cfg["quantization_config"] = qc
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (tmp / "quantize_config.json").write_text(json.dumps(qc, indent=2, sort_keys=True))
    src.copy_tokenizer(tmp)
    return {"layers": len(q), "quantization_config": qc}


def _blocks_prefix(q: dict[str, Any]) -> str | None:
    """``model.layers`` from names like ``model.layers.3.mlp.up_proj`` (the decoder-block list)."""
    for n in q:
        parts = n.split(".")
        for i, p in enumerate(parts):
            if p.isdigit():
                return ".".join(parts[:i])
    return None
