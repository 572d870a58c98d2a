"""``gguf``: llama.cpp's file, written with the `gguf` package, from our codes without re-quantizing.

Blocks of 32 weights along K (ggml's Q4_0 / Q4_1 / Q8_0), each with an fp16 scale ``d``:
  * Q4_1, asymmetric 4-bit: ``x = d*q + m``, so a group of g = 32*b weights with scale s and zero z
    becomes b blocks with ``d = s`` and ``m = -s*z``. ``m`` is rounded to fp16: the one value that
    is not bit-exact (within half an fp16 ulp of s*z).
  * Q4_0, symmetric 4-bit (every zero point 8): ``x = d*(q - 8)``, ``d = s``: exact.
  * Q8_0, symmetric 8-bit (zero 128): ``x = d*q8`` with ``q8 = q - 128``, ``d = s``: exact.
  * Asymmetric 8-bit layers have no ggml block with an offset; they go to F16 (the dequantized
    weight rounded to fp16) and export.json counts them.
  * 16 nibbles per block hold codes j (low) and j + 16 (high).
Groups must be a multiple of 32 (g32, g64, g128, per channel); act-order is refused
(`Source.refuse_act_order`). Embeddings go to F16 as stored, norms to F32. llama.cpp's llama
graph expects q_proj and k_proj rows interleaved per head as llama.cpp's converter permutes them
(`_rope_rows`); permuting output rows keeps every block intact.

A quantized head (the ``head`` pass) is ``output.weight`` in its block type like any layer
(per-channel symmetric int8 is Q8_0 exactly: the row's one scale is every block's ``d``). An
embedding tied to it is not written apart: the head's blocks go in once, as ``token_embd.weight``,
and llama.cpp, finding no ``output.weight``, uses that tensor for the head too (its own tie). Its
``get_rows`` dequantizes Q8_0 and Q4_0 rows exactly, so the embedding is ours bit for bit.

The tokenizer (BPE, ``tokenizer.ggml.model: gpt2``) is written as llama.cpp's converter writes it:
the vocabulary with token types, the merges, the special token ids, the chat template, and the
pre-tokenizer named by the hash of a fixed probe text (`PRE_TOKENIZERS`; ``pre_tokenizer=``
overrides it for a tokenizer the table does not know).
"""
from __future__ import annotations

import collections
import json
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import TIED, ExportError, Source, register_export

__all__ = ["PRE_TOKENIZERS", "gguf_blocks", "rope_rows"]

GGUF_FILE = "model.gguf"

# llama.cpp's convert_hf_to_gguf.py identifies a BPE pre-tokenizer by sha256(str(tokenizer.encode(_PROBE)));
# the names are llama.cpp's `tokenizer.ggml.pre` values (a subset of its table).
_PROBE = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
          '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
          '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
          '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
}
_ARCHS = ("llama",)


def rope_rows(n: int, heads: int) -> torch.Tensor:
    """Row order llama.cpp's converter gives q_proj / k_proj: per head, the two rotary halves interleaved."""
    hd = n // heads
    return torch.arange(n).reshape(heads, 2, hd // 2).transpose(1, 2).reshape(-1)


def gguf_blocks(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int, kind: str) -> np.ndarray:
    """(N, K) codes + (N, G) scale/zero -> (N, K/32 * block bytes) uint8 rows of ggml blocks `kind`."""
    n, k = q.shape
    if k % 32 or group % 32:
        raise ExportError(f"ggml blocks are 32 weights: K={k}, group {group} must be multiples of 32")
    nb = k // 32
    s = scale.repeat_interleave(group // 32, dim=1)                    # (N, nb) per-block scale
    d = s.to(torch.float16).numpy().view(np.uint8).reshape(n, nb, 2)
    if kind == "Q8_0":
        qs = (q.to(torch.int16) - 128).to(torch.int8).numpy().view(np.uint8).reshape(n, nb, 32)
        return np.concatenate([d, qs], axis=-1).reshape(n, -1)
    qb = q.numpy().reshape(n, nb, 2, 16)
    qs = qb[:, :, 0, :] | (qb[:, :, 1, :] << np.uint8(4))
    if kind == "Q4_0":
        return np.concatenate([d, qs], axis=-1).reshape(n, -1)
    m = (-(s * zero.repeat_interleave(group // 32, dim=1))).to(torch.float16).numpy().view(np.uint8).reshape(n, nb, 2)
    return np.concatenate([d, m, qs], axis=-1).reshape(n, -1)


def _kind(name: str, spec: dict[str, Any], zero: torch.Tensor) -> str:
    bits, sym = spec["bits"], bool(spec.get("sym", False))
    if bits == 4:
        if sym and not bool((zero == 8).all()):
            raise ExportError(f"{name}: recorded symmetric but its zero points are not all 8")
        return "Q4_0" if sym else "Q4_1"
    if bits == 8:
        return "Q8_0" if sym and bool((zero == 128).all()) else "F16"
    raise ExportError(f"cannot export {name} to gguf: {bits}-bit codes have no ggml block that takes our scales "
                      f"(ggml's 2/3-bit types are k-quants with scales of their own); use 4 or 8 bits")


@register_export("gguf", engines="llama.cpp (llama-cpp-python, ollama, LM Studio)", options=("pre_tokenizer",),
                 bits=(4, 8), static_groups=True, archs=_ARCHS)
def write(src: Source, tmp: Path, options: dict[str, Any]) -> dict[str, Any]:
    import gguf
    cfg = src.config
    if cfg.get("model_type") not in _ARCHS:
        raise ExportError(f"gguf export writes the {'/'.join(_ARCHS)} architecture; this model is "
                          f"{cfg.get('model_type')!r}. Use compressed-tensors or gptq-v2 for it")
    rope = cfg.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", (cfg.get("rope_scaling") or {}).get("rope_type", "default"))
    if rope_type not in ("default", None):
        raise ExportError(f"gguf export: rope_type {rope_type!r} is not written yet; only default RoPE")
    src.require("gguf", types=("gptq", TIED))
    src.refuse_act_order("gguf")
    # a head read by a tied embedding is written once, under the embedding's name (llama.cpp's tie)
    renamed = {head: emb for emb, head in src.tied_embeddings().items()}
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    n_blocks = cfg["num_hidden_layers"]
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    w = gguf.GGUFWriter(str(tmp / GGUF_FILE), "llama")
    kinds: collections.Counter = collections.Counter()
    quantized = src.quantized()
    for name, t in src.tensors.items():
        mod, _, leaf = name.rpartition(".")
        if mod in quantized and leaf in ("qweight", "qzeros", "g_idx"):
            continue
        if mod in quantized and leaf == "scales":
            arr, kind = _quantized(src, mod, quantized[mod], heads, kv)
            raw = None if kind == "F16" else getattr(gguf.GGMLQuantizationType, kind)
            w.add_tensor(_gguf_name(tmap, f"{renamed.get(mod, mod)}.weight"), arr, raw_dtype=raw)
            kinds[kind] += 1
            continue
        t = _rope_permuted(mod, t, heads, kv)
        if t.ndim == 2 and t.is_floating_point():
            arr, kind = t.to(torch.float16).numpy(), "F16"          # embeddings, a float head
        else:
            arr, kind = t.to(torch.float32).numpy(), "F32"          # norms, biases
        w.add_tensor(_gguf_name(tmap, name), arr)
        kinds[kind] += 1
    _metadata(w, cfg, kinds, quantized)
    pre = _vocab(w, src, options.get("pre_tokenizer"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    src.copy_tokenizer(tmp)         # the GGUF carries its own; these serve HF-side tools (compress-bench)
    return {"file": GGUF_FILE, "tensor_types": dict(kinds), "pre_tokenizer": pre}


def _gguf_name(tmap, hf_name: str) -> str:
    out = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if out is None:
        raise ExportError(f"gguf export: no llama.cpp tensor name for {hf_name!r}")
    return out


def _rope_permuted(mod: str, t: torch.Tensor, heads: int, kv: int) -> torch.Tensor:
    """q_proj / k_proj tensors (weights, biases, or per-row qparams) in llama.cpp's row order."""
    if mod.endswith("self_attn.q_proj"):
        return t[rope_rows(t.shape[0], heads)]
    if mod.endswith("self_attn.k_proj"):
        return t[rope_rows(t.shape[0], kv)]
    return t


def _quantized(src: Source, name: str, spec: dict[str, Any], heads: int, kv: int):
    q, scale, zero, _ = src.codes(name)
    q, scale, zero = (_rope_permuted(name, x, heads, kv) for x in (q, scale, zero))
    kind = _kind(name, spec, zero)
    group = spec["in_features"] if spec["group_size"] == -1 else spec["group_size"]
    if kind == "F16":
        g = torch.arange(spec["in_features"]) // group
        return ((q.float() - zero[:, g]) * scale[:, g]).to(torch.float16).numpy(), kind
    return gguf_blocks(q, scale, zero, group, kind), kind


def _metadata(w, cfg: dict[str, Any], kinds, quantized) -> None:
    import gguf
    rope = cfg.get("rope_parameters") or {}
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w.add_name(str(cfg.get("_name_or_path") or "compressed model").rsplit("/", 1)[-1])
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(cfg.get("num_key_value_heads", heads))
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(head_dim)
    main = max((k for k in kinds if k.startswith("Q")), key=lambda k: kinds[k], default="F16")
    w.add_file_type(int(getattr(gguf.LlamaFileType, f"MOSTLY_{main}")))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _vocab(w, src: Source, pre: str | None) -> str:
    """The tokenizer, as llama.cpp's converter writes a GPT-2-style BPE vocabulary."""
    import gguf
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(src.path)
    vocab_size = src.config["vocab_size"]
    if pre is None:
        h = sha256(str(tok.encode(_PROBE)).encode()).hexdigest()
        pre = PRE_TOKENIZERS.get(h)
        if pre is None:
            raise ExportError(f"gguf export: this tokenizer's pre-tokenizer is not one compressor knows "
                              f"(probe hash {h[:16]}...); pass pre_tokenizer= (compress export --pre-tokenizer "
                              f"NAME) with llama.cpp's name for it, e.g. llama-bpe, qwen2, gpt-2")
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        t = reverse.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif t in added:
            special = decoder[i].special if i in decoder else False
            types.append(gguf.TokenType.CONTROL if special or (t.startswith("<|") and t.endswith("|>"))
                         else gguf.TokenType.USER_DEFINED)
            tokens.append(t)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    merges = (json.loads((src.path / "tokenizer.json").read_text()).get("model", {}).get("merges")
              if (src.path / "tokenizer.json").is_file() else None)
    special = gguf.SpecialVocab(src.path, load_merges=bool(merges), n_vocab=vocab_size)
    if not special.merges:
        raise ExportError(f"gguf export: {src.path}'s tokenizer has no BPE merges; llama.cpp's gpt2 tokenizer "
                          f"refuses a file without them (and gguf cannot write an empty list)")
    special.add_to_gguf(w, quiet=True)
    return pre
