"""NF4 pass: bitsandbytes' own Linear4bit, checked against a plain-PyTorch NF4 reference."""
import pytest
import torch
import torch.nn as nn

pytest.importorskip("bitsandbytes")

from compressor.models import load_hf
from compressor.passes import Context
from compressor.passes.nf4 import (NF4Config, import_bnb, nf4_dequantize, nf4_quantize, nf4_reference,
                                   to_linear4bit)
from compressor.quant.primitives import sqnr_db
from compressor.recipe import RecipeError, parse_recipe

bnb = import_bnb()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("shape", [(1, 64), (3, 128), (17, 64), (64, 64), (118, 192)])
def test_bnb_nf4_equals_reference(shape):
    """Without double quantization bitsandbytes' NF4 round trip is exactly the reference; with it,
    only the 8-bit absmax differs (>= 50 dB apart), and both sit near 20 dB from the weight."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    ref = nf4_reference(w, 64)
    assert torch.equal(nf4_dequantize(*nf4_quantize(w, 64, double_quant=False)), ref)
    dq = nf4_dequantize(*nf4_quantize(w, 64, double_quant=True))
    assert sqnr_db(ref, dq) > 50
    assert 19 < sqnr_db(w, dq) < 24


def test_pass_swaps_in_bnb_linear4bit(tiny_llama):
    model, _ = load_hf(tiny_llama)
    floats = {n: m.weight.data.clone() for n, m in model.named_modules() if type(m) is nn.Linear}
    ctx = Context(progress=False)
    NF4Config().apply(model, ctx)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert set(quantized) == {n for n in floats if n != "lm_head"} and len(quantized) == 14
    assert type(model.lm_head) is nn.Linear and model.is_loaded_in_4bit
    x = torch.randn(5, 64)
    for name, q in quantized.items():
        st = q.weight.quant_state
        assert (st.quant_type, st.blocksize, st.nested) == ("nf4", 64, True)
        w_hat = nf4_dequantize(q.weight.data, st)
        assert sqnr_db(nf4_reference(floats[name], 64), w_hat) > 45
        x = torch.randn(5, q.in_features)
        q.eval()
        with torch.no_grad():                 # eval + no-grad: the path bitsandbytes would repack for bf16
            y = q(x)
        torch.testing.assert_close(y, x @ w_hat.t(), rtol=1e-5, atol=1e-5)
        assert not getattr(q.weight.quant_state, "packing_format_for_cpu", False)


def test_bf16_compute_dtype():
    lin = nn.Linear(128, 64)
    q = to_linear4bit(lin, 64, True, torch.bfloat16)
    x = torch.randn(4, 128)
    with torch.no_grad():
        y = q(x)
    assert y.dtype == torch.float32
    ref = x @ nf4_dequantize(q.weight.data, q.weight.quant_state).t() + lin.bias.detach()
    assert sqnr_db(ref, y) > 35                   # bf16 activations and weights


def test_blocksize_must_divide_rows(tiny_llama_96):
    model, _ = load_hf(tiny_llama_96)
    with pytest.raises(ValueError, match=r"blocksize=64 does not divide in_features of 12 layers: .*"
                                         r"q_proj \(in_features=96\).* block sizes that work here: \[32\]"):
        NF4Config().check(model, Context())
    NF4Config(blocksize=32).check(model, Context())


@pytest.mark.parametrize("fields,match", [
    ({"blocksize": 48}, r"nf4.blocksize=48 is not supported; allowed: \[32, 64"),
    ({"compute_dtype": "float16"}, r"nf4.compute_dtype='float16' is not supported; allowed: \['float32', 'bfloat16'\]"),
    ({"double_quant": "yes"}, r"nf4.double_quant='yes' must be true or false"),
    ({"block": 64}, r"unknown key 'block' for pass 'nf4'"),
])
def test_bad_fields(fields, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe({"passes": [{"nf4": fields}, {"lora": {}}]})


def test_nf4_alone_cannot_be_saved(tiny_llama, tmp_path):
    from compressor.api import compress
    with pytest.raises(ValueError, match=r"leaves the model nf4, which has no checkpoint format"):
        compress(str(tiny_llama), parse_recipe({"passes": [{"nf4": {}}]}), tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
    # and `save` itself refuses a model holding modules of a type with no format, naming the type
    from compressor import checkpoint
    model, tok = load_hf(tiny_llama)
    NF4Config().apply(model, Context(progress=False))
    with pytest.raises(checkpoint.CheckpointError, match=r"would not rebuild .*Linear4bit have no checkpoint format"):
        checkpoint.save(model, tok, tmp_path / "o", recipe={}, layer_stats={}, source={})
    assert not (tmp_path / "o").exists()
