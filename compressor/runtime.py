"""`Runtime`: greedy generation from a compressed checkpoint without transformers.

`compressor.load` gives a transformers model. Its classes import torch._dynamo, torch.distributed and sympy,
~240 MiB of RSS before any weight, so a process that only generates with it peaks near three times
llama.cpp's memory for SmolLM2-135M. Generation needs none of that: `compressor.nn.decoder.FastDecoder` runs
each block as one C++ op on the packed weights. `Runtime(path)` builds exactly what FastDecoder reads, from
config.json, compression.json and model.safetensors: torch, the kernels and the weights, read layer by layer
(no mmap of the whole file, each layer's GPTQ buffers dropped once repacked).

    rt = compressor.Runtime("out/smollm2-gptq-w4g64")
    ids = rt.generate(torch.tensor([rt.tokenizer.encode("The tower is").ids]), max_new_tokens=64)
    print(rt.tokenizer.decode(ids[0].tolist()))

Same modules, same ops, same arithmetic as ``compressor.load(path).generate`` on its fast path: the same tokens
and logits (tests/test_runtime.py). Scope: llama, mistral and qwen2 checkpoints whose seven projections per
block are 4/8-bit GPTQ layers, with the default rotary embedding; anything else is a `CheckpointError` that
says what and points to `compressor.load`. Greedy only (`FastDecoder.generate`).
"""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn

from .checkpoint import ADAPTER, FORMAT_VERSION, META, WEIGHTS, CheckpointError, is_checkpoint
from .errors import read_json
from .kernels.layer import _rms
from .models import ModelError, check_safetensors
from .nn.decoder import MODEL_TYPES, FastDecoder, unsupported
from .nn.half import HalfEmbedding, HalfLinear
from .nn.prepare import prepare_
from .nn.qembedding import TiedQuantEmbedding
from .nn.qlinear import QuantLinear

__all__ = ["Runtime"]

_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32,
           "I64": torch.int64, "U8": torch.uint8, "I8": torch.int8}


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


class Runtime:
    """A compressed checkpoint ready to generate: `generate` (greedy) and `logits`, no transformers."""

    def __init__(self, path: str | Path):
        from .machine import release_memory
        self.path = Path(path)
        self.config, specs = _read_description(self.path)
        self.model = _build(self.path, self.config, specs)
        prepare_(self.model, half_lm_head=False, fast_generate=False, release=True)   # act-order fold
        release_memory()
        why = unsupported(self.model)
        if why is not None:
            raise CheckpointError(f"{self.path}: Runtime cannot run this model ({why}); use compressor.load")
        self.decoder = FastDecoder(self.model)

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer.json as a `tokenizers.Tokenizer` (the Rust library transformers' fast
        tokenizers wrap; no transformers import): ``tokenizer.encode(text).ids``, ``tokenizer.decode(ids)``."""
        if getattr(self, "_tokenizer", None) is None:
            from tokenizers import Tokenizer
            f = self.path / "tokenizer.json"
            if not f.is_file():
                raise CheckpointError(f"{self.path}: no tokenizer.json; pass token ids to generate")
            self._tokenizer = Tokenizer.from_file(str(f))
        return self._tokenizer

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, vocab) float32 logits after the last of `input_ids` (B, T)."""
        ids = _ids(input_ids)
        return self.decoder.forward(ids, 0, self.decoder.caches(ids.shape[0], ids.shape[1]))

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, min_new_tokens: int = 0,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 attention_mask: torch.Tensor | None = None, do_sample: bool = False) -> torch.Tensor:
        """Greedy decoding as HF's ``generate(do_sample=False)``: (B, T + new) ids. `eos_token_id` defaults to
        config.json's; rows that ended are padded with `pad_token_id` (default: the first eos)."""
        ids = _ids(input_ids)
        if do_sample:
            raise ValueError("Runtime.generate is greedy (do_sample=False); sample with compressor.load(path).generate")
        if attention_mask is not None and not bool((attention_mask == 1).all()):
            raise ValueError("Runtime.generate takes rows of one length (an attention mask of ones); pad with "
                             "compressor.load(path).generate")
        if type(max_new_tokens) is not int or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 0")
        if eos_token_id is None:
            eos_token_id = getattr(self.config, "eos_token_id", None)
        return self.decoder.generate(ids, max_new_tokens, min_new_tokens, eos_token_id, pad_token_id)


def _ids(input_ids) -> torch.Tensor:
    if not (isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and not input_ids.is_floating_point()
            and input_ids.shape[1] > 0):
        raise ValueError(f"input_ids must be a (batch, length) integer tensor, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    return input_ids.long().cpu()


def _read_description(path: Path) -> tuple[SimpleNamespace, dict[str, dict[str, Any]]]:
    """config.json as attributes and compression.json's module specs; CheckpointError for what Runtime cannot run."""
    if not is_checkpoint(path):
        raise CheckpointError(f"{str(path)!r} is not a compressed checkpoint (no {META})")
    meta = read_json(path / META, CheckpointError, META)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta.get('format_version')!r}, this compressor reads "
                              f"{FORMAT_VERSION}")
    if meta.get("artifact") == ADAPTER or meta.get("artifact") == "onnx-export":
        raise CheckpointError(f"{path}: a {meta['artifact']} runs through compressor.load, not Runtime")
    cfg = read_json(path / "config.json", CheckpointError, "config.json")
    kind = cfg.get("model_type")
    if kind not in MODEL_TYPES:
        raise CheckpointError(f"{path}: model_type {kind!r}; Runtime runs {', '.join(MODEL_TYPES)}, "
                              f"use compressor.load")
    for key in ("rope_parameters", "rope_scaling"):                       # transformers 5 / 4 spelling
        rope = cfg.get(key) or {}
        if not isinstance(rope, dict) or (rope.get("rope_type") or rope.get("type") or "default") != "default":
            raise CheckpointError(f"{path}: rotary embedding {key} {rope!r}; Runtime has the default one only, "
                                  f"use compressor.load")
    cfg["rope_theta"] = float((cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0)))
    cfg.pop("quantization_config", None)
    specs = meta.get("modules", {})
    if not isinstance(specs, dict):
        raise CheckpointError(f"{path / META}: 'modules' must be an object; the file is corrupt")
    return SimpleNamespace(**cfg), specs


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
    from .machine import trim_heap
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
