"""PEQA: the scale-trained layer is its QuantLinear at the start, training lowers the distillation
loss, and the result is an ordinary GPTQ checkpoint."""
import json

import pytest
import torch

import compressor
from compressor.api import compress
from compressor.models import load_hf
from compressor.nn.qlinear import QuantLinear
from compressor.passes import Context
from compressor.passes.peqa import PEQAConfig, ScaleTunedLinear, grouped_weight
from compressor.passes.rtn import RTNConfig
from compressor.recipe import RecipeError, parse_recipe


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("act_order", [False, True])
def test_scale_tuned_linear_starts_as_the_quantlinear(act_order):
    torch.manual_seed(0)
    n, k, g = 32, 128, 32
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scale, zero = torch.rand(n, k // g) * 0.1 + 0.01, torch.randint(1, 16, (n, k // g)).float()
    g_idx = (torch.randperm(k) // g).to(torch.int32) if act_order else None
    ql = QuantLinear.from_codes(q, scale.half().float(), zero, 4, g, g_idx=g_idx)
    st = ScaleTunedLinear(ql)
    x = torch.randn(5, k)
    torch.testing.assert_close(st(x), ql.reference_forward(x), rtol=1e-5, atol=1e-5)
    assert (st._gather is None) != act_order
    back = st.to_quant_linear()
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(getattr(back, name), getattr(ql, name)), name
    d = torch.randn(4, 8)
    s = torch.rand(4, 2)
    torch.testing.assert_close(grouped_weight(d, s, None), grouped_weight(d, s, torch.arange(8) // 4))


def test_grouped_weight_gradient_equals_the_gathers():
    torch.manual_seed(0)
    d, g_idx = torch.randn(6, 96), torch.randperm(96) // 32
    s1 = torch.rand(6, 3, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    up = torch.randn(6, 96)
    (grouped_weight(d, s1, g_idx) * up).sum().backward()
    (d * s2[:, g_idx] * up).sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("autocast", [None, "bfloat16"])
def test_training_the_scales_lowers_the_loss_and_saves_gptq(tiny_llama, tmp_path, autocast):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog; perplexity of the compressed model"] * 150))
    recipe = parse_recipe({"passes": [{"rtn": {"bits": 4, "group_size": 32}},
                                      {"peqa": {"steps": 8, "lr": 2e-2, "warmup": 1, "batch_size": 2, "seqlen": 32,
                                                "autocast": autocast}}]})
    res = compress(str(tiny_llama), recipe, tmp_path / "o", train_data=str(text), progress=False)
    loss = res.ctx.training["peqa"]["loss"]
    assert sum(loss[-3:]) < sum(loss[:3])
    meta = json.loads((tmp_path / "o" / "compression.json").read_text())
    assert {s["type"] for s in meta["modules"].values()} == {"gptq"}
    assert all(v["peqa_mean_abs_log_gain"] > 0 for k, v in meta["layers"].items() if not k.startswith("pass:"))
    ids = torch.randint(3, 200, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(compressor.load(tmp_path / "o", for_inference=False)(ids).logits, res.model(ids).logits)


def test_needs_an_integer_quantizer_before_it():
    with pytest.raises(RecipeError, match="'peqa' cannot come first: the model starts float, and 'peqa' takes "
                                          "int-quantized"):
        parse_recipe({"passes": [{"peqa": {}}]})
    with pytest.raises(RecipeError, match="'peqa' cannot follow 'nf4': after 'nf4' the model is nf4"):
        parse_recipe({"passes": [{"nf4": {}}, {"peqa": {}}]})
    with pytest.raises(RecipeError, match="'rtn' cannot follow 'peqa': after 'peqa' the model is int-quantized"):
        parse_recipe({"passes": [{"rtn": {}}, {"peqa": {}}, {"rtn": {}}]})
    parse_recipe({"passes": [{"nf4": {}}, {"lora": {"save": "merged"}}, {"gptq": {}}, {"peqa": {}}]})
    with pytest.raises(ValueError, match="peqa.autocast='float16' is not supported; allowed: \\['bfloat16', 'null'\\]"):
        parse_recipe({"passes": [{"rtn": {}}, {"peqa": {"autocast": "float16"}}]})


def test_norms_trains_the_norm_weights_and_saves_them(tiny_llama, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog; perplexity of the compressed model"] * 150))
    recipe = parse_recipe({"passes": [{"rtn": {"bits": 4, "group_size": 32}},
                                      {"peqa": {"steps": 4, "lr": 2e-2, "warmup": 1, "batch_size": 2, "seqlen": 32,
                                                "norms": True}}]})
    before = {k: v.clone() for k, v in load_hf(tiny_llama)[0].state_dict().items() if "norm" in k}
    res = compress(str(tiny_llama), recipe, tmp_path / "o", train_data=str(text), progress=False)
    after = compressor.load(tmp_path / "o", for_inference=False).state_dict()
    assert before and all(not torch.equal(after[k], v) for k, v in before.items())
    assert all(not p.requires_grad for p in res.model.parameters())
    with pytest.raises(ValueError, match="peqa.norms='yes' must be true or false"):
        PEQAConfig(norms="yes")
