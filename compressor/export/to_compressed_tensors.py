"""``compressed-tensors``: the ``pack-quantized`` format llm-compressor writes and vLLM loads first.

Per quantized Linear (K = in, N = out, G = groups), as compressed-tensors 0.20's
``PackedQuantizationCompressor`` reads it:
  * ``weight_packed`` int32 (N, K*bits/32): codes packed along K, code j of a run of 32/bits in
    bits [bits*j, bits*(j+1)) of its word (the same bit stream as GPTQ's, along the other axis);
  * ``weight_scale`` fp16 (N, G);
  * ``weight_zero_point`` int32 (N*bits/32, G), packed along N, asymmetric layers only;
  * ``weight_shape`` int64 [N, K].
The format stores codes and zero points signed (``q - 2**(bits-1)``) and packs them offset back by
``2**(bits-1)``, so the packed fields are our unsigned codes and zero points unchanged, and
``(q_s - z_s) * s`` equals our ``(q - z) * s``. Symmetric layers (every zero at 2**(bits-1)) carry
no zero point. ``actorder: group`` (a ``g_idx``) is no longer in the format, so act-order
checkpoints are refused. One config group per distinct (bits, group size, symmetry), listing its
layers by name.

A quantized head (the ``head`` pass) is written dequantized, as a float ``lm_head`` in ``ignore``, though
the format could hold its codes exactly: engines do not load it packed. vLLM quantizes a
``ParallelLMHead`` with compressed-tensors only since vllm-project/vllm#37291 (older releases refuse
``lm_head.weight_packed``, SGLang ignored it and served garbage, sgl-project/sglang#35358), and
transformers 5.25 decompresses every dense layer of an asymmetric (``dequantize=True``) model with
the first config group's scheme, so a head in a group of its own comes out wrong. Dequantized
(`Source.dequantized`, stored by `exact_float`: fp16 only where exact) it loads everywhere with our
numbers. A head with a tied embedding is then one float matrix again: ``model.embed_tokens.weight``
with ``tie_word_embeddings: true``, as a model with a float head is written.
"""
from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import torch

from ..quant.packing import pack_bits
from . import TIED, ExportError, Source, exact_float, register_export

__all__ = ["scheme_of"]


def scheme_of(spec: dict[str, Any]) -> dict[str, Any]:
    per_channel = spec["group_size"] in (-1, spec["in_features"])
    return {"num_bits": spec["bits"], "type": "int", "symmetric": bool(spec.get("sym", False)),
            "strategy": "channel" if per_channel else "group",
            "group_size": None if per_channel else spec["group_size"], "dynamic": False, "actorder": None,
            "observer": "minmax", "block_structure": None}


@register_export("compressed-tensors", engines="transformers (with compressed-tensors), vLLM", bits=(4, 8),
                 static_groups=True)
def write(src: Source, tmp: Path, options: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import save_file

    from ..checkpoint import WEIGHTS
    src.require("compressed-tensors", types=("gptq", TIED))
    q = src.quantized()
    if not q:
        raise ExportError(f"{src.path} has no quantized layers; compressed-tensors pack-quantized needs some")
    bad = [n for n, s in q.items() if s["bits"] not in (4, 8)]
    if bad:
        raise ExportError(f"cannot export to compressed-tensors: {bad[0]} is {q[bad[0]]['bits']}-bit; vLLM's "
                          f"pack-quantized kernels take 4 and 8 bits")
    src.refuse_act_order("compressed-tensors")
    tensors = {k: v for k, v in src.tensors.items()
               if not any(k.startswith(f"{n}.") and k[len(n) + 1:] in ("qweight", "qzeros", "scales", "g_idx")
                          for n in q)}
    tied = {head: emb for emb, head in src.tied_embeddings().items()}
    heads = sorted(set(tied) | ({"lm_head"} & set(q)))
    for head in heads:                                  # dequantized: see the module docstring
        tensors[f"{tied.get(head, head)}.weight"] = exact_float(src.dequantized(head))
        del q[head]
    if not q:
        raise ExportError(f"cannot export {src.path} to compressed-tensors: its one quantized layer is the head "
                          f"({heads[0]}), which this format's engines do not load packed (written float, it would "
                          f"be an uncompressed model). Export it to gptq-v2, gguf or onnx, which keep the head "
                          f"quantized, or compress the decoder layers too (rtn, gptq, awq before the head pass)")
    groups: dict[tuple, list[str]] = collections.defaultdict(list)
    for name, spec in q.items():
        codes, scale, zero, _ = src.codes(name)
        bits, (n, k) = spec["bits"], codes.shape
        if n % (32 // bits):
            raise ExportError(f"{name}: {n} output channels cannot pack {bits}-bit zero points along N")
        tensors[f"{name}.weight_packed"] = pack_bits(codes, bits, dim=1)
        tensors[f"{name}.weight_scale"] = scale.to(torch.float16).contiguous()
        tensors[f"{name}.weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
        if not spec.get("sym", False):
            tensors[f"{name}.weight_zero_point"] = pack_bits(zero.round().to(torch.int64), bits, dim=0)
        groups[json.dumps(scheme_of(spec), sort_keys=True)].append(name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
    return {**_config(src, tmp, groups, q, tie=bool(tied)), "dequantized_heads": heads}


def _config(src: Source, tmp: Path, groups, q, tie: bool = False) -> dict[str, Any]:
    cfg = dict(src.config)
    if tie:                                 # the head dequantized is the embedding's matrix: stored once
        cfg["tie_word_embeddings"] = True
    linears = [n for n in _float_linears(src) if n not in q]
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
          "config_groups": {f"group_{i}": {"targets": sorted(names), "weights": json.loads(s),
                                           "input_activations": None, "output_activations": None,
                                           "format": "pack-quantized"}
                            for i, (s, names) in enumerate(sorted(groups.items()))},
          "ignore": linears, "kv_cache_scheme": None, "version": _ct_version()}
    cfg["quantization_config"] = qc
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    src.copy_tokenizer(tmp)
    return {"layers": len(q), "quantization_config": qc}


def _float_linears(src: Source) -> list[str]:
    """Names of the Linears left float: compressed-tensors' ``ignore`` list. ``lm_head`` is there unless
    quantized (tied to a float embedding, it has no tensor of its own); any other 2-D ``.weight`` that is
    not an embedding belongs to a float Linear a recipe left out (``ignore``)."""
    names = {k[:-len(".weight")] for k, t in src.tensors.items() if k.endswith(".weight") and t.ndim == 2
             and "embed" not in k and "wte" not in k}
    return sorted(names | {"lm_head"})


def _ct_version() -> str:
    try:
        from importlib.metadata import version
        return version("compressed-tensors")
    except Exception:
        return "0.20.1"
