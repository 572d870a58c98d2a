"""Prepare a compressed checkpoint for `compressor.runtime`'s engine: the one step that needs torch.

``python -m compressor.runtime.pack CHECKPOINT OUT_DIR`` (run by `compressor.runtime.store` in a child
process, once per checkpoint) builds exactly the module tree `compressor.nn.decoder.FastDecoder` reads
(config.json, compression.json and model.safetensors; no transformers), repacks and fuses the weights as
`compressor.load` does (`prepare_`: the act-order fold; FastDecoder: q/k/v and gate/up fused), and writes
what FastDecoder's blocks, rotary tables, final norm, head and embedding hold:

* ``weights.bin``: every array, each at a 64-byte aligned offset;
* ``index.json``: the model's shape, each array's dtype, shape and offset, and how the parts fit
  (`compressor.runtime.engine` reads it).

So packing stays in one place (`compressor.kernels.repack`) and the generating process never pays for
torch's ~220 MiB. Errors are `CheckpointError`s naming the file and what Runtime cannot run.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn

from ..files import META, WEIGHTS, CheckpointError
from ..kernels.layer import _rms
from ..models import ModelError, check_safetensors
from ..nn.decoder import FastDecoder, unsupported
from ..nn.half import HalfEmbedding, HalfLinear
from ..nn.prepare import prepare_
from ..nn.qembedding import TiedQuantEmbedding
from ..nn.qlinear import QuantLinear
from . import PACK_FORMAT, read_description

__all__ = ["pack", "describe", "main"]

_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32,
           "I64": torch.int64, "U8": torch.uint8, "I8": torch.int8}
_ALIGN = 64
_MAX_ROPE_ROWS = 32768        # rotary rows stored: max_position_embeddings, at most this many


class RuntimeMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); only its projections run (inside the block op)."""


class _Norm(nn.Module):
    """HF's LlamaRMSNorm in fp32 (the final norm; the blocks' norms run inside the op)."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight, self.eps = weight.float(), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms(x.float(), self.weight, self.eps)


class _Rotary(nn.Module):
    """HF's default rotary embedding (``rope_type: default``), computed as transformers does."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = (self.inv_freq[None, :, None].float() @ pos[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def build(path: Path) -> tuple[nn.Module, FastDecoder]:
    """The checkpoint as the module tree FastDecoder reads, prepared as `compressor.load` prepares it, and
    its FastDecoder."""
    from ..machine import release_memory
    config, specs = read_description(path)
    model = _build(path, config, specs)
    prepare_(model, half_lm_head=False, fast_generate=False, release=True)   # act-order fold
    release_memory()
    why = unsupported(model)
    if why is not None:
        raise CheckpointError(f"{path}: Runtime cannot run this model ({why}); use compressor.load")
    return model, FastDecoder(model)


class _Weights:
    """model.safetensors read tensor by tensor with plain reads: no mapping of the whole file, whose pages would
    count in the process's RSS alongside the repacked copy."""

    def __init__(self, path: Path):
        try:
            self.header = check_safetensors(path)
        except ModelError as e:
            raise CheckpointError(str(e)) from None
        self.path = path
        with open(path, "rb") as f:
            self.base = 8 + int.from_bytes(f.read(8), "little")
        self.file = open(path, "rb")
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.header

    def __call__(self, name: str) -> torch.Tensor:
        info = self.header.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor {name!r}; the file does not match compression.json")
        dtype, shape, (a, b) = _DTYPES.get(info.get("dtype")), info.get("shape"), info["data_offsets"]
        if dtype is None or not isinstance(shape, list) or dtype.itemsize * math.prod(shape) != b - a:
            raise CheckpointError(f"{self.path}: tensor {name!r} has a bad dtype or shape ({info.get('dtype')}, "
                                  f"{shape}, {b - a} bytes); re-create the file")
        t = torch.empty(shape, dtype=dtype)
        self.file.seek(self.base + a)
        if b > a and self.file.readinto(t.reshape(-1).view(torch.uint8).numpy()) != b - a:
            raise CheckpointError(f"{self.path}: truncated while reading {name!r}")
        self.used.add(name)
        return t

    def close(self) -> None:
        self.file.close()


def _quant_linear(spec: dict | None, name: str, read: _Weights) -> QuantLinear:
    if not (isinstance(spec, dict) and spec.get("type") == "gptq"):
        kind = spec.get("type") if isinstance(spec, dict) else "not quantized"
        raise CheckpointError(f"{read.path.parent}: {name} is {kind}; Runtime runs 4/8-bit GPTQ projections, "
                              f"use compressor.load")
    try:
        m = QuantLinear.from_spec(spec)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{read.path.parent / META}: bad spec for {name} ({e})") from None
    for buf in ("qweight", "qzeros", "scales", "g_idx") + (("bias",) if m.bias is not None else ()):
        t = read(f"{name}.{buf}")
        if t.shape != getattr(m, buf).shape:
            raise CheckpointError(f"{read.path}: {name}.{buf} has shape {tuple(t.shape)}, compression.json says "
                                  f"{tuple(getattr(m, buf).shape)}")
        setattr(m, buf, t.to(getattr(m, buf).dtype))
    m.packed()
    return m.release_()                      # at once: the peak holds one layer twice, not the model


def _build(path: Path, cfg: SimpleNamespace, specs: dict[str, dict[str, Any]]) -> nn.Module:
    """The module tree FastDecoder reads (HF's attribute names), every weight read once."""
    from ..machine import trim_heap
    read = _Weights(path / WEIGHTS)
    try:
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        model, inner = nn.Module(), nn.Module()
        model.config, model.model = cfg, inner
        _head_and_embedding(model, specs, read)      # first: its repacking's transient copy (~28 MB for
        trim_heap()                                  # SmolLM2's int8 head) then sits on less than the model
        inner.layers = nn.ModuleList()
        for i in range(cfg.num_hidden_layers):
            block, attn, mlp = nn.Module(), nn.Module(), RuntimeMLP()
            block.self_attn, block.mlp = attn, mlp
            for proj in _PROJECTIONS:
                part, leaf = proj.split(".")
                owner = attn if part == "self_attn" else mlp
                name = f"model.layers.{i}.{proj}"
                setattr(owner, leaf, _quant_linear(specs.get(name), name, read))
            block.input_layernorm = _Norm(read(f"model.layers.{i}.input_layernorm.weight"), cfg.rms_norm_eps)
            block.post_attention_layernorm = _Norm(read(f"model.layers.{i}.post_attention_layernorm.weight"),
                                                   cfg.rms_norm_eps)
            inner.layers.append(block)
            trim_heap()                      # repacking's temporaries: glibc keeps freed pages otherwise
        inner.norm = _Norm(read("model.norm.weight"), cfg.rms_norm_eps)
        inner.rotary_emb = _Rotary(head_dim, cfg.rope_theta)
        left = sorted(set(read.header) - read.used - {"__metadata__"})
        if left:
            raise CheckpointError(f"{path / WEIGHTS}: tensors Runtime does not model ({', '.join(left[:4])}...); "
                                  f"use compressor.load")
        return model
    except (AttributeError, TypeError) as e:
        raise CheckpointError(f"{path}: config.json does not describe a llama-architecture model "
                              f"({type(e).__name__}: {e})") from None
    finally:
        read.close()


def _float_head(w: torch.Tensor) -> nn.Module:
    """A float head: `HalfLinear` on an fp16 weight (as checkpoints store the tied embedding), else fp32."""
    if w.dtype == torch.float16:
        return HalfLinear(w)
    head = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    head.weight = nn.Parameter(w.float(), requires_grad=False)
    return head


def _head_and_embedding(model: nn.Module, specs: dict, read: _Weights) -> None:
    """lm_head as GPTQ (with the embedding reading its rows) or float, the tie kept: each matrix held once."""
    inner = model.model
    if "lm_head" in specs:
        model.lm_head = _quant_linear(specs["lm_head"], "lm_head", read)
        emb = specs.get("model.embed_tokens")
        if isinstance(emb, dict) and emb.get("type") == "gptq-tied-embedding":
            inner.embed_tokens = TiedQuantEmbedding.from_spec(emb).tie_(model)
        else:
            inner.embed_tokens = nn.Embedding.from_pretrained(read("model.embed_tokens.weight").float())
        return
    emb = read("model.embed_tokens.weight")
    tied = getattr(model.config, "tie_word_embeddings", False) or not read.has("lm_head.weight")
    model.lm_head = _float_head(emb if tied else read("lm_head.weight"))
    if tied and isinstance(model.lm_head, HalfLinear):
        inner.embed_tokens = HalfEmbedding(model.lm_head)
    elif tied:
        inner.embed_tokens = nn.Embedding.from_pretrained(model.lm_head.weight)
    else:
        inner.embed_tokens = nn.Embedding.from_pretrained(emb.float())


class _Writer:
    """Arrays appended to weights.bin at aligned offsets; `index` describes them."""

    def __init__(self, f):
        self.f, self.off, self.index = f, 0, {}

    def add(self, name: str, t: torch.Tensor | None) -> str | None:
        if t is None:
            return None
        a = t.detach().contiguous().numpy()
        pad = -self.off % _ALIGN
        self.f.write(b"\0" * pad)
        self.off += pad
        self.index[name] = {"dtype": a.dtype.name, "shape": list(a.shape), "offset": self.off}
        self.f.write(memoryview(a).cast("B"))
        self.off += a.nbytes
        return name


def _linear(add, name: str, args: list, meta: list) -> dict:
    """A packed projection of FastDecoder's lists: qweight, scales, zeros, perm, bias; bits, group, out."""
    qweight, scales, zeros, perm, bias = args
    bits, group, out = meta
    k = qweight.shape[1] * (32 // bits)
    return {"arrays": [add(f"{name}.{p}", t) for p, t in zip(("qweight", "scales", "zeros", "perm", "bias"),
                                                                 (qweight, scales, zeros, perm, bias))],
            "meta": [bits, group, out, k, qweight.shape[0]]}


def pack(ckpt: str | Path, out: str | Path) -> None:
    """Write `ckpt` prepared for the engine into the directory `out` (which must exist and be empty)."""
    ckpt, out = Path(ckpt), Path(out)
    model, fast = build(ckpt)
    with open(out / "weights.bin", "wb") as f:
        w = _Writer(f)
        try:
            index = describe(model, fast, w.add)
        except ValueError as e:
            raise CheckpointError(f"{ckpt}: {e}; use compressor.load") from None
        index.update({"format": PACK_FORMAT, "arrays": w.index})
    (out / "index.json").write_text(json.dumps(index))


def describe(model: nn.Module, fast: FastDecoder, add) -> dict:
    """What the engine reads of a prepared model and its FastDecoder: shape, blocks, rotary tables, final norm,
    head and embedding, each array given to ``add(name, tensor)``, which returns the name it is found by (or None
    for None). `pack` writes the arrays to weights.bin; `FastDecoder.engine` hands the engine its own tensors.
    ValueError for a head the engine cannot run (a bias, or fp32 that fp16 does not hold exactly)."""
    cfg = model.config
    rows = int(min(getattr(cfg, "max_position_embeddings", None) or 4096, _MAX_ROPE_ROWS))
    cos, sin = fast.rope_tables(rows)
    blocks = []
    for i, (ln1, ln2, args, meta, scale) in enumerate(fast.layers):
        blocks.append({"linears": [_linear(add, f"layers.{i}.{j}", args[5 * j:5 * j + 5], meta[3 * j:3 * j + 3])
                                   for j in range(4)],
                       "ln1": add(f"layers.{i}.ln1", ln1), "ln2": add(f"layers.{i}.ln2", ln2), "scale": scale})
    head, emb = model.lm_head, model.model.embed_tokens
    if isinstance(head, QuantLinear):
        p = head.packed()
        head_desc = {"kind": "packed", **_linear(add, "lm_head", [p.qweight, p.scales, p.zeros, p.perm, None],
                                                 [p.bits, p.group_size, p.out_features])}
    elif isinstance(head, HalfLinear) and head.bias is None:
        head_desc = {"kind": "f16", "weight": add("lm_head.weight", head.weight)}
    else:
        half = head.weight.detach().half()
        if head.bias is not None or not torch.equal(half.float(), head.weight.detach().float()):
            raise ValueError("an output head with a bias, or fp32 that fp16 does not hold exactly")
        head_desc = {"kind": "f16", "weight": add("lm_head.weight", half)}
    if isinstance(emb, TiedQuantEmbedding):
        emb_desc = {"kind": "tied"}
    elif isinstance(emb, HalfEmbedding):
        emb_desc = {"kind": "f16", "table": head_desc["weight"]}          # the head's array: stored once
    else:
        emb_desc = {"kind": "f32", "table": add("embed_tokens.weight", emb.weight.detach().float())}
    return {
        "shape": {"hidden": cfg.hidden_size, "heads": fast.heads, "kv_heads": fast.kv_heads,
                  "head_dim": fast.head_dim, "layers": len(fast.layers), "vocab": head.out_features if
                  isinstance(head, QuantLinear) else head.weight.shape[0], "eps": fast.eps},
        "eos_token_id": getattr(cfg, "eos_token_id", None),
        "rope": {"cos": add("rope.cos", cos[:rows]), "sin": add("rope.sin", sin[:rows]), "rows": rows},
        "norm": add("norm.weight", model.model.norm.weight.detach().float()),
        "blocks": blocks, "head": head_desc, "embedding": emb_desc,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m compressor.runtime.pack CHECKPOINT OUT_DIR``; a CheckpointError is one line on stderr and
    exit status 3 (the parent raises it again)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m compressor.runtime.pack CHECKPOINT OUT_DIR", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    try:
        pack(args[0], args[1])
    except CheckpointError as e:
        print(f"CheckpointError: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
