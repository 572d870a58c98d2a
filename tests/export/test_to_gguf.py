"""gguf export: every tensor read back by the gguf package's own reader and dequantizer equals ours
(Q4_0, Q8_0 bit-exact; Q4_1 exact but for its fp16 offset m = -s*z), the tokenizer travels, act-order
is refused, and llama.cpp (the `llama` extra) gives the logits compressor.load gives."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import compressor
from compressor.export import ExportError, export
from compressor.export.to_gguf import rope_rows

gguf = pytest.importorskip("gguf")


def _read(path):
    r = gguf.GGUFReader(str(path / "model.gguf"))
    return r, {t.name: t for t in r.tensors}


def _ours(ck, name: str, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Our dequantized weight of `name` in llama.cpp's row order, and the Q4_1 form of it (fp16 offsets)."""
    m = compressor.load(ck)
    lin = m.get_submodule(name)
    q, s, z, g = lin.codes()
    g = g.long()
    rows = torch.arange(lin.out_features)
    if name.endswith("q_proj"):
        rows = rope_rows(lin.out_features, cfg["num_attention_heads"])
    if name.endswith("k_proj"):
        rows = rope_rows(lin.out_features, cfg["num_key_value_heads"])
    w = ((q.float() - z[:, g]) * s[:, g])[rows]
    w_q41 = (s[:, g] * q.float() + (-(s * z)).half().float()[:, g])[rows]
    return w, w_q41


@pytest.mark.parametrize("setting,kind", [("asym4g32", "Q4_1"), ("asym4g64", "Q4_1"), ("sym4g32", "Q4_0"),
                                          ("sym8", "Q8_0")])
def test_weights_read_back_exactly(quantized, tmp_path, setting, kind):
    ck = quantized(setting)
    out = export(ck, "gguf", tmp_path / "g", pre_tokenizer="gpt-2")
    cfg = json.loads((ck / "config.json").read_text())
    _, tensors = _read(out)
    names = {"model.layers.1.self_attn.q_proj": "blk.1.attn_q.weight",
             "model.layers.0.self_attn.k_proj": "blk.0.attn_k.weight",
             "model.layers.0.mlp.down_proj": "blk.0.ffn_down.weight"}
    for hf, gg in names.items():
        t = tensors[gg]
        assert t.tensor_type.name == kind, (gg, t.tensor_type.name)
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        w, w41 = _ours(ck, hf, cfg)
        assert got.shape == w.shape
        if kind == "Q4_1":
            assert torch.equal(got, w41), gg
            assert float((got - w).abs().max()) <= float(w.abs().max()) * 2 ** -10
        else:
            assert torch.equal(got, w), gg
    emb = torch.from_numpy(np.array(tensors["token_embd.weight"].data)).float()
    ref = compressor.load(ck).model.embed_tokens.weight
    assert tensors["token_embd.weight"].tensor_type.name == "F16" and torch.equal(emb, ref)
    norm = torch.from_numpy(np.array(tensors["blk.0.attn_norm.weight"].data))
    assert norm.dtype == torch.float32


def test_tokenizer_and_metadata_travel(quantized, tmp_path, tiny_llama):
    from transformers import AutoTokenizer
    ck = quantized("asym4g32")
    out = export(ck, "gguf", tmp_path / "g", pre_tokenizer="gpt-2")
    r, _ = _read(out)
    f = r.fields
    tok = AutoTokenizer.from_pretrained(ck)
    tokens = [bytes(f["tokenizer.ggml.tokens"].parts[i]).decode() for i in f["tokenizer.ggml.tokens"].data]
    assert tokens[:len(tok)] == [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    assert f["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert f["tokenizer.ggml.model"].contents() == "gpt2"
    merges = json.loads((ck / "tokenizer.json").read_text())["model"]["merges"]
    assert (len(f["tokenizer.ggml.merges"].data) if "tokenizer.ggml.merges" in f else 0) == len(merges)
    assert f["tokenizer.ggml.bos_token_id"].contents() == tok.bos_token_id
    cfg = json.loads((ck / "config.json").read_text())
    assert f["llama.attention.head_count_kv"].contents() == cfg["num_key_value_heads"]
    assert f["llama.block_count"].contents() == cfg["num_hidden_layers"]
    assert f["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_1)


def test_chat_template_travels(quantized, tmp_path):
    ck = quantized("asym4g32")
    tpl = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    (ck / "chat_template.jinja").write_text(tpl)
    try:
        out = export(ck, "gguf", tmp_path / "g", pre_tokenizer="gpt-2")
    finally:
        (ck / "chat_template.jinja").unlink()
    r, _ = _read(out)
    assert r.fields["tokenizer.chat_template"].contents() == tpl


def test_act_order_is_refused_naming_the_option(act_order, tmp_path):
    with pytest.raises(ExportError, match="act_order: false"):
        export(act_order, "gguf", tmp_path / "g", pre_tokenizer="gpt-2")
    assert not (tmp_path / "g").exists()


def test_unknown_pre_tokenizer_names_the_option(quantized, tmp_path):
    with pytest.raises(ExportError, match="pre_tokenizer="):
        export(quantized("asym4g32"), "gguf", tmp_path / "g")


def _llama_cpp_logits(llama_cpp, out, ids):
    llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), n_ctx=64, logits_all=True, n_threads=1, verbose=False)
    llm.eval(ids)
    return torch.tensor(np.array(llm.scores[:len(ids)]), dtype=torch.float32)


def test_llama_cpp_gives_our_logits(quantized, tmp_path):
    """Smoke test in the real engine (`pip install .[llama]`, scripts/install-llama-cpp.sh)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (extra 'llama')")
    for setting in ("asym4g32", "sym4g32"):
        ck = quantized(setting)
        out = export(ck, "gguf", tmp_path / setting, pre_tokenizer="gpt-2")
        ids = list(range(3, 35))
        got = _llama_cpp_logits(llama_cpp, out, ids)
        with torch.no_grad():
            ref = compressor.load(ck)(torch.tensor([ids])).logits[0]
        err = float((got - ref).norm() / ref.norm())
        assert err < 2e-2, (setting, err)             # llama.cpp quantizes activations to 8 bits
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_llama_cpp_runner_greedy_reads_the_last_logits(quantized, tmp_path):
    """`EngineRunner` decodes with the head on the last position only; its tokens must be the argmax
    of the all-position logits of the same sequence (teacher forced)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (extra 'llama')")
    from compressor.export.engines import EngineRunner
    out = export(quantized("asym4g32"), "gguf", tmp_path / "g", pre_tokenizer="gpt-2")
    r = EngineRunner("llama.cpp", threads=1, context=64)
    r.load(str(out))
    prompt = list(range(5, 17))
    toks = r.greedy(prompt, 8)["tokens"]
    full = torch.tensor(r.logits(prompt + toks[:-1]))
    assert full[len(prompt) - 1:].argmax(-1).tolist() == toks
    assert r.greedy(prompt, 8)["tokens"] == toks                 # the cache is reset between runs


def test_float_model_writes_an_f16_gguf(tiny_bpe_llama, tmp_path):
    """`Source.float_model`: the uncompressed model as F16 GGUF (the input of llama.cpp's own quantizer in
    benchmarks/llama_equal_bits.py); every Linear is its fp16 weight, q/k rows in llama.cpp's order."""
    from safetensors.torch import load_file

    from compressor.export import Source
    from compressor.export.to_gguf import write
    write(Source.float_model(tiny_bpe_llama), tmp_path, {"pre_tokenizer": "gpt-2"})
    r, t = _read(tmp_path)
    w = load_file(str(next(tiny_bpe_llama.glob("*.safetensors"))))
    cfg = json.loads((tiny_bpe_llama / "config.json").read_text())
    assert t["blk.0.ffn_up.weight"].tensor_type.name == "F16"
    got = torch.from_numpy(np.array(t["blk.1.attn_q.weight"].data)).float()
    want = w["model.layers.1.self_attn.q_proj.weight"][rope_rows(cfg["hidden_size"], cfg["num_attention_heads"])]
    assert torch.equal(got, want.half().float())


@pytest.mark.parametrize("setting,kind", [("head8", "Q8_0"), ("head4", "Q4_1"), ("head8-untied", "Q8_0")])
def test_quantized_head_in_its_block_type_and_llama_cpp_ties_it(quantized, tmp_path, setting, kind):
    """A quantized head keeps its blocks (per-channel int8: Q8_0, exact); tied, they are written once as
    token_embd and llama.cpp uses them for the head too. llama.cpp gives compressor.load's logits."""
    ck = quantized(setting)
    out = export(ck, "gguf", tmp_path / "g", pre_tokenizer="gpt-2")
    _, tensors = _read(out)
    tied = "untied" not in setting
    assert ("output.weight" in tensors) is not tied
    t = tensors["token_embd.weight" if tied else "output.weight"]
    assert t.tensor_type.name == kind
    got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
    w, w41 = _ours(ck, "lm_head", json.loads((ck / "config.json").read_text()))
    assert torch.equal(got, w41 if kind == "Q4_1" else w)
    if not tied:
        assert tensors["token_embd.weight"].tensor_type.name == "F16"
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (extra 'llama')")
    ids = list(range(3, 35))
    got = _llama_cpp_logits(llama_cpp, out, ids)
    with torch.no_grad():
        ref = compressor.load(ck)(torch.tensor([ids])).logits[0]
    err = float((got - ref).norm() / ref.norm())
    assert err < 2e-2, (setting, err)             # llama.cpp quantizes activations to 8 bits
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
