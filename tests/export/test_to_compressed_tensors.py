"""compressed-tensors export: the library's own decompressor gives our weights exactly, our packing
equals its packer's, act-order and 3-bit are refused, and transformers loads the symmetric export."""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

import compressor
from compressor.export import ExportError, export

ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed (extra 'engines')")


def _scheme(cfg, name):
    from compressed_tensors.quantization import QuantizationScheme
    for g in cfg["quantization_config"]["config_groups"].values():
        if name in g["targets"]:
            return QuantizationScheme(targets=g["targets"], weights=g["weights"])
    raise KeyError(name)


@pytest.mark.parametrize("setting", ["asym4g32", "sym4g32", "sym8", "asym4g64"])
def test_library_decompresses_to_our_weights(quantized, tmp_path, setting):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    ck = quantized(setting)
    out = export(ck, "compressed-tensors", tmp_path / "ct")
    cfg = json.loads((out / "config.json").read_text())
    sd = load_file(str(out / "model.safetensors"))
    model = compressor.load(ck)
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        local = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
        scheme = _scheme(cfg, name)
        w = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        lin = model.get_submodule(name)
        ref = lin.dequantized_weight()
        # the library dequantizes in the scale's dtype: (q - z) * s is exact in fp32, so it is ours rounded once
        assert w.dtype == torch.float16 and torch.equal(w, ref.half()), name
        q, s, z, _ = lin.codes()
        off = 2 ** (lin.bits - 1)
        assert torch.equal(local["weight_packed"], pack_to_int32((q.to(torch.int16) - off).to(torch.int8), lin.bits))
        assert ("weight_zero_point" in local) == (not lin.is_sym())
    assert cfg["quantization_config"]["ignore"] == ["lm_head"]


def test_act_order_and_3_bit_are_refused(act_order, tmp_path):
    with pytest.raises(ExportError, match="act_order: false"):
        export(act_order, "compressed-tensors", tmp_path / "ct")


def test_transformers_loads_the_symmetric_export(quantized, tmp_path):
    from transformers import AutoModelForCausalLM
    ck = quantized("sym4g32")
    out = export(ck, "compressed-tensors", tmp_path / "ct")
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    x = torch.randint(3, 200, (1, 16))
    with torch.no_grad():
        got, ref = m(x).logits, compressor.load(ck)(x).logits
    assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max()) + 1e-5


@pytest.mark.parametrize("setting,mode", [("sym4g32", ""), ("asym4g64", "dequantize=True"), ("sym8", "")])
def test_transformers_engine_runs_the_export(quantized, tmp_path, setting, mode):
    """Through `compressor.export.engines` (what benchmarks/engines.py runs): sym exports in transformers'
    compressed modules, asym ones decompressed (llm-compressor#1618); NLL and greedy tokens as ours."""
    from compressor.export.engines import EngineRunner
    ck = quantized(setting)
    out = export(ck, "compressed-tensors", tmp_path / "ct")
    ids = list(range(3, 51))
    ref, eng = EngineRunner("compressor", threads=1), EngineRunner("transformers", threads=1)
    ref.load(str(ck))
    info = eng.load(str(out))
    assert info["mode"] == mode
    assert info["dense_linears"] == (14 if mode else 0), info                # 2 blocks x 7 Linears
    assert eng.nll(ids) == pytest.approx(ref.nll(ids), rel=1e-4)           # weights in fp16 once decompressed
    assert eng.greedy(ids[:8], 8)["tokens"] == ref.greedy(ids[:8], 8)["tokens"]


@pytest.mark.parametrize("setting", ["head8", "head4", "head8-untied"])
def test_quantized_head_is_written_dequantized(quantized, tmp_path, setting):
    """A head the checkpoint quantized is a float lm_head here (engines do not load it packed: see the module);
    with a tied embedding it is that embedding's matrix, stored once with tie_word_embeddings. transformers
    reads our logits back."""
    from compressor.export.engines import EngineRunner
    ck = quantized(setting)
    out = export(ck, "compressed-tensors", tmp_path / "ct")
    sd = load_file(str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    head = compressor.load(ck, for_inference=False).lm_head.dequantized_weight()
    tied = "untied" not in setting
    name = "model.embed_tokens.weight" if tied else "lm_head.weight"
    assert sd[name].dtype == torch.float32 and torch.equal(sd[name], head)        # fp16 would round it
    assert not any(k.startswith("lm_head.") for k in sd if k != name)
    assert cfg["tie_word_embeddings"] is tied and cfg["quantization_config"]["ignore"] == ["lm_head"]
    assert all("lm_head" not in g["targets"] for g in cfg["quantization_config"]["config_groups"].values())
    ids = list(range(3, 51))
    ref, eng = EngineRunner("compressor", threads=1), EngineRunner("transformers", threads=1)
    ref.load(str(ck))
    eng.load(str(out))
    got, want = torch.tensor(eng.logits(ids)), torch.tensor(ref.logits(ids))
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max()) + 1e-5


def test_a_checkpoint_whose_only_quantized_layer_is_the_head_is_refused(quantized, tmp_path):
    ck = quantized("head8-only")
    with pytest.raises(ExportError, match=f"{re.escape(str(ck))}.*one quantized layer is the head.*gptq-v2"):
        export(ck, "compressed-tensors", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
