"""AWQ: scale folding keeps the float model's function; the searches improve the proxy losses."""
import pytest
import torch
import torch.nn as nn

from compressor.models import load_hf
from compressor.passes import Context
from compressor.passes.awq import AWQConfig, fold_scale, search_clip, search_scale
from compressor.quant.primitives import fake_quantize, group_view
from compressor.recipe import RecipeError, parse_recipe


def test_folding_leaves_float_model_unchanged(tiny_llama, calib_file):
    model, tok = load_hf(tiny_llama)
    x = torch.randint(0, 200, (2, 48))
    with torch.no_grad():
        before = model(x).logits
    norm_w = model.model.layers[0].input_layernorm.weight.clone()
    ctx = Context(tokenizer=tok, calib_data=str(calib_file), calib_samples=8, calib_seqlen=64, progress=False)
    AWQConfig(bits=3, group_size=32, clip=False).apply(model, ctx)
    with torch.no_grad():
        after = model(x).logits
    assert not torch.equal(norm_w, model.model.layers[0].input_layernorm.weight)  # something was folded
    folded = {v["awq_folded_into"] for v in ctx.layer_stats.values()}
    assert {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"} <= folded
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_fold_scale_into_linear_and_norm():
    torch.manual_seed(0)
    up, down = nn.Linear(16, 32, bias=True), nn.Linear(32, 8)
    x = torch.randn(5, 16)
    ref = down(up(x))
    with torch.no_grad():
        fold_scale(up, [down], torch.rand(32) + 0.5)
    torch.testing.assert_close(down(up(x)), ref)


def test_search_scale_beats_no_scaling():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=g) * (torch.rand(128, generator=g) * 10) ** 2   # salient channels
    w = torch.randn(64, 128, generator=g)
    s, alpha = search_scale(x, [w], 3, 32, False)
    err = lambda wq: (x @ w.t() - x @ wq.t()).pow(2).mean()
    assert alpha > 0
    assert err(fake_quantize(w * s, 3, 32, False) / s) < 0.9 * err(fake_quantize(w, 3, 32, False))


def test_search_clip_never_worse():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(256, 64, generator=g), torch.randn(32, 64, generator=g)
    w[0, 0] = 8.0                                                           # an outlier worth clipping
    mx = search_clip(x, w, 3, 32, False).unsqueeze(-1)
    wc = torch.clamp(group_view(w, 32), -mx, mx).reshape(w.shape)
    err = lambda wq: (x @ w.t() - x @ wq.t()).pow(2).mean()
    assert err(fake_quantize(wc, 3, 32, False)) < err(fake_quantize(w, 3, 32, False))


def test_recipe_needs_matching_quantizer():
    with pytest.raises(RecipeError, match="add a quantization pass \\(rtn or gptq\\) after it"):
        parse_recipe({"passes": [{"awq": {}}]})
    with pytest.raises(RecipeError, match="searched for w4g64 but 'rtn' quantizes to w4g32"):
        parse_recipe({"passes": [{"awq": {}}, {"rtn": {"group_size": 32}}]})
    with pytest.raises(RecipeError, match="'awq' cannot follow 'rtn': after 'rtn' the model is int-quantized, and "
                                          "'awq' takes float"):
        parse_recipe({"passes": [{"rtn": {}}, {"awq": {}}]})


def test_search_clip_matches_direct_output_error():
    """The Hessian form of the clip search picks what brute-force output errors pick."""
    from compressor.passes.awq import search_clip
    from compressor.quant.primitives import fake_quantize, group_view
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 128, generator=g).double()
    w = torch.randn(8, 128, generator=g).double()
    got = search_clip(x, w, 4, 32, False, n_grid=10, max_shrink=0.5)
    wg = group_view(w, 32)
    org = wg.abs().amax(-1, keepdim=True)
    errs = []
    for i in range(5):
        mx = org * (1 - i / 10)
        q = fake_quantize(torch.clamp(wg, -mx, mx).reshape(8, 128), 4, 32, False).reshape(wg.shape)
        errs.append((torch.einsum("tgk,ngk->tng", x.reshape(-1, 4, 32), q - wg)).pow(2).mean(0))
    best = torch.stack(errs).argmin(0)                                   # (n, G)
    want = (org[..., 0] * (1 - best / 10)).float()
    torch.testing.assert_close(got, want)
