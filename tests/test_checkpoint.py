"""Checkpoints: GPTQ config fields, exact reload, atomic writes, bad checkpoints."""
import json

import pytest
import torch

import compressor
from compressor.checkpoint import CheckpointError, atomic_dir
from compressor.nn.qlinear import QuantLinear


@pytest.mark.parametrize("recipe", ["rtn-w4g64", "rtn-w8"])
def test_save_load_exact(tiny_llama, tmp_path, recipe):
    out = tmp_path / "out"
    res = compressor.compress(str(tiny_llama), recipe, out, progress=False)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    r = compressor.recipe.load_recipe(recipe).passes[0]
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == r.bits and cfg["group_size"] == r.group_size
    assert cfg["sym"] == r.sym and cfg["desc_act"] is False
    meta = json.loads((out / "compression.json").read_text())
    assert meta["source"]["sha256"] and meta["versions"]["torch"] and meta["recipe"]["passes"][0]["pass"] == "rtn"
    assert all("sqnr_db" in meta["layers"][n] for n in meta["modules"])
    loaded = compressor.load(out)
    n_q = sum(isinstance(m, QuantLinear) for m in loaded.modules())
    assert n_q == 14  # 2 layers x 7 linears; lm_head and embedding stay float
    x = torch.randint(0, 200, (2, 33))
    with torch.no_grad():
        assert torch.equal(res.model(x).logits, loaded(x).logits)
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16
        assert "lm_head.weight" not in keys  # tied: stored once
        assert f.get_tensor("model.layers.0.mlp.down_proj.qweight").dtype == torch.int32


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_overwrite_keeps_old_until_done(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old").write_text("1")
    with pytest.raises(FileExistsError, match="--overwrite"):
        with atomic_dir(dest):
            pass
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(dest, overwrite=True):
            raise KeyboardInterrupt
    assert (dest / "old").exists()
    with atomic_dir(dest, overwrite=True) as tmp:
        (tmp / "new").write_text("2")
    assert sorted(p.name for p in dest.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_load_refuses_non_checkpoint(tiny_llama, tmp_path):
    with pytest.raises(CheckpointError, match="not a compressed checkpoint"):
        compressor.load(tiny_llama)
