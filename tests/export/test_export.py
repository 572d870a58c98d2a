"""compressor.export: the shared checks (bad input loses nothing) and the gptq / gptq-v2 repacks."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from compressor import compress
from compressor.export import EXPORT_META, ExportError, export
from compressor.recipe import parse_recipe


def _unpack_nibbles_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Independent reader of GPTQ's qzeros: int32 (G, N*bits/32) -> (G, N), field j at bits*j."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    per = 32 // bits
    fields = [(w >> (bits * j)) & (2 ** bits - 1) for j in range(per)]
    return torch.stack(fields, dim=-1).reshape(w.shape[0], -1)


def test_v2_stores_zero_points_without_the_offset(quantized, tmp_path):
    ck = quantized("asym4g32")
    out = export(ck, "gptq-v2", tmp_path / "v2")
    v1, v2 = load_file(str(ck / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(v1) == set(v2)
    name = "model.layers.0.mlp.down_proj.qzeros"
    assert torch.equal(_unpack_nibbles_rows(v2[name], 4), _unpack_nibbles_rows(v1[name], 4) + 1)
    for k in v1:
        if not k.endswith("qzeros"):
            assert torch.equal(v1[k], v2[k]), k
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["checkpoint_format"] == "gptq_v2" and cfg["sym"] is False and cfg["group_size"] == 32
    assert json.loads((out / "quantize_config.json").read_text()) == cfg
    assert json.loads((out / EXPORT_META).read_text())["format"] == "gptq-v2"
    assert not (out / "compression.json").exists()        # not mistaken for one of ours


def test_gptq_v1_is_the_checkpoint(quantized, tmp_path):
    import compressor
    ck = quantized("sym4g32")
    out = export(ck, "gptq", tmp_path / "v1")
    assert (out / "model.safetensors").read_bytes() == (ck / "model.safetensors").read_bytes()
    x = torch.randint(0, 200, (1, 12))
    assert torch.equal(compressor.load(out)(x).logits, compressor.load(ck)(x).logits)


@pytest.mark.parametrize("setting", ["head8", "head4", "head8-untied"])
def test_gptq_exports_keep_the_quantized_head_and_write_the_tied_embedding(quantized, tmp_path, setting):
    """A head of the decoder's width stays GPTQ (the same bytes, ``lm_head: true`` for GPTQ loaders); an int8
    head of a 4-bit model becomes its float rows (GPTQModel's CPU kernels take one width); the tied
    embedding, which no loader knows, is its head's rows dequantized exactly; compressor.load reads the v1
    copy back."""
    import compressor
    ck = quantized(setting)
    src = load_file(str(ck / "model.safetensors"))
    ref = compressor.load(ck, for_inference=False)
    v1, v2 = export(ck, "gptq", tmp_path / "v1"), export(ck, "gptq-v2", tmp_path / "v2")
    t1, t2 = load_file(str(v1 / "model.safetensors")), load_file(str(v2 / "model.safetensors"))
    emb = ref.lm_head.dequantized_weight() if "untied" not in setting else ref.model.embed_tokens.weight
    bits = json.loads((ck / "compression.json").read_text())["modules"]["lm_head"]["bits"]
    for t in (t1, t2):
        assert torch.equal(t["model.embed_tokens.weight"].float(), emb)
    if bits == 8:                                         # the decoder is 4-bit: a float head
        head = {f"lm_head.{k}" for k in ("qweight", "qzeros", "scales", "g_idx")}
        for t in (t1, t2):
            assert set(t) == (set(src) - head) | {"model.embed_tokens.weight", "lm_head.weight"}
            assert torch.equal(t["lm_head.weight"].float(), ref.lm_head.dequantized_weight())
        for out in (v1, v2):
            qc = json.loads((out / "config.json").read_text())["quantization_config"]
            assert "lm_head" not in qc and not any("lm_head" in k for k in qc.get("dynamic", {}))
        assert "lm_head" not in json.loads((v1 / "compression.json").read_text())["modules"]
        x = torch.randint(0, 300, (1, 12))
        with torch.no_grad():
            got, want = compressor.load(v1)(x).logits, compressor.load(ck, for_inference=False)(x).logits
        torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=0)
        return
    for t in (t1, t2):
        assert set(t) == set(src) | {"model.embed_tokens.weight"}
    for k in ("qweight", "scales", "g_idx"):
        assert all(torch.equal(t[f"lm_head.{k}"], src[f"lm_head.{k}"]) for t in (t1, t2)), k
    z1, z2 = (_unpack_nibbles_rows(t["lm_head.qzeros"], bits) for t in (src, t2))
    assert torch.equal(z2, z1 + 1)
    for out in (v1, v2):
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert qc["lm_head"] is True and qc["dynamic"]["+:^lm_head$"]["bits"] == bits
    assert "model.embed_tokens" not in json.loads((v1 / "compression.json").read_text())["modules"]
    x = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        got, want = compressor.load(v1)(x).logits, compressor.load(ck, for_inference=False)(x).logits
    # the same numbers; TiedQuantEmbedding's output is not contiguous, so the sums run in another order
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=0)


def test_bad_input_is_refused_before_anything_is_written(quantized, tmp_path, tiny_llama):
    ck = quantized("asym4g32")
    with pytest.raises(ExportError, match="unknown export format 'onnx2'"):
        export(ck, "onnx2", tmp_path / "a")
    with pytest.raises(ExportError, match="not a compressed checkpoint"):
        export(tiny_llama, "gguf", tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export(tmp_path / "nope", "gguf", tmp_path / "c")
    with pytest.raises(ExportError, match="unknown option 'bogus'"):
        export(ck, "gguf", tmp_path / "d", bogus=1)
    (tmp_path / "e").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(ck, "gptq-v2", tmp_path / "e")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]      # nothing half-written beside it


def test_low_rank_layers_are_refused(tiny_llama, tmp_path):
    out = tmp_path / "lr"
    compress(str(tiny_llama), parse_recipe({"passes": [{"lowrank": {"method": "svd", "target": 0.7}}]}), out,
             progress=False)
    for fmt in ("gguf", "compressed-tensors", "gptq-v2"):
        with pytest.raises(ExportError, match="low-rank"):
            export(out, fmt, tmp_path / fmt)


def test_cli_export(quantized, tmp_path, capsys):
    from compressor.cli import main
    ck = quantized("asym4g32")
    assert main(["export", "gptq-v2", str(ck), "-o", str(tmp_path / "v2")]) == 0
    assert (tmp_path / "v2" / "quantize_config.json").is_file()
    assert main(["export", "gguf", str(ck), "-o", str(tmp_path / "g")]) == 2     # tiny tokenizer: pre unknown
    assert "pre_tokenizer" in capsys.readouterr().err
    assert main(["export", "gguf", str(ck), "-o", str(tmp_path / "g"), "--pre-tokenizer", "gpt-2"]) == 0
    assert (tmp_path / "g" / "model.gguf").is_file()


GPTQ_ACT = {"gptq": {"bits": 4, "group_size": 32, "sym": False, "act_order": True}}


@pytest.mark.parametrize("passes,save,match", [
    ([GPTQ_ACT], {"format": "gguf"}, "act_order: true"),
    ([GPTQ_ACT], {"format": "compressed-tensors"}, "act_order: true"),
    ([{"rtn": {"bits": 3, "group_size": 64}}], {"format": "gguf"}, "no 3-bit layout"),
    ([{"lowrank": {"method": "svd", "target": 0.7}}, {"rtn": {"bits": 4, "group_size": 32}}],
     {"format": "gptq-v2"}, "changes layer shapes"),
    ([{"lowrank": {"method": "svd", "target": 0.7}}], {"format": "gguf"}, "holds integer-quantized models"),
    ([{"rtn": {"bits": 4}}], {"format": "onnx2"}, "unknown export format 'onnx2'"),
    ([{"rtn": {"bits": 4}}], {"format": "gguf", "bogus": 1}, "unknown option 'bogus'"),
    ([{"rtn": {"bits": 4}}], "gguf", "save must be a mapping"),
    ([{"rtn": {"bits": 4, "group_size": 32}}, {"head": {"bits": 8}}], {"format": "onnx", "head": "int8"},
     "quantizes the head"),
])
def test_recipe_save_is_checked_when_the_recipe_is_read(passes, save, match):
    from compressor.recipe import RecipeError
    with pytest.raises(RecipeError, match=match):
        parse_recipe({"passes": passes, "save": save})


def test_recipe_save_round_trips():
    from compressor.recipe import Recipe
    r = parse_recipe({"passes": [{"rtn": {"bits": 4, "group_size": 64}}], "save": {"format": "gguf"}})
    assert r.save == {"format": "gguf"} and Recipe.from_dict(r.to_dict()).save == r.save
    assert "save" not in parse_recipe({"passes": [{"rtn": {"bits": 4}}]}).to_dict()


def _gguf_tensors(path):
    gguf = pytest.importorskip("gguf")
    return {t.name: bytes(t.data.tobytes()) for t in gguf.GGUFReader(str(path / "model.gguf")).tensors}


def test_compress_writes_the_recipes_format_in_one_step(tiny_bpe_llama, quantized, calib_text, tmp_path):
    from compressor.api import work_dir_for
    recipe = parse_recipe({"passes": [{"rtn": {"bits": 4, "group_size": 64, "sym": False}}],
                           "save": {"format": "gguf", "pre_tokenizer": "gpt-2"}})
    out = tmp_path / "g"
    res = compress(str(tiny_bpe_llama), recipe, out, eval_data=str(calib_text), eval_windows=1, seqlen=64,
                   progress=False)
    assert res.format == "gguf" and res.out_bytes == (out / "model.gguf").stat().st_size
    assert res.perplexity.reload_gap_pct is not None and abs(res.perplexity.reload_gap_pct) < 1e-3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]        # no work dir, no native copy left
    assert not work_dir_for(out).exists() and not (out / "compression.json").exists()
    assert json.loads((out / EXPORT_META).read_text())["options"] == {"pre_tokenizer": "gpt-2"}
    # the same bytes as exporting the separately written checkpoint of the same recipe
    ref = export(quantized("asym4g64"), "gguf", tmp_path / "ref", pre_tokenizer="gpt-2")
    assert _gguf_tensors(out) == _gguf_tensors(ref)


def test_format_argument_overrides_the_recipe_and_is_checked_before_work(tiny_bpe_llama, calib_text, tmp_path):
    from compressor.cli import main
    out = tmp_path / "v2"
    recipe = parse_recipe({"calibration": {"samples": 2, "seqlen": 32}, "passes": [GPTQ_ACT]})
    with pytest.raises(ExportError, match="act_order: true"):
        compress(str(tiny_bpe_llama), recipe, out, calib_data=str(calib_text), format="gguf", progress=False)
    assert list(tmp_path.iterdir()) == []                             # refused before any work or write
    rfile = tmp_path.parent / f"{tmp_path.name}-recipe.yaml"
    rfile.write_text("calibration: {samples: 2, seqlen: 32}\npasses:\n  - gptq: {bits: 4, group_size: 32, "
                     "act_order: true}\n")
    assert main([str(tiny_bpe_llama), "--recipe", str(rfile), "-o", str(out), "--calib-data", str(calib_text),
                 "--format", "gptq-v2", "-q"]) == 0
    cfg = json.loads((out / "quantize_config.json").read_text())
    assert cfg["checkpoint_format"] == "gptq_v2" and cfg["desc_act"] is True
    assert main([str(tiny_bpe_llama), "--recipe", str(rfile), "-o", str(tmp_path / "x"), "--format", "gptq",
                 "--pre-tokenizer", "gpt-2", "-q"]) == 2                # a gguf option for another format
