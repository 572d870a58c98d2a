"""GPTQ math against brute force on a tiny layer, and act-order g_idx through save and load."""
import itertools

import pytest
import torch

import compressor
from compressor.passes.gptq import gptq_quantize, layer_output_error
from compressor.quant.primitives import choose_qparams, dequantize, quantize


def _dq(q, scale, zero, g_idx):
    g = g_idx.long()
    return (q.float() - zero[:, g]) * scale[:, g]


def _correlated_hessian(k, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, k, generator=g) @ (torch.eye(k) + 0.9 * torch.randn(k, k, generator=g))
    return X.t() @ X


def test_identity_hessian_is_rtn():
    """With H = I no error can be compensated: GPTQ must give exactly the RTN codes."""
    W = torch.randn(16, 128)
    q, scale, zero, g_idx, _ = gptq_quantize(W, torch.eye(128), 4, 32, False)
    s_ref, z_ref = choose_qparams(W, 4, 32, False)
    assert torch.equal(q, quantize(W, s_ref, z_ref, 4, 32))
    assert torch.equal(scale, s_ref) and torch.equal(zero, z_ref)


@pytest.mark.parametrize("seed", range(4))
def test_against_brute_force_optimum(seed):
    """16 x 6 layer, 3 bits, fixed per-row grid: enumerate all 8^6 code vectors of each row for the
    true optimum of tr((W - Q) H (W - Q)^T). GPTQ is greedy, so it need not reach the optimum, but
    it must beat RTN and close a good part of RTN's gap to the optimum."""
    k, bits = 6, 3
    W = torch.randn(16, k, generator=torch.Generator().manual_seed(100 + seed))
    H = _correlated_hessian(k, seed=seed)
    q, scale, zero, g_idx, _ = gptq_quantize(W, H, bits, -1, False, percdamp=1e-6)
    err_gptq = layer_output_error(W, _dq(q, scale, zero, g_idx), H)
    s, z = choose_qparams(W, bits, -1, False)
    err_rtn = layer_output_error(W, dequantize(quantize(W, s, z, bits, -1), s, z, -1), H)
    codes = torch.tensor(list(itertools.product(range(2 ** bits), repeat=k)), dtype=torch.float64)
    err_opt = 0.0
    for r in range(W.shape[0]):
        D = W[r].double() - (codes - z[r].double()) * s[r].double()       # (8^6, k)
        err_opt += float(torch.einsum("nk,kl,nl->n", D, H.double(), D).min())
    assert err_opt <= err_gptq + 1e-6
    assert err_gptq < err_rtn
    assert (err_gptq - err_opt) < 0.75 * (err_rtn - err_opt)


def test_beats_rtn_on_layer_output_error():
    W = torch.randn(64, 256)
    H = _correlated_hessian(256, n=1024)
    for act_order in (False, True):
        q, scale, zero, g_idx, _ = gptq_quantize(W, H, 4, 64, False, act_order=act_order)
        s, z = choose_qparams(W, 4, 64, False)
        rtn = dequantize(quantize(W, s, z, 4, 64), s, z, 64)
        assert layer_output_error(W, _dq(q, scale, zero, g_idx), H) < 0.5 * layer_output_error(W, rtn, H)


def test_dead_columns():
    W = torch.randn(8, 64)
    H = _correlated_hessian(64)
    H[5, :] = 0
    H[:, 5] = 0
    q, scale, zero, g_idx, _ = gptq_quantize(W, H, 4, 32, False)
    assert torch.isfinite(scale).all()
    assert torch.allclose(_dq(q, scale, zero, g_idx)[:, 5], torch.zeros(8), atol=float(scale.max()))


def test_act_order_g_idx_round_trips(tiny_llama, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(["the quick brown fox jumps over the lazy dog and a model is smaller"] * 300))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("calibration: {samples: 8, seqlen: 64}\n"
                      "passes:\n  - gptq: {bits: 4, group_size: 32, act_order: true, clip_search: true}\n")
    out = tmp_path / "out"
    res = compressor.compress(str(tiny_llama), recipe, out, calib_data=str(calib), progress=False)
    import json
    assert json.loads((out / "config.json").read_text())["quantization_config"]["desc_act"] is True
    loaded = compressor.load(out, for_inference=False)
    g = loaded.model.layers[0].mlp.down_proj.g_idx
    assert not torch.equal(g, torch.arange(g.numel(), dtype=torch.int32) // 32)   # really permuted
    assert torch.equal(torch.bincount(g.long()), torch.full((g.numel() // 32,), 32))
    assert torch.equal(g, res.model.model.layers[0].mlp.down_proj.g_idx)
    x = torch.randint(0, 200, (1, 40))
    with torch.no_grad():
        assert torch.equal(res.model(x).logits, loaded(x).logits)


def test_fp_target_correction_is_least_squares():
    """W* = argmin ||X_ref W^T - X W*^T||: compare with torch.linalg.lstsq in float64."""
    from compressor.passes.gptq import fp_target_correction
    g = torch.Generator().manual_seed(0)
    n, K, N = 2048, 32, 8
    X = torch.randn(n, K, generator=g)
    X_ref = X + 0.1 * torch.randn(n, K, generator=g)
    W = torch.randn(N, K, generator=g)
    W_star = fp_target_correction(W, 2 * (X_ref - X).t() @ X / n, 2 * X.t() @ X / n, percdamp=1e-7)
    ls = torch.linalg.lstsq(X.double(), (X_ref @ W.t()).double()).solution.t()
    torch.testing.assert_close(W_star.double(), ls, rtol=1e-4, atol=1e-5)
    # identical streams: no correction at all
    torch.testing.assert_close(fp_target_correction(W, torch.zeros(K, K), 2 * X.t() @ X / n, 0.01), W)


def _fp_target_model(tiny_llama, tmp_path, samples: int):
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(["the quick brown fox jumps over the lazy dog and a model is smaller"] * 300))
    recipe = tmp_path / f"r{samples}.yaml"
    recipe.write_text("calibration: {samples: 16, seqlen: 64}\npasses:\n"
                      f"  - gptq: {{bits: 4, group_size: 32, fp_target: true, fp_target_samples: {samples}}}\n")
    return compressor.compress(str(tiny_llama), recipe, tmp_path / f"out{samples}", calib_data=str(calib),
                               progress=False).model


def test_fp_target_samples_subset(tiny_llama, tmp_path):
    """fp_target_samples covering every window is the full float stream; a subset (one batch of 8
    windows) gives a different, still finite, quantization."""
    w = lambda m: m.model.layers[1].mlp.down_proj.qweight  # noqa: E731
    full, every, sub = (_fp_target_model(tiny_llama, tmp_path, s) for s in (0, 16, 8))
    assert torch.equal(w(full), w(every))
    assert not torch.equal(w(full), w(sub))
    assert torch.isfinite(sub.model.layers[1].mlp.down_proj.scales.float()).all()


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_fp_target_samples_rejects(bad):
    from compressor.passes.gptq import GPTQConfig
    with pytest.raises(ValueError, match="fp_target_samples"):
        GPTQConfig(bits=4, group_size=64, fp_target=True, fp_target_samples=bad)
