"""compressor/preflight.py: the estimate before any work, and the refusals it makes with the numbers."""
from __future__ import annotations

import time

import pytest
import torch.nn as nn

from compressor.api import compress, preflight, work_dir_for
from compressor.passes import Context
from compressor.preflight import Estimate, PreflightError, check_fits, estimate
from compressor.recipe import load_recipe, parse_recipe


def _smollm2_shaped():
    """SmolLM2-135M's shapes (30 blocks, 210 Linears) on the meta device: nothing allocated."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with init_empty_weights():
        return LlamaForCausalLM(cfg)


def test_one_impossible_group_size_in_210_layers_is_refused_fast_by_name():
    model = _smollm2_shaped()
    model.model.layers[17].mlp.down_proj = nn.Linear(1544, 576, bias=False, device="meta")
    ctx = Context(calib_data="unused.txt")
    t = time.perf_counter()
    with pytest.raises(ValueError, match=r"group_size=64 does not divide in_features of 1 layers: "
                                         r"model\.layers\.17\.mlp\.down_proj \(in_features=1544\)"):
        preflight(model, load_recipe("gptq-w4g64"), ctx)
    assert time.perf_counter() - t < 5


def test_the_estimate_grows_with_the_calibration_and_counts_the_parts():
    model = _smollm2_shaped()
    small, big = Context(calib_samples=16, calib_seqlen=512), Context(calib_samples=64, calib_seqlen=512)
    r = parse_recipe({"passes": [{"gptq": {"bits": 4, "group_size": 64}}]})
    a, b = estimate(model, r, small, rss_now=0), estimate(model, r, big, rss_now=0)
    assert b.ram["calibration stream"] == 4 * a.ram["calibration stream"] == 4 * 3 * 16 * 512 * 576 * 4
    assert b.ram["block inputs"] > a.ram["block inputs"] and b.seconds > a.seconds > 0
    rtn = estimate(model, parse_recipe({"passes": [{"rtn": {"bits": 4, "group_size": 64}}]}), small, rss_now=0)
    assert "calibration stream" not in rtn.ram and rtn.seconds < a.seconds
    # the checkpoint: 4-bit codes plus fp16 scales and zeros per 64, the tied embedding in fp16
    linears = 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536)
    assert rtn.disk == pytest.approx(linears / 2 + linears / 64 * 4 + 49152 * 576 * 2, rel=0.02)


def test_a_run_that_cannot_fit_is_refused_with_the_numbers(tmp_path):
    est = Estimate(peak_rss=3000 << 20, disk=500 << 20, seconds=60,
                   ram={"now": 1000 << 20, "calibration stream": 1500 << 20, "block inputs": 500 << 20})
    with pytest.raises(PreflightError, match=r"needs about 3,000 MiB of RAM and 2,000 MiB is available; use fewer "
                                             r"calibration windows .* take 2,000 MiB\), or compress --stream"):
        check_fits(est, tmp_path / "o", available=2000 << 20)
    with pytest.raises(PreflightError, match=r"need about 500 MiB and .* has 100 MiB free"):
        check_fits(est, tmp_path / "o", available=8000 << 20, free_disk=100 << 20)
    check_fits(est, tmp_path / "o", available=8000 << 20, free_disk=1000 << 20)


def test_compress_refuses_before_any_work(tiny_llama, calib_file, tmp_path, monkeypatch):
    import psutil
    from collections import namedtuple
    vm = namedtuple("vm", "available total")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: vm(1, 1))     # no memory to spare at all
    monkeypatch.setattr("compressor.preflight._rss", lambda: 1 << 20)
    ran = []
    monkeypatch.setattr("compressor.api.compress_", lambda *a, **k: ran.append(1))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("calibration: {samples: 8, seqlen: 64}\npasses:\n  - gptq: {bits: 4, group_size: 32}\n")
    out = tmp_path / "o"
    with pytest.raises(PreflightError, match="MiB of RAM and 1 MiB is available"):
        compress(str(tiny_llama), recipe, out, calib_data=str(calib_file), progress=False)
    assert not ran and not out.exists() and not work_dir_for(out).exists()


def test_compress_records_the_estimate_next_to_what_it_measured(tiny_llama, tmp_path):
    import json
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - rtn: {bits: 4, group_size: 32}\n")
    res = compress(str(tiny_llama), recipe, tmp_path / "o", progress=False)
    pre = json.loads((tmp_path / "o" / "compression.json").read_text())["preflight"]
    assert pre["peak_rss_mib"] == pytest.approx(res.preflight.peak_rss / 2**20, abs=0.1)
    assert pre["measured"]["peak_rss_mib"] > 0 and pre["measured"]["seconds"] > 0


def test_a_streamed_run_is_estimated_at_one_block():
    """--stream: RAM is one block plus the stream, not the model; a 7B shape fits where the whole model would not."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
    with init_empty_weights():
        model = LlamaForCausalLM(cfg)
    r = load_recipe("rtn-w4g64")
    whole = estimate(model, r, Context(), rss_now=0)
    streamed = estimate(model, r, Context(stream=object()), rss_now=0)
    block = (4 * 4096 * 4096 + 3 * 4096 * 11008) * 4
    assert streamed.ram["one block"] >= block
    assert streamed.peak_rss < 3 << 30 < 2 * whole.peak_rss
    assert "embedding" in streamed.ram and streamed.ram["embedding"] == 0      # rtn reads no embedding
