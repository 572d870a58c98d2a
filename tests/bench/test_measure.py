"""compressor/bench/measure.py: the greedy loop against `model.generate`, the peak-RSS meter, the
Measurer's commands in this process and in a worker process (the protocol is tests/test_worker.py's)."""
import pytest
import torch

from compressor.bench import measure
from compressor.bench.measure import LocalWorker, PeakRSS, ProcessWorker, RunSample, WorkerError, greedy, rss_bytes

MIB = 2 ** 20


@pytest.mark.parametrize("batch, prompt_len, gen_len", [(1, 1, 2), (3, 7, 5), (2, 17, 9)])
def test_greedy_matches_generate(tiny_llama, batch, prompt_len, gen_len):
    from compressor.models import load_hf
    model, _ = load_hf(tiny_llama)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    tokens, prefill_s, decode_s = greedy(model, ids, gen_len)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, min_new_tokens=gen_len,
                         max_new_tokens=gen_len, pad_token_id=0)[:, prompt_len:]
    assert tokens.shape == (batch, gen_len)
    assert torch.equal(tokens, ref)
    assert prefill_s > 0 and decode_s > 0
    again, prefill3, _ = greedy(model, ids, gen_len, prefill_reps=3)   # the median of 3 prompt forwards
    assert torch.equal(again, ref) and prefill3 > 0


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_on_the_fast_path_matches_its_generate(tiny_llama, tmp_path, batch):
    """On `compressor.load`'s model the loop times what ``generate`` runs (the engine, or the op path where the
    engine cannot run): the same tokens either way."""
    import compressor
    from compressor.kernels import extension
    if extension is None:
        pytest.skip("the fast path runs on the C++ extension")
    compressor.compress(str(tiny_llama), "rtn-w4g64", tmp_path / "q", progress=False)
    model = compressor.load(tmp_path / "q")
    fast = model.generate.fast
    ids = torch.randint(3, model.config.vocab_size, (batch, 9), generator=torch.Generator().manual_seed(3))
    ref = model.generate(ids, do_sample=False, min_new_tokens=8, max_new_tokens=8, pad_token_id=0)[:, 9:]
    assert fast.engine() is not None, fast._engine_why
    tokens, prefill_s, decode_s = greedy(model, ids, 8)
    assert torch.equal(tokens, ref) and prefill_s > 0 and decode_s > 0
    fast._engine, fast._engine_why = None, "off for this test"                 # the op path
    assert torch.equal(greedy(model, ids, 8)[0], ref)


def _touch(nbytes):
    return torch.ones(nbytes // 4, dtype=torch.float32)    # written, so resident


@pytest.mark.parametrize("exact", [True, False])
def test_peak_rss_sees_the_block_only(monkeypatch, exact):
    if not exact:
        monkeypatch.setattr(measure, "_reset_peak", lambda: False)   # the psutil sampler path
    big = _touch(256 * MIB)                                         # an earlier, higher peak ...
    del big
    before = rss_bytes()
    with PeakRSS() as p:
        x = _touch(64 * MIB)
        import time
        time.sleep(0.05)
        del x
    assert 48 * MIB < p.peak - before < 160 * MIB                   # ... is not counted
    assert p.exact == (exact and measure._reset_peak())


def test_run_sample_rates():
    s = RunSample(batch=4, prefill_s=0.5, decode_s=2.0, peak_rss=0)
    assert s.prefill_tok_s(128) == 4 * 128 / 0.5
    assert s.decode_tok_s(65) == 4 * 64 / 2.0          # the first token belongs to the prefill


def test_local_worker_commands(tiny_llama):
    w = LocalWorker(threads=1)
    info = w.call("load", path=str(tiny_llama))
    assert info["kind"] == "hf" and info["rss_load"] > 0
    assert info["kernels"] == ""                        # an HF model runs on torch's own Linear
    s = RunSample(**w.call("generate", batch=2, prompt_len=5, gen_len=3, seed=0))
    assert s.batch == 2 and s.peak_rss > 0
    with pytest.raises(ValueError, match="unknown worker command 'nope'"):
        w.call("nope")


def test_process_worker_reports_errors(tmp_path):
    w = ProcessWorker(threads=1, label="m")
    try:
        with pytest.raises(WorkerError, match="m: load failed: "):
            w.call("load", path=str(tmp_path / "nothing-here"))
    finally:
        w.close()


def test_process_worker_reports_the_checkpoint_kernels(tiny_w8):
    from compressor import kernels
    w = ProcessWorker(threads=1, label="w8")
    try:
        info = w.call("load", path=str(tiny_w8))
        assert info["kind"] == "checkpoint" and info["kernels"] == kernels.backend()
        assert RunSample(**w.call("generate", batch=1, prompt_len=3, gen_len=2, seed=0)).batch == 1
    finally:
        w.close()
