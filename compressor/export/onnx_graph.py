"""The llama decoder as an ONNX graph with a KV cache, built node by node from config.json.

Inputs and outputs are the ones optimum's ``ORTModelForCausalLM`` feeds and reads:

| name                                   | dtype   | shape                                            |
|----------------------------------------|---------|--------------------------------------------------|
| ``input_ids``                          | int64   | (batch, seq)                                     |
| ``attention_mask``                     | int64   | (batch, past + seq), 0 at padding                |
| ``position_ids``                       | int64   | (batch, seq)                                     |
| ``past_key_values.{i}.key`` / ``.value`` | float32 | (batch, kv_heads, past, head_dim); past may be 0 |
| ``num_logits_to_keep`` (optional)      | int64   | (1,): logits for the last k positions, 0 = all   |
| ``logits``                             | float32 | (batch, seq or k, vocab)                         |
| ``present.{i}.key`` / ``.value``       | float32 | (batch, kv_heads, past + seq, head_dim)          |

Per block: ``RMSNormalization`` → fused q/k/v projection → ``RotaryEmbedding`` on q and k → ONNX's
``Attention`` (opset 23: grouped-query heads, the past concatenated into the present, an additive
mask built once per call from ``attention_mask`` and the causal order) → o_proj → residual →
``RMSNormalization`` → fused gate/up → SiLU·up → down_proj → residual. Every op except the
projections is a standard opset-23 op; which node a projection becomes (``MatMulNBits``, ``MatMul``)
and its weights are the caller's (`to_onnx`), through the `linears` callback. 17 nodes per block.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

__all__ = ["OPSET", "Builder", "llama_graph"]

OPSET = 23          # Attention, RMSNormalization, RotaryEmbedding
MS_OPSET = 1        # com.microsoft: MatMulNBits
_FMIN = np.float32(np.finfo(np.float32).min)


class Builder:
    """Nodes and initializers of one graph, with unique names."""

    def __init__(self):
        self.nodes, self.inits, self._n = [], [], 0

    def op(self, op: str, inputs: list[str], n_out: int = 1, domain: str | None = None,
           outs: list[str] | None = None, **attrs: Any):
        """Append node `op`; its output names (`outs`, or made up), one string if it has one."""
        from onnx import helper
        self._n += 1
        outs = outs or [f"/{op.lower()}_{self._n}/out{j}" for j in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=f"/{op}_{self._n}", domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def ints(self, name: str, values) -> str:
        return self.const(name, np.asarray(values, dtype=np.int64))


def _mask(b: Builder) -> str:
    """(batch, 1, seq, past + seq) float32: 0 where query i (absolute position past + i) may see key j
    (j <= past + i and attention_mask[b, j] == 1), float32's minimum elsewhere (as transformers' eager
    mask: a fully padded query row stays finite)."""
    seq = b.op("Shape", ["input_ids"], start=1, end=2)                          # (1,)
    total = b.op("Shape", ["attention_mask"], start=1, end=2)                   # (1,)
    past = b.op("Sub", [total, seq])
    zero, one = b.ints("/mask/zero", 0), b.ints("/mask/one", 1)
    tot_s, past_s = b.op("Squeeze", [total]), b.op("Squeeze", [past])
    keys = b.op("Unsqueeze", [b.op("Range", [zero, tot_s, one]), b.ints("/mask/ax0", [0])])     # (1, T)
    queries = b.op("Unsqueeze", [b.op("Range", [past_s, tot_s, one]), b.ints("/mask/ax1", [1])])  # (S, 1)
    causal = b.op("LessOrEqual", [keys, queries])                                               # (S, T)
    pad = b.op("Unsqueeze", [b.op("Cast", ["attention_mask"], to=9), b.ints("/mask/ax12", [1, 2])])  # (B,1,1,T)
    allowed = b.op("And", [causal, pad])                                                        # (B,1,S,T)
    return b.op("Where", [allowed, b.const("/mask/open", np.zeros((), np.float32)),
                          b.const("/mask/shut", np.array(_FMIN))])


def llama_graph(cfg: dict[str, Any], b: Builder, tensors: Callable[[str], np.ndarray],
                linears: Callable[..., list[str]],
                embed: Callable[[Builder, str], str], head: Callable[[Builder, str, str], None]):
    """Build the whole decoder into `b`; returns (inputs, outputs) value infos.

    `tensors(name)` gives a float tensor of the checkpoint (norm weights) as float32;
    `linears(b, x, names, feeds=None)` emits the projections `names` (full module names) applied to `x`
    and returns one output per name (`feeds`: the layer those outputs reach through channelwise ops); `embed(b, ids)` and `head(b, h, out)` emit the embedding lookup
    (to float32 (batch, seq, hidden)) and the logits (into the value named `out`)."""
    from onnx import TensorProto, helper
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or hidden // heads
    eps = float(cfg.get("rms_norm_eps", 1e-6))
    cos, sin = _rope_tables(cfg, hd)
    b.const("/rope/cos", cos)
    b.const("/rope/sin", sin)
    mask = _mask(b)
    x = embed(b, "input_ids")
    pkv_in, pkv_out = [], []
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        h = b.op("RMSNormalization", [x, b.const(f"{p}.input_layernorm.weight", tensors(f"{p}.input_layernorm.weight"))],
                 axis=-1, epsilon=eps, stash_type=1)
        q, k, v = linears(b, h, [f"{p}.self_attn.{n}_proj" for n in "qkv"])
        q = b.op("RotaryEmbedding", [q, "/rope/cos", "/rope/sin", "position_ids"], num_heads=heads, interleaved=0)
        k = b.op("RotaryEmbedding", [k, "/rope/cos", "/rope/sin", "position_ids"], num_heads=kv, interleaved=0)
        names = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        present = [f"present.{i}.key", f"present.{i}.value"]
        attn = b.op("Attention", [q, k, v, mask, *names], n_out=3, outs=[f"/attn_{i}/out", *present],
                    q_num_heads=heads, kv_num_heads=kv, scale=float(hd) ** -0.5)[0]
        pkv_in += names
        pkv_out += present
        (o,) = linears(b, attn, [f"{p}.self_attn.o_proj"])
        x = b.op("Add", [x, o])
        h = b.op("RMSNormalization", [x, b.const(f"{p}.post_attention_layernorm.weight",
                                                  tensors(f"{p}.post_attention_layernorm.weight"))],
                 axis=-1, epsilon=eps, stash_type=1)
        g, u = linears(b, h, [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], feeds=f"{p}.mlp.down_proj")
        (d,) = linears(b, b.op("Mul", [b.op("Mul", [g, b.op("Sigmoid", [g])]), u]), [f"{p}.mlp.down_proj"])
        x = b.op("Add", [x, d])
    h = b.op("RMSNormalization", [x, b.const("model.norm.weight", tensors("model.norm.weight"))],
             axis=-1, epsilon=eps, stash_type=1)
    keep = b.ints("num_logits_to_keep", [0])                # an initializer that is an input: optional
    h = b.op("Slice", [h, b.op("Neg", [keep]), b.ints("/head/end", [np.iinfo(np.int64).max]), b.ints("/head/ax", [1])])
    head(b, h, "logits")

    i64 = TensorProto.INT64
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", i64, ["batch_size", "total_sequence_length"]),
              helper.make_tensor_value_info("position_ids", i64, ["batch_size", "sequence_length"])]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch_size", kv, "past_sequence_length", hd])
               for n in pkv_in]
    inputs.append(helper.make_tensor_value_info("num_logits_to_keep", i64, [1]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                             ["batch_size", "sequence_length", cfg["vocab_size"]])]
    outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch_size", kv, "total_sequence_length", hd])
                for n in pkv_out]
    return inputs, outputs


def _rope_tables(cfg: dict[str, Any], hd: int) -> tuple[np.ndarray, np.ndarray]:
    """(max_positions, head_dim / 2) cos and sin, from transformers' own rotary module (every rope
    type it knows, its attention scaling folded in), in the non-interleaved halves layout."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    conf = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "quantization_config")})
    rot = LlamaRotaryEmbedding(conf)
    n = conf.max_position_embeddings
    with torch.no_grad():
        cos, sin = rot(torch.zeros(1, dtype=torch.float32), torch.arange(n)[None])
    cos, sin = cos[0], sin[0]                                                   # (n, hd)
    if not (torch.equal(cos[:, :hd // 2], cos[:, hd // 2:]) and torch.equal(sin[:, :hd // 2], sin[:, hd // 2:])):
        raise ValueError("rotary tables are not in the halves layout RotaryEmbedding(interleaved=0) reads")
    return cos[:, :hd // 2].numpy().copy(), sin[:, :hd // 2].numpy().copy()
