"""magnitude / wanda / sparsegpt: masks against brute-force references, exact sparsity, OBS beats Wanda,
joint 2:4 + 4-bit, save/reload exact, and bad settings refused before any calibration."""
import json

import pytest
import torch
import torch.nn as nn

import compressor
from compressor.api import compress, compress_
from compressor.hessian import Hessian
from compressor.models import load_hf
from compressor.nn import QuantLinear, SparseLinear
from compressor.passes import Context
from compressor.passes.gptq import layer_output_error
from compressor.passes.sparsegpt import sparsegpt_prune
from compressor.passes.wanda import wanda_score
from compressor.quant.primitives import choose_qparams, dequantize, quantize
from compressor.recipe import RecipeError, parse_recipe
from compressor.sparsity import max_nonzeros_per_group, nm_mask, row_mask


def _recipe(entry):
    return parse_recipe({"calibration": {"samples": 8, "seqlen": 64}, "passes": [entry]})


def _ctx(tok, calib_file):
    return Context(tokenizer=tok, calib_data=str(calib_file), calib_samples=8, calib_seqlen=64, progress=False)


def _correlated(k, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, k, generator=g) @ (torch.eye(k) + 0.5 * torch.randn(k, k, generator=g) / k ** 0.5)
    X = X * torch.rand(k, generator=g).mul(3).exp()        # channels of very different scale, as in LLMs
    return X


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("how", [{"sparsity": 0.5}, {"pattern": "2:4"}])
def test_exact_sparsity_in_every_layer(tiny_llama, calib_file, name, how, one_thread):
    model, tok = load_hf(tiny_llama)
    ctx = _ctx(tok, calib_file)
    model = compress_(model, _recipe({name: how}), ctx)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert len(layers) == 14                               # 7 per block, 2 blocks
    for n, m in layers.items():
        if "sparsity" in how:
            assert float((m.weight == 0).float().mean()) == 0.5, n
        else:
            assert max_nonzeros_per_group(m.weight, 4) <= 2, n
        assert ctx.layer_stats[n]["sparsity"] == pytest.approx(0.5, abs=1e-6)


def test_magnitude_mask_is_brute_force(tiny_llama):
    model, _ = load_hf(tiny_llama)
    W = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    model = compress_(model, _recipe({"magnitude": {"sparsity": 0.5}}), Context(progress=False))
    got = model.model.layers[1].mlp.down_proj.weight != 0
    ref = torch.zeros_like(W, dtype=torch.bool)
    for r in range(W.shape[0]):                           # the 50% largest |w| of each row, by sorting
        ref[r, torch.argsort(W[r].abs(), descending=True)[: W.shape[1] // 2]] = True
    assert torch.equal(got, ref)


def test_wanda_first_layer_mask_is_the_reference(tiny_llama, calib_file, one_thread):
    """Block 0's q/k/v see the unpruned embeddings: their mask must be Wanda's |W|·‖X‖ per row,
    computed here by hand from the inputs a hook catches on the dense model."""
    model, tok = load_hf(tiny_llama)
    ctx = _ctx(tok, calib_file)
    ids = ctx.calibration()
    q = model.model.layers[0].self_attn.q_proj
    W = q.weight.detach().clone()
    xs = []
    h = q.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    h.remove()
    norm = torch.cat(xs).double().square().sum(0).sqrt()
    score = W.abs().double() * norm
    ref = torch.zeros_like(W, dtype=torch.bool)
    for r in range(W.shape[0]):
        ref[r, torch.argsort(score[r], descending=True)[: W.shape[1] // 2]] = True
    model = compress_(model, _recipe({"wanda": {"sparsity": 0.5}}), ctx)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight != 0, ref)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_beats_wanda_on_correlated_inputs(seed, nm):
    k = 128
    X = _correlated(k, seed=seed)
    W = torch.randn(64, k, generator=torch.Generator().manual_seed(50 + seed))
    H = Hessian(k)
    H.add(X)
    H = H.finish().H
    Wp, keep, _, _ = sparsegpt_prune(W, H, 0.5, nm, blocksize=32)
    score = wanda_score(W, X.square().sum(0).sqrt())
    wmask = row_mask(score, 0.5) if nm is None else nm_mask(score, *nm)
    assert torch.equal(Wp == 0, ~keep) or bool(((Wp == 0) | keep).all())
    assert float((~keep).float().mean()) == 0.5
    err_sgpt = layer_output_error(W, Wp, H)
    err_wanda = layer_output_error(W, W * wmask, H)
    assert err_sgpt < err_wanda


@pytest.mark.parametrize("nm, quant", [(None, None), ((2, 4), None), (None, (4, 32, False, True)),
                                       ((2, 4), (4, 64, True, False)), ((4, 8), (3, -1, False, False))])
def test_sub_blocked_updates_equal_the_plain_column_loop(nm, quant):
    k = 256
    X = _correlated(k, seed=3)
    W = torch.randn(48, k, generator=torch.Generator().manual_seed(3))
    H = Hessian(k)
    H.add(X)
    H = H.finish().H.double().float()
    a = sparsegpt_prune(W, H, 0.5, nm, blocksize=128, quant=quant)                   # sub-blocks of 16
    b = sparsegpt_prune(W, H, 0.5, nm, blocksize=128, quant=quant, subblock=128)     # one column at a time
    assert (a[1] == b[1]).float().mean() > 0.998                  # the same masks, up to float ties
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-4 * float(W.abs().max()))
    assert a[3] == pytest.approx(b[3], rel=1e-4)


def test_sparsegpt_joint_quant_beats_prune_then_rtn():
    k = 128
    X = _correlated(k, seed=7)
    W = torch.randn(64, k, generator=torch.Generator().manual_seed(7))
    H = Hessian(k)
    H.add(X)
    H = H.finish().H
    Wq, keep, (codes, scale, zero), _ = sparsegpt_prune(W, H, 0.5, (2, 4), blocksize=64, quant=(4, 32, False, False))
    assert torch.equal(dequantize(codes, scale, zero, 32), Wq)             # the codes are what it reports
    assert bool((Wq[~keep] == 0).all()) and max_nonzeros_per_group(Wq, 4) <= 2
    Wp, _, _, _ = sparsegpt_prune(W, H, 0.5, (2, 4), blocksize=64)
    s, z = choose_qparams(Wp, 4, 32, False)
    rtn = dequantize(quantize(Wp, s, z, 4, 32), s, z, 32)
    assert layer_output_error(W, Wq, H) < layer_output_error(W, rtn, H)


@pytest.mark.parametrize("entry", [{"wanda": {"sparsity": 0.5}},
                                   {"sparsegpt": {"pattern": "2:4", "bits": 4, "group_size": 32}}])
def test_save_reload_exact(tiny_llama, calib_file, tmp_path, entry, one_thread):
    res = compress(str(tiny_llama), _recipe(entry), tmp_path / "out", calib_data=str(calib_file), progress=False)
    x = torch.randint(0, 200, (1, 24))
    with torch.no_grad():
        mem = res.model(x).logits
        back = compressor.load(tmp_path / "out", for_inference=False)
        assert torch.equal(back(x).logits, mem)
    kind = SparseLinear if "wanda" in entry else QuantLinear
    assert sum(isinstance(m, kind) for m in back.modules()) == 14
    meta = json.loads((tmp_path / "out" / "compression.json").read_text())
    sp = [v["sparsity"] for k, v in meta["layers"].items() if "sparsity" in v]
    assert len(sp) == 14
    if "wanda" in entry:
        assert all(s == pytest.approx(0.5, abs=1e-6) for s in sp)
    else:                              # a kept weight may also round to the zero code
        assert all(0.5 <= s < 0.52 for s in sp)
        assert all(max_nonzeros_per_group(m.dequantized_weight(), 4) <= 2 for m in back.modules()
                   if isinstance(m, QuantLinear))


def test_bitmask_checkpoint_is_small(tmp_path):
    """A 50%-sparse layer of SmolLM2's width (576) in fp16 + bitmask: <= 0.6x its dense fp16 bytes."""
    from safetensors.torch import save_file
    lin = nn.Linear(576, 1536, bias=False)
    sp = SparseLinear.from_linear(lin, row_mask(lin.weight.abs(), 0.5))
    save_file(sp.state_dict(), str(tmp_path / "s.safetensors"))
    save_file({"w": lin.weight.data.half()}, str(tmp_path / "d.safetensors"))
    assert (tmp_path / "s.safetensors").stat().st_size <= 0.6 * (tmp_path / "d.safetensors").stat().st_size


@pytest.mark.parametrize("entry,match", [
    ({"wanda": {"sparsity": 0.95}}, r"sparsity=0.95 must be a number in \[0, 0.9\]"),
    ({"wanda": {"sparsity": -0.1}}, r"sparsity=-0.1"),
    ({"wanda": {}}, "either sparsity"),
    ({"sparsegpt": {"sparsity": 0.5, "pattern": "2:4"}}, "not both"),
    ({"magnitude": {"pattern": "4:2"}}, "1 <= N < M"),
    ({"magnitude": {"pattern": "2-4"}}, "must look like 'N:M'"),
    ({"wanda": {"pattern": "2:4", "allocation": "owl"}}, "needs sparsity, not a pattern"),
    ({"wanda": {"sparsity": 0.5, "allocation": "best"}}, "allocation='best'"),
    ({"sparsegpt": {"sparsity": 0.5, "bits": 5}}, "bits=5"),
])
def test_bad_settings_refused_at_parse(entry, match):
    with pytest.raises(RecipeError, match=match):
        _recipe(entry)


def test_pattern_not_dividing_in_features_is_refused_before_calibration(tiny_llama, calib_file, tmp_path,
                                                                         monkeypatch):
    """M = 3 does not divide 64: refused by the preflight, before any calibration window is read."""
    def no_calibration(self):
        raise AssertionError("calibration was read before the pattern was checked")
    monkeypatch.setattr(Context, "calibration", no_calibration)
    with pytest.raises(ValueError, match=r"M=3 does not divide in_features"):
        compress(str(tiny_llama), _recipe({"wanda": {"pattern": "2:3"}}), tmp_path / "out",
                 calib_data=str(calib_file), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("allocation", ["owl", "sensitivity"])
def test_allocation_keeps_the_overall_sparsity(tiny_llama, calib_file, allocation, one_thread):
    model, tok = load_hf(tiny_llama)
    ctx = _ctx(tok, calib_file)
    model = compress_(model, _recipe({"wanda": {"sparsity": 0.5, "allocation": allocation, "owl_lambda": 0.1}}), ctx)
    per_block = [ctx.layer_stats[f"model.layers.{b}"]["allocated_sparsity"] for b in range(2)]
    assert per_block[0] != per_block[1] and sum(per_block) / 2 == pytest.approx(0.5)
    zeros = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, SparseLinear))
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, SparseLinear))
    assert zeros / total == pytest.approx(0.5, abs=0.01)


def test_sparse_then_rtn_keeps_the_zeros(tiny_llama):
    model, _ = load_hf(tiny_llama)
    r = parse_recipe({"passes": [{"magnitude": {"sparsity": 0.5}}, {"rtn": {"bits": 4, "group_size": 32}}]})
    model = compress_(model, r, Context(progress=False))
    for m in model.modules():
        if isinstance(m, QuantLinear):
            assert float((m.dequantized_weight() == 0).float().mean()) >= 0.5
