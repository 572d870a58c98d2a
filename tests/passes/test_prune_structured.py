"""prune-structured: tensors really shrink, the checkpoint loads in plain transformers, GQA is respected,
the least-squares refit beats plain slicing, and impossible widths are refused before calibration."""
import pytest
import torch
import torch.nn as nn

import compressor
from compressor.api import compress
from compressor.passes.gptq import layer_output_error
from compressor.passes.prune_structured import refit
from compressor.recipe import RecipeError, parse_recipe


def _recipe(*entries):
    return parse_recipe({"calibration": {"samples": 8, "seqlen": 64}, "passes": list(entries)})


def test_mlp_and_heads_shrink_and_load_in_transformers(tiny_llama, calib_file, tmp_path, one_thread):
    from transformers import AutoModelForCausalLM
    r = _recipe({"prune-structured": {"mlp": 0.25, "heads": 1, "multiple_of": 32, "fp_target": True}})
    res = compress(str(tiny_llama), r, tmp_path / "out", calib_data=str(calib_file), progress=False)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()      # plain LlamaForCausalLM
    assert (hf.config.intermediate_size, hf.config.num_attention_heads, hf.config.num_key_value_heads) == (96, 2, 2)
    layer = hf.model.layers[1]
    assert layer.mlp.gate_proj.weight.shape == (96, 64) and layer.mlp.down_proj.weight.shape == (64, 96)
    assert layer.self_attn.q_proj.weight.shape == (32, 64) and layer.self_attn.o_proj.weight.shape == (64, 32)
    assert layer.self_attn.k_proj.weight.shape == (32, 64)                     # both KV groups kept
    x = torch.randint(0, 200, (1, 20))
    with torch.no_grad():
        assert torch.equal(hf(x).logits, res.model(x).logits)
        assert torch.equal(compressor.load(tmp_path / "out", for_inference=False)(x).logits, res.model(x).logits)


def test_kv_group_removal_then_rtn(tiny_llama, calib_file, tmp_path, one_thread):
    r = _recipe({"prune-structured": {"kv_groups": 1}}, {"rtn": {"bits": 4, "group_size": 32}})
    res = compress(str(tiny_llama), r, tmp_path / "out", calib_data=str(calib_file), progress=False)
    back = compressor.load(tmp_path / "out", for_inference=False)
    attn = back.model.layers[0].self_attn
    assert (attn.k_proj.out_features, attn.q_proj.out_features) == (16, 32)   # 1 KV group, its 2 query heads
    x = torch.randint(0, 200, (1, 20))
    with torch.no_grad():
        assert torch.equal(back(x).logits, res.model(x).logits)


def test_per_layer_widths_reload_through_compressor_load(tiny_llama, calib_file, tmp_path, one_thread):
    r = _recipe({"prune-structured": {"mlp": 0.25, "multiple_of": 16, "per_layer": True}})
    res = compress(str(tiny_llama), r, tmp_path / "out", calib_data=str(calib_file), progress=False)
    widths = [m.mlp.down_proj.in_features for m in res.model.model.layers]
    assert all(w % 16 == 0 and w <= 128 for w in widths) and sum(widths) < 256
    back = compressor.load(tmp_path / "out", for_inference=False)
    assert [m.mlp.down_proj.in_features for m in back.model.layers] == widths
    x = torch.randint(0, 200, (1, 20))
    with torch.no_grad():
        assert torch.equal(back(x).logits, res.model(x).logits)


def test_refit_beats_slicing():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4096, 64, generator=g) @ (torch.eye(64) + 0.3 * torch.randn(64, 64, generator=g))
    H = 2 * X.t() @ X / X.shape[0]
    W = torch.randn(32, 64, generator=g)
    keep = torch.zeros(64, dtype=torch.bool)
    keep[::4] = keep[1::4] = keep[2::4] = True
    sliced = W * keep
    fit = torch.zeros_like(W)
    fit[:, keep] = refit(W, H, keep, percdamp=1e-6)
    assert layer_output_error(W, fit, H) < 0.9 * layer_output_error(W, sliced, H)
    # the refit is the least-squares optimum: no random perturbation does better
    base = layer_output_error(W, fit, H)
    for _ in range(5):
        p = fit.clone()
        p[:, keep] += 1e-3 * torch.randn(32, int(keep.sum()), generator=g)
        assert layer_output_error(W, p, H) >= base - 1e-6


@pytest.mark.parametrize("entry,match", [
    ({"mlp": 1.0}, r"mlp=1.0 must be a fraction in \[0, 1\)"),
    ({}, "nothing to remove"),
    ({"heads": -1}, "heads=-1"),
    ({"mlp": 0.25, "heads": 1, "per_layer": True}, "per_layer applies to MLP widths only"),
])
def test_bad_settings_refused_at_parse(entry, match):
    with pytest.raises(RecipeError, match=match):
        _recipe({"prune-structured": entry})


@pytest.mark.parametrize("entry,match", [
    ({"heads": 2}, "would remove every query head of a KV group"),
    ({"kv_groups": 2}, "would remove every KV group"),
    ({"mlp": 0.9, "multiple_of": 64}, "would leave an MLP width of 0"),
    ({"mlp": 0.1, "multiple_of": 64}, "removes nothing"),
])
def test_impossible_widths_refused_before_calibration(tiny_llama, calib_file, tmp_path, monkeypatch, entry, match):
    from compressor.passes import Context

    def no_calibration(self):
        raise AssertionError("calibration was read before the widths were checked")
    monkeypatch.setattr(Context, "calibration", no_calibration)
    with pytest.raises(ValueError, match=match):
        compress(str(tiny_llama), _recipe({"prune-structured": entry}), tmp_path / "out",
                 calib_data=str(calib_file), progress=False)
    assert not (tmp_path / "out").exists()
