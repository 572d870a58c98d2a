"""compressor/passes/weight_quant.py: the numeric self-check every quantizing pass runs before anything is
written: a packing that does not give back the pass's own weights, or NaN/Inf anywhere, stops the run by name."""
from __future__ import annotations

import pytest
import torch

from compressor.api import compress, work_dir_for
from compressor.passes.weight_quant import NumericError, self_check
from compressor.quant.primitives import choose_qparams, quantize


def _layer(n=32, k=64, g=32):
    w = torch.randn(n, k)
    scale, zero = choose_qparams(w, 4, g, sym=False)
    return w, quantize(w, scale, zero, 4, g), scale, zero


def _fake(q, scale, zero, g):
    idx = torch.arange(q.shape[1]) // g
    return (q.float() - zero[:, idx]) * scale.half().float()[:, idx]


def test_self_check_passes_the_exact_weights_and_names_a_layer_that_differs():
    w, q, scale, zero = _layer()
    deq = _fake(q, scale, zero, 32)
    self_check("model.layers.3.mlp.up_proj", w, q, scale, zero, 32, None, deq)
    deq[5, 17] += 1e-3
    with pytest.raises(NumericError, match=r"model\.layers\.3\.mlp\.up_proj: packed weights do not dequantize .* "
                                           r"row 5, column 17"):
        self_check("model.layers.3.mlp.up_proj", w, q, scale, zero, 32, None, deq)


def test_self_check_names_non_finite_numbers():
    w, q, scale, zero = _layer()
    w[0, 0] = float("nan")
    with pytest.raises(NumericError, match=r"layers\.0\.q_proj: 1 non-finite values in its float weight"):
        self_check("layers.0.q_proj", w, q, scale, zero, 32, None, _fake(q, scale, zero, 32))


@pytest.mark.parametrize("recipe", ["passes:\n  - rtn: {bits: 4, group_size: 32}\n",
                                    "calibration: {samples: 4, seqlen: 32}\npasses:\n  - gptq: {bits: 4, group_size: 32}\n"])
def test_a_nan_weight_stops_the_run_before_any_work(tiny_llama, calib_file, tmp_path, monkeypatch, recipe):
    import compressor.api as api
    real = api.load_hf

    def poisoned(*a, **k):
        model, tok = real(*a, **k)
        with torch.no_grad():
            model.model.layers[1].mlp.gate_proj.weight[3, 4] = float("inf")
        return model, tok
    monkeypatch.setattr(api, "load_hf", poisoned)
    r = tmp_path / "r.yaml"
    r.write_text(recipe)
    out = tmp_path / "o"
    with pytest.raises(NumericError, match=r"model\.layers\.1\.mlp\.gate_proj\.weight: 1 NaN/Inf values"):
        compress(str(tiny_llama), r, out, calib_data=str(calib_file), progress=False)
    assert not out.exists()


def test_non_finite_calibration_activations_stop_the_run_naming_the_block(tiny_llama, calib_file, tmp_path,
                                                                        monkeypatch):
    """A block whose output goes NaN (here: its norm weight poisoned after the preflight) stops the loop."""
    import compressor.layerwise as lw
    real = lw.catch_block_inputs

    def poison(model, ids):
        with torch.no_grad():
            model.model.layers[0].post_attention_layernorm.weight[0] = float("nan")
        return real(model, ids)
    monkeypatch.setattr(lw, "catch_block_inputs", poison)
    r = tmp_path / "r.yaml"
    r.write_text("calibration: {samples: 4, seqlen: 32}\npasses:\n  - gptq: {bits: 4, group_size: 32}\n")
    out = tmp_path / "o"
    with pytest.raises(NumericError, match=r"model\.layers\.0\.mlp\.gate_proj: its calibration inputs hold NaN/Inf"):
        compress(str(tiny_llama), r, out, calib_data=str(calib_file), progress=False)
    assert not out.exists()
