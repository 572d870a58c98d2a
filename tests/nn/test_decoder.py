"""FastDecoder (compressor.nn.decoder): the default generate path of `compressor.load`."""
from __future__ import annotations

import logging

import pytest
import torch

import compressor
from compressor.kernels import extension
from compressor.nn import HalfLinear, QuantLinear
from compressor.nn.half import HalfEmbedding
from compressor.nn.decoder import FastDecoder, fast_path_refusal, unsupported

pytestmark = pytest.mark.skipif(extension is None, reason="the fast path runs on the C++ extension")


@pytest.fixture(scope="module")
def ckpt(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("dec") / "rtn"
    compressor.compress(str(tiny_llama), "rtn-w4g64", out, progress=False)
    return out


def test_load_installs_it_and_holds_each_weight_once(ckpt):
    m = compressor.load(ckpt)
    assert hasattr(m.generate, "fast") and unsupported(m) is None
    assert isinstance(m.lm_head, HalfLinear) and isinstance(m.model.embed_tokens, HalfEmbedding)
    assert m.model.embed_tokens.weight is m.lm_head.weight                      # the tie, in fp16, once
    q = m.model.layers[0].self_attn.q_proj
    assert q.qweight.numel() == 0 and q._released                             # GPTQ buffers dropped
    fused = m.generate.fast.layers[0][2][0]
    assert q.packed().qweight.data_ptr() == fused.data_ptr()                  # q runs on a view of fused qkv
    with pytest.raises(RuntimeError, match="for_inference=False"):
        m.state_dict()
    plain = compressor.load(ckpt, for_inference=False)
    assert not hasattr(plain.generate, "fast") and plain.model.layers[0].self_attn.q_proj.qweight.numel() > 0


@pytest.mark.parametrize("batch,exact", [(1, False), (3, True)])
def test_greedy_tokens_and_logits_equal_hf(ckpt, batch, exact, monkeypatch):
    """Batch 1, or any batch with COMPRESSOR_EXACT_DECODE=1: the same greedy tokens as HF's generate on the
    same kernels, logits within fp32 rounding."""
    if exact:
        monkeypatch.setenv("COMPRESSOR_EXACT_DECODE", "1")
    m = compressor.load(ckpt)
    plain = compressor.load(ckpt, for_inference=False)
    ids = torch.randint(3, 250, (batch, 9), generator=torch.Generator().manual_seed(batch))
    fast = m.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    hf = m.generate.hf_generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    assert torch.equal(fast, hf)
    with torch.inference_mode():
        ref = plain(fast[:, :-1]).logits[:, -1]
        dec = m.generate.fast
        caches = dec.caches(batch, 40)
        dec.forward(fast[:, :-2], 0, caches)
        logits = dec.forward(fast[:, -2:-1], fast.shape[1] - 2, caches)    # a single-token step
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 4])
def test_generate_runs_the_engine_on_the_decoders_own_tensors(ckpt, batch):
    """generate() runs `compressor.runtime.engine` over the decoder's tensors (no copy): the same tokens as the op
    path (`forward`), batch 1 and batches (fp16 cache, int8-activation steps); a request past the engine's rotary
    tables takes the op path."""
    from compressor.greedy import greedy
    m = compressor.load(ckpt)
    dec = m.generate.fast
    ids = torch.randint(3, 250, (batch, 10), generator=torch.Generator().manual_seed(11))
    out = m.generate(ids, max_new_tokens=14, min_new_tokens=14, do_sample=False)
    eng = dec.engine()
    assert eng is not None, dec._engine_why
    assert dec._engine_arrays["layers.0.0.qweight"].data_ptr() == dec._w[0].data_ptr()      # q/k/v: not copied
    caches = dec.caches(batch, 24)
    with torch.inference_mode():
        op = greedy(lambda t, pos: dec.forward(torch.from_numpy(t), pos, caches).numpy(), ids.numpy(), 14, 14,
                    m.generation_config.eos_token_id)
    assert torch.equal(out, torch.from_numpy(op))
    calls, forward = [], dec.forward
    dec.forward = lambda *a: calls.append(1) or forward(*a)
    rows = eng.rope_rows
    try:
        assert torch.equal(m.generate(ids, max_new_tokens=14, min_new_tokens=14, do_sample=False), out)
        assert not calls                                                    # the engine's
        eng.rope_rows = 16                                                  # 10 + 14 positions do not fit
        assert torch.equal(m.generate(ids, max_new_tokens=14, min_new_tokens=14, do_sample=False), out)
        assert len(calls) == 14                                             # the op path's: prompt + 13 steps
    finally:
        eng.rope_rows, dec.forward = rows, forward


def test_generate_follows_torchs_thread_count(ckpt):
    """The engine is built once, but each generate() runs on torch's threads at that call, as the op path does:
    a batch of 8 on one thread is one row group (csrc/cpu/block.h, DecodeStack), the same tokens."""
    m = compressor.load(ckpt)
    eng, threads = m.generate.fast.engine(), torch.get_num_threads()
    assert eng is not None
    ids = torch.randint(3, 250, (8, 6), generator=torch.Generator().manual_seed(5))
    out = m.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    groups = eng.decode_groups(8)
    try:
        torch.set_num_threads(1)
        assert torch.equal(m.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False), out)
        assert eng.threads == 1 and eng.decode_groups(8) == 1
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(m.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False), out)
    assert eng.threads == threads and eng.decode_groups(8) == groups
    with pytest.raises(ValueError, match="threads must be positive, got 0"):
        eng.set_threads(0)
    assert eng.threads == threads


@pytest.mark.parametrize("batch", [1, 4])
def test_caches_are_not_read_before_written(ckpt, batch):
    """`caches` are not zeroed: a prompt and its steps read only positions written before them, so caches full
    of NaN give the same logits as zeroed ones (batch 1: fp32 cache; 4: fp16, int8-activation steps)."""
    dec = compressor.load(ckpt).generate.fast
    ids = torch.randint(3, 250, (batch, 12), generator=torch.Generator().manual_seed(batch))
    out = []
    with torch.inference_mode():
        for fill in (0.0, float("nan")):
            caches = dec.caches(batch, 32)
            for k, v in caches:
                k.fill_(fill)
                v.fill_(fill)
            logits = [dec.forward(ids[:, :8], 0, caches)]
            logits += [dec.forward(ids[:, t:t + 1], t, caches) for t in range(8, 12)]
            out.append(torch.stack(logits))
    assert torch.isfinite(out[1]).all()
    assert torch.equal(out[0], out[1])


def test_batched_steps_take_int8_activations(ckpt, monkeypatch):
    """By default a step of several rows runs with int8 activations where the CPU has them (AVX-512 VNNI):
    its logits within their error of the exact ones (SQNR > 25 dB; 48 dB here), not equal; prompts exact."""
    monkeypatch.delenv("COMPRESSOR_EXACT_DECODE", raising=False)
    m = compressor.load(ckpt)
    dec = m.generate.fast
    ids = torch.randint(3, 250, (4, 10), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        ref = compressor.load(ckpt, for_inference=False)(ids).logits
        caches = dec.caches(4, 16)
        prompt = dec.forward(ids[:, :9], 0, caches)
        step = dec.forward(ids[:, 9:], 9, caches)
    torch.testing.assert_close(prompt, ref[:, 8], rtol=1e-4, atol=1e-4)      # prefill: exact
    sqnr = 10 * torch.log10(ref[:, 9].pow(2).sum() / (step - ref[:, 9]).pow(2).sum())
    if extension.int8_supported():
        assert 25 < sqnr < 80, float(sqnr)
    else:
        assert sqnr > 100, float(sqnr)


def test_eos_stops_and_pads_as_hf(ckpt):
    m = compressor.load(ckpt)
    ids = torch.randint(3, 250, (2, 6), generator=torch.Generator().manual_seed(5))
    free = m.generate(ids, max_new_tokens=12, do_sample=False)
    eos = int(free[0, 8])                            # a token row 0 emits: make it the end of sequence
    fast = m.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    hf = m.generate.hf_generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(fast, hf)


def test_other_requests_go_to_hf(ckpt, caplog):
    m = compressor.load(ckpt)
    ids = torch.randint(3, 250, (2, 5))
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    assert fast_path_refusal(m, (ids,), {"do_sample": True}) == "sampling (do_sample=True)"
    assert fast_path_refusal(m, (ids,), {"attention_mask": mask}) == "an attention mask with padding"
    assert "repetition_penalty" in fast_path_refusal(m, (ids,), {"repetition_penalty": 1.3})
    assert fast_path_refusal(m, (ids,), {"num_beams": 2}) == "beam search"
    assert fast_path_refusal(m, (ids,), {"max_new_tokens": 3, "attention_mask": torch.ones_like(ids)}) is None
    torch.manual_seed(0)
    out = m.generate(ids, max_new_tokens=4, do_sample=True, top_k=5)       # served by HF, on our kernels
    assert out.shape == (2, 9)


def test_unsupported_models_say_why(tiny_llama):
    from compressor.models import load_hf
    model, _ = load_hf(tiny_llama)
    assert "not a packed" in unsupported(model)
    with pytest.raises(ValueError, match="cannot run this model"):
        FastDecoder(model)


def test_act_order_checkpoint(tmp_path, data_dir):
    """Act-order (desc_act) layers: one permutation per shared input, gathered inside the op."""
    from compressor.testing import make_tiny_llama
    src = make_tiny_llama(tmp_path / "src", hidden=128, inter=256)      # two groups of 64: a real permutation
    out = tmp_path / "gptq"
    compressor.compress(str(src), "gptq-w4g64", out, calib_data=str(data_dir / "wikitext2-valid.tokens"),
                        progress=False)
    m = compressor.load(out)
    q = m.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.desc_act() and q.packed().perm is not None
    ids = torch.randint(3, 250, (1, 7))
    assert torch.equal(m.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False),
                       m.generate.hf_generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False))
    plain = compressor.load(out, for_inference=False)        # codes read back from the kernel layout: exact
    for a, b in zip(plain.model.layers[0].self_attn.q_proj.codes(), q.codes()):
        assert torch.equal(a, b)
    # fold_act_order_: down's permutation moved into gate/up's output order, rows and channels moved whole
    mlp, ref = m.model.layers[1].mlp, plain.model.layers[1].mlp
    order = ref.down_proj.packed().perm
    assert order is not None and mlp.down_proj.packed().perm is None and m.generate.fast.layers[1][2][18] is None
    for name in ("gate_proj", "up_proj"):
        assert torch.equal(getattr(mlp, name).codes()[0], getattr(ref, name).codes()[0][order])
    assert torch.equal(mlp.down_proj.codes()[0], ref.down_proj.codes()[0][:, order])
    with torch.inference_mode():                             # the same model: logits as the unfolded one
        torch.testing.assert_close(m(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-4)
