"""lowrank: SVD-LLM's truncation identity, rank search on target, save/reload exact, composition with
gptq and distill, and bad settings refused before any work."""
import json

import pytest
import torch

import compressor
from compressor.api import compress, compress_
from compressor.hessian import Hessian
from compressor.models import load_hf
from compressor.nn import LowRankLinear, QuantLinear
from compressor.passes import Context
from compressor.passes.lowrank import (allocate_ranks, factorize, kept_params, output_fisher, spectrum, truncation_loss,
                                       whitener)
from compressor.recipe import RecipeError, parse_recipe


def _recipe(*entries):
    return parse_recipe({"calibration": {"samples": 8, "seqlen": 64}, "passes": list(entries)})


def _correlated(k, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, k, generator=g) @ (torch.eye(k) + 0.5 * torch.randn(k, k, generator=g) / k ** 0.5)
    return X * torch.rand(k, generator=g).mul(3).exp()


def _hessian(X):
    h = Hessian(X.shape[1])
    h.add(X)
    return h.finish().H


@pytest.mark.parametrize("rank", [4, 16, 40])
def test_svd_llm_truncation_loss_is_the_discarded_singular_values(rank):
    """‖(W - BA) X‖² (through H) equals Σ of the discarded σ² of W S, S Sᵀ = H (SVD-LLM, Theorem 1)."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(48, 64, generator=g, dtype=torch.float64)
    H = _hessian(_correlated(64).double())
    S = whitener(H, percdamp=1e-9)
    A, B = factorize(W, rank, S)
    sig = spectrum(W, S)
    direct = truncation_loss(W, (B.double() @ A.double()), S @ S.T)
    assert direct == pytest.approx(float(sig[rank:].square().sum()), rel=1e-4)
    # and no other rank-r matrix does better: plain SVD's factors lose more on the same inputs
    A0, B0 = factorize(W, rank)
    assert truncation_loss(W, B0.double() @ A0.double(), S @ S.T) > direct


@pytest.mark.parametrize("rank", [4, 16])
def test_fisher_weighted_fit_is_the_discarded_singular_values(rank):
    """With output weights r: ‖diag(r)(W - BA)S‖² is the discarded σ² of diag(r) W S, and beats the unweighted fit."""
    g = torch.Generator().manual_seed(2)
    W = torch.randn(48, 64, generator=g, dtype=torch.float64)
    S = whitener(_hessian(_correlated(64).double()), percdamp=1e-9)
    r = torch.rand(48, generator=g, dtype=torch.float64).mul(4).exp()
    A, B = factorize(W, rank, S, r)
    loss = lambda A, B: float((r[:, None] * (W - B.double() @ A.double()) @ S).square().sum())
    assert loss(A, B) == pytest.approx(float(spectrum(W, S, r)[rank:].square().sum()), rel=1e-4)
    assert loss(A, B) < loss(*factorize(W, rank, S))


def test_output_fisher_is_the_mean_squared_output_gradient(tiny_llama, calib_file, one_thread):
    model, tok = load_hf(tiny_llama)
    ctx = Context(tokenizer=tok, calib_data=str(calib_file), calib_samples=3, calib_seqlen=32, progress=False)
    ids = ctx.calibration()
    name = "model.layers.1.mlp.down_proj"
    lin = model.get_submodule(name)
    f = output_fisher(model, ids, {name: lin})[name]
    want = torch.zeros(lin.out_features, dtype=torch.float64)
    for x in ids:                                   # direct: keep the layer output and take its gradient
        out = {}
        h = lin.register_forward_hook(lambda m, a, y: (y.retain_grad(), out.update(y=y))[-1])
        model(input_ids=x[None], labels=x[None]).loss.backward()
        h.remove()
        want += out["y"].grad.reshape(-1, lin.out_features).double().square().sum(0)
    model.zero_grad()
    torch.testing.assert_close(f, want / len(ids), rtol=1e-4, atol=1e-12)


def test_svd_is_eckart_young():
    W = torch.randn(30, 20, dtype=torch.float64)
    A, B = factorize(W, 7)
    sig = torch.linalg.svdvals(W)
    assert float((W - B.double() @ A.double()).square().sum()) == pytest.approx(float(sig[7:].square().sum()),
                                                                                rel=1e-5)


def test_rank_search_hits_the_target_within_one_percent():
    g = torch.Generator().manual_seed(0)
    shapes = {f"l{i}.{n}": s for i in range(6) for n, s in
              {"q": (576, 576), "k": (192, 576), "v": (192, 576), "up": (1536, 576), "down": (576, 1536)}.items()}
    layers = {n: (o, i, torch.rand(min(o, i), generator=g).sort(descending=True).values ** (1 + j % 3))
              for j, (n, (o, i)) in enumerate(shapes.items())}
    for target in (0.5, 0.8, 0.9):
        ranks = allocate_ranks(layers, target, multiple=8)
        total = sum(o * i for o, i in shapes.values())
        assert abs(kept_params(shapes, ranks) / total - target) <= 0.01
        for n, r in ranks.items():
            o, i = shapes[n]
            assert r is None or (r % 8 == 0 and r * (o + i) < o * i), (n, r)


def test_rank_search_keeps_a_flat_spectrum_dense_and_truncates_a_steep_one():
    flat, steep = torch.ones(192), torch.logspace(0, -6, 192)
    ranks = allocate_ranks({"k": (192, 576, flat), "big": (1536, 576, torch.logspace(0, -6, 576)),
                            "v": (192, 576, steep)}, 0.6)
    assert ranks["k"] is None and ranks["v"] is not None and ranks["big"] is not None


@pytest.mark.parametrize("method", ["svd", "asvd", "svd-llm"])
def test_save_reload_exact_and_ranks_recorded(tiny_llama, calib_file, tmp_path, method, one_thread):
    res = compress(str(tiny_llama), _recipe({"lowrank": {"method": method, "target": 0.7}}), tmp_path / "out",
                   calib_data=str(calib_file), progress=False)
    x = torch.randint(0, 200, (1, 24))
    with torch.no_grad():
        mem = res.model(x).logits
        back = compressor.load(tmp_path / "out", for_inference=False)
        assert torch.equal(back(x).logits, mem)
    low = [m for m in back.modules() if isinstance(m, LowRankLinear)]
    assert low and all(m.rank % 8 == 0 for m in low)
    meta = json.loads((tmp_path / "out" / "compression.json").read_text())
    # one rank step of a 128x64 layer is 2% of this tiny model (the 1% bar is checked at SmolLM2's shapes above)
    assert 0.67 <= meta["layers"]["lowrank"]["kept_fraction"] <= 0.7
    assert all(meta["layers"][n]["rank"] == m.rank for n, m in back.named_modules() if isinstance(m, LowRankLinear))


def test_svd_llm_beats_svd_on_the_model(tiny_llama, calib_file, one_thread):
    """On the tiny llama's own inputs, whitening loses less of the blocks' output than plain SVD."""
    errs = {}
    for method in ("svd", "svd-llm"):
        model, tok = load_hf(tiny_llama)
        ctx = Context(tokenizer=tok, calib_data=str(calib_file), calib_samples=8, calib_seqlen=64, progress=False)
        ids = ctx.calibration()
        with torch.no_grad():
            ref = model(ids).logits.log_softmax(-1)
            model = compress_(model, _recipe({"lowrank": {"method": method, "target": 0.6}}), ctx)
            errs[method] = float(torch.nn.functional.kl_div(model(ids).logits.log_softmax(-1), ref, log_target=True,
                                                            reduction="batchmean"))
    assert errs["svd-llm"] < 0.7 * errs["svd"], errs


def test_lowrank_then_gptq_quantizes_both_factors(tiny_llama, calib_file, tmp_path, one_thread):
    """With ranks on multiples of the group size, so that each B factor's input width takes the groups."""
    recipe = _recipe({"lowrank": {"method": "svd-llm", "target": 0.8, "multiple": 32}},
                     {"gptq": {"bits": 4, "group_size": 32}})
    res = compress(str(tiny_llama), recipe, tmp_path / "out", calib_data=str(calib_file), progress=False)
    low = [m for m in res.model.modules() if isinstance(m, LowRankLinear)]
    assert low and all(isinstance(m.a, QuantLinear) and isinstance(m.b, QuantLinear) for m in low)
    x = torch.randint(0, 200, (1, 24))
    with torch.no_grad():
        assert torch.equal(compressor.load(tmp_path / "out", for_inference=False)(x).logits, res.model(x).logits)
        m = low[0]                                    # the dense view dequantizes both factors
        xin = torch.randn(3, m.in_features, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(xin @ m.weight.T, m(xin), rtol=2e-2, atol=2e-2)


def test_fixed_rank_and_dense_when_no_saving(tiny_llama, one_thread):
    """rank 32 on 64x64 / 128x64 layers: 64x64 at rank 32 saves nothing (32·128 = 64·64) and stays dense."""
    model, _ = load_hf(tiny_llama)
    model = compress_(model, _recipe({"lowrank": {"method": "svd", "rank": 32}}), Context(progress=False))
    low = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert low and all(m.rank == 32 and m.in_features != m.out_features for m in low.values())


@pytest.mark.parametrize("entry, match", [
    ({"lowrank": {"target": 1.2}}, r"target=1.2 must be .* in \(0, 1\)"),
    ({"lowrank": {"target": 0}}, r"target=0 must be"),
    ({"lowrank": {"method": "pca"}}, r"method='pca' is not one of"),
    ({"lowrank": {"rank": 0}}, r"rank=0 must be a positive integer"),
    ({"lowrank": {"fisher_windows": -1}}, r"fisher_windows=-1 must be an integer >= 0"),
])
def test_bad_settings_refused_at_parse(entry, match):
    with pytest.raises(RecipeError, match=match):
        _recipe(entry)


def test_rank_above_min_dim_refused_before_work(tiny_llama, calib_file, tmp_path, monkeypatch):
    def no_calibration(self):
        raise AssertionError("calibration was read before the rank was checked")
    monkeypatch.setattr(Context, "calibration", no_calibration)
    with pytest.raises(ValueError, match=r"rank=100 is larger than min\(out, in\)"):
        compress(str(tiny_llama), _recipe({"lowrank": {"method": "svd-llm", "rank": 100}}), tmp_path / "out",
                 calib_data=str(calib_file), progress=False)
    assert not (tmp_path / "out").exists()


def test_factorizing_a_quantized_layer_is_refused_before_work():
    with pytest.raises(RecipeError, match=r"lowrank"):
        _recipe({"rtn": {"bits": 4, "group_size": 32}}, {"lowrank": {"target": 0.8}})


def test_lowrank_then_distill_trains_the_factors_and_keeps_the_ranks(tiny_llama, calib_file, train_file, tmp_path,
                                                                    one_thread):
    small = {"steps": 10, "lr": 3e-3, "warmup": 1, "batch_size": 2, "seqlen": 32, "checkpoint_every": 0, "top_k": 16}
    first = compress(str(tiny_llama), _recipe({"lowrank": {"method": "svd-llm", "target": 0.7}}), tmp_path / "l",
                     calib_data=str(calib_file), progress=False).model
    res = compress(str(tiny_llama), _recipe({"lowrank": {"method": "svd-llm", "target": 0.7}}, {"distill": small}),
                   tmp_path / "o", calib_data=str(calib_file), train_data=str(train_file), progress=False)
    log = res.ctx.training["distill"]
    assert sum(log["loss"][-3:]) < sum(log["loss"][:3])
    before = {n: m for n, m in first.named_modules() if isinstance(m, LowRankLinear)}
    after = {n: m for n, m in res.model.named_modules() if isinstance(m, LowRankLinear)}
    assert {n: m.rank for n, m in after.items()} == {n: m.rank for n, m in before.items()}
    assert any(not torch.equal(m.a.weight, before[n].a.weight) for n, m in after.items())
    x = torch.randint(0, 200, (1, 24))
    with torch.no_grad():
        assert torch.equal(compressor.load(tmp_path / "o", for_inference=False)(x).logits, res.model(x).logits)


def test_factorizing_a_pruned_layer_is_refused_before_work():
    with pytest.raises(RecipeError, match=r"pass 'lowrank' cannot follow 'wanda'"):
        _recipe({"wanda": {"sparsity": 0.5}}, {"lowrank": {"target": 0.8}})
