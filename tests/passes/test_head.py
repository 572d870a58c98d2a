"""The head pass: a quantized lm_head, and the tied embedding reading the same packed rows."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import compressor
from compressor.nn import QuantLinear, TiedQuantEmbedding
from compressor.passes import Context
from compressor.passes.head import HeadConfig
from compressor.recipe import Recipe, RecipeError


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    from compressor.testing import make_tiny_llama
    return make_tiny_llama(tmp_path_factory.mktemp("head") / "llama", hidden=128, inter=256, vocab=264)


def _recipe(**head):
    return Recipe.from_dict({"passes": [{"pass": "rtn", "bits": 4, "group_size": 64}, {"pass": "head", **head}]})


@pytest.mark.parametrize("head", [{"bits": 8}, {"bits": 8, "group_size": 64}, {"bits": 4, "group_size": 64, "sym": False}])
def test_tied_head_round_trip(src, tmp_path, head):
    """Stored once under lm_head, the embedding reads exactly the head's dequantized rows, and the
    reloaded model (plain and for inference) gives the in-memory model's logits."""
    base = tmp_path / "base"
    compressor.compress(str(src), Recipe.from_dict({"passes": [{"pass": "rtn", "bits": 4, "group_size": 64}]}), base,
                        progress=False)
    out = tmp_path / "out"
    compressor.compress(str(src), _recipe(**head), out, progress=False)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.qweight" in keys and not any("embed_tokens" in k for k in keys)
    saved = (base / "model.safetensors").stat().st_size - (out / "model.safetensors").stat().st_size
    v, h = 264, 128
    stored = v * h * head["bits"] // 8 + v * (h // head.get("group_size", h) if head.get("group_size", -1) != -1 else 1) * 2
    assert saved >= v * h * 2 - stored - 4096                      # the fp16 embedding's bytes, less the head's
    m = compressor.load(out, for_inference=False)
    assert isinstance(m.lm_head, QuantLinear) and isinstance(m.model.embed_tokens, TiedQuantEmbedding)
    ids = torch.randint(0, v, (2, 7))
    assert torch.equal(m.model.embed_tokens(ids), m.lm_head.dequantized_weight()[ids])
    fast = compressor.load(out)                                    # released buffers: rows from the kernel layout
    assert torch.equal(fast.model.embed_tokens(ids), m.model.embed_tokens(ids))
    with torch.inference_mode():
        torch.testing.assert_close(fast(ids).logits, m(ids).logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(fast.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False),
                       fast.generate.hf_generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False))


def test_untied_head(src, tmp_path):
    from compressor.models import load_hf
    model, _ = load_hf(src)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())     # untie
    HeadConfig().apply(model, Context(progress=False))
    assert isinstance(model.lm_head, QuantLinear) and type(model.model.embed_tokens) is torch.nn.Embedding


def test_order_and_values_refused():
    with pytest.raises(RecipeError, match="head"):
        Recipe.from_dict({"passes": [{"pass": "head"}, {"pass": "gptq"}]})
    with pytest.raises((RecipeError, ValueError), match="head.bits"):
        Recipe.from_dict({"passes": [{"pass": "head", "bits": 3}]})
