"""`compressor.layerwise`: the shared loop gives what hand-written hooks give, and advances correctly."""
from __future__ import annotations

import pytest
import torch

from compressor.layerwise import check_in_blocks, layerwise
from compressor.models import load_hf
from compressor.passes import Context, select_linears
from compressor.sequential import catch_block_inputs, input_hooks, run_block


def _model(tiny_llama):
    model, _ = load_hf(tiny_llama)
    return model, torch.randint(3, 200, (6, 24))


def test_hessian_equals_one_from_captured_inputs(tiny_llama):
    """Every group's Hessian against 2 X^T X / n of inputs captured by a plain hook on a plain forward."""
    model, ids = _model(tiny_llama)
    ref_model, _ = _model(tiny_llama)
    captured: dict[str, list[torch.Tensor]] = {}
    targets = select_linears(ref_model)
    with input_hooks(targets, lambda n, x: captured.setdefault(n, []).append(x.reshape(-1, x.shape[-1]))):
        for i in range(0, ids.shape[0], 8):
            ref_model(ids[i:i + 8], use_cache=False)
    seen = 0
    for blk in layerwise(model, ids, select_linears(model), Context(progress=False), "test"):
        assert blk.groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
        for grp in blk.groups:
            h = blk.hessian(grp)
            X = torch.cat(captured[blk.full_name(grp[0])]).double()
            torch.testing.assert_close(h.H.double(), 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-6)
            st = blk.input_stats(grp)
            torch.testing.assert_close(st.norm.double(), X.norm(dim=0), rtol=1e-4, atol=1e-6)
            seen += 1
    assert seen == 8


def test_blocks_see_the_changes_before_them(tiny_llama):
    """Zero one layer of block 0: block 1's inputs must be those of the changed model; the residual
    shortcut for the last layer must equal a full forward."""
    model, ids = _model(tiny_llama)
    targets = select_linears(model)
    nxt = []
    for blk in layerwise(model, ids, targets, Context(progress=False), "test"):
        if blk.index == 0:
            for grp in blk.groups:
                blk.hessian(grp)
            blk.linears["mlp.down_proj"].weight.data = 0.5 * blk.linears["mlp.down_proj"].weight.data
            expected = run_block(blk.module, blk.inputs)
            out = blk.advance()
            for a, b in zip(out.hidden, expected.hidden):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:
            nxt.append(blk.inputs)
    fresh = catch_block_inputs(model, ids)                    # the changed model, caught anew
    ref = run_block(model.model.layers[0], fresh)
    for a, b in zip(nxt[0].hidden, ref.hidden):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_other_changes_after_the_last_capture_force_a_real_forward(tiny_llama):
    model, ids = _model(tiny_llama)
    for blk in layerwise(model, ids, select_linears(model), Context(progress=False), "test"):
        blk.hessian(blk.groups[-1])                            # keeps outputs for the residual shortcut
        blk.linears["self_attn.o_proj"].weight.data = torch.zeros_like(blk.linears["self_attn.o_proj"].weight)
        expected = run_block(blk.module, blk.inputs)
        assert all(torch.equal(a, b) for a, b in zip(blk.advance().hidden, expected.hidden))
        break


def _halve_every_group(tiny_llama, shortcut, monkeypatch):
    """Hessians and q_proj calls of a pass that changes every group in turn, and the logits after."""
    import compressor.layerwise as lw
    monkeypatch.setattr(lw, "SHORTCUT", shortcut)
    torch.manual_seed(0)
    model, ids = _model(tiny_llama)
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for n, m in model.named_modules()
             if n.endswith("q_proj")]
    hs = {}
    for blk in layerwise(model, ids, select_linears(model), Context(progress=False), "test"):
        for grp in blk.groups:
            hs[blk.full_name(grp[0])] = blk.hessian(grp).H
            for name in grp:
                blk.linears[name].weight.data = 0.5 * blk.linears[name].weight.data
        blk.advance()
    for h in hooks:
        h.remove()
    with torch.no_grad():
        return hs, len(calls), model(ids, use_cache=False).logits


def test_the_attention_shortcut_gives_the_same_numbers_with_fewer_forwards(tiny_llama, monkeypatch):
    fast, n_fast, logits_fast = _halve_every_group(tiny_llama, True, monkeypatch)
    slow, n_slow, logits_slow = _halve_every_group(tiny_llama, False, monkeypatch)
    assert fast.keys() == slow.keys()
    for k in fast:
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-6, atol=1e-7, msg=k)
    torch.testing.assert_close(logits_fast, logits_slow, rtol=1e-6, atol=1e-6)
    assert n_fast < n_slow                                     # attention ran fewer times


def test_reference_stream_is_the_float_model(tiny_llama):
    model, ids = _model(tiny_llama)
    float_model, _ = _model(tiny_llama)
    float_in = catch_block_inputs(float_model, ids)
    for blk in layerwise(model, ids, select_linears(model), Context(progress=False), "test", reference=4):
        if blk.index == 0:
            h = blk.hessian(blk.groups[0])
            assert h.has_reference and h.n_ref == 6 * 24         # whole batches: the first holds all 6 windows
            blk.linears["mlp.up_proj"].weight.data.mul_(0.0)    # changes the quantized stream only
        else:
            want = run_block(float_model.model.layers[0], float_in)
            torch.testing.assert_close(blk.reference_outputs.hidden[0].float(),
                                       run_block(float_model.model.layers[1], want).hidden[0], rtol=1e-3, atol=1e-3)


def test_check_in_blocks(tiny_llama):
    model, _ = _model(tiny_llama)
    check_in_blocks(model, ["model.layers.0.mlp.up_proj"], "x")
    with pytest.raises(ValueError, match=r"x works on Linears inside the decoder blocks \(model.layers.\*\); "
                                         r"\['lm_head'\] lie outside"):
        check_in_blocks(model, ["lm_head"], "x")


def test_a_non_finite_calibration_stream_is_named_by_block():
    import torch
    from compressor.layerwise import _check_finite
    from compressor.passes.weight_quant import NumericError
    ok = [torch.randn(2, 8, 16), torch.randn(2, 8, 16)]
    _check_finite(ok, "model.layers.4")
    ok[1][0, 3, 5] = float("-inf")
    with pytest.raises(NumericError, match=r"model\.layers\.4: its output on calibration batch 1 has 1 NaN/Inf"):
        _check_finite(ok, "model.layers.4")
