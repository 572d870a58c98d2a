"""Layer-sequential helpers: the one-forward shortcuts must equal the plain forwards they replace."""
from __future__ import annotations

import pytest
import torch

from compressor.models import load_hf
from compressor.sequential import (catch_block_inputs, collect_inputs, find_blocks, group_inputs, last_group_inputs,
                                   residual_update, run_block)


def _setup(tiny_llama):
    model, _ = load_hf(tiny_llama)
    _, blocks = find_blocks(model)
    inp = catch_block_inputs(model, torch.randint(0, 200, (6, 32)), batch_size=2)
    return blocks[0], inp


def test_collect_inputs_equals_early_stopped_forwards(tiny_llama):
    block, inp = _setup(tiny_llama)
    got, out = collect_inputs(block, inp, ["self_attn.o_proj", "mlp.down_proj"])
    for name in got:
        ref = []
        group_inputs(block, inp, name, ref.append)
        assert all(torch.equal(a, b) for a, b in zip(got[name], ref))
    assert all(torch.equal(a, b) for a, b in zip(out.hidden, run_block(block, inp).hidden))


def test_residual_update_matches_a_real_forward(tiny_llama):
    block, inp = _setup(tiny_llama)
    seen = []
    x, out = last_group_inputs(block, inp, "mlp.down_proj", seen.append)
    assert len(seen) == len(inp.hidden) and seen[0] is x[0]
    lin = block.mlp.down_proj
    delta = 0.05 * torch.randn_like(lin.weight)
    lin.weight.data += delta
    fast = residual_update(block, inp, out, "mlp.down_proj", x, delta)
    real = run_block(block, inp)
    for a, b in zip(fast.hidden, real.hidden):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["self_attn.q_proj", "mlp.up_proj"])
def test_residual_update_falls_back_when_not_residual(tiny_llama, name):
    """q_proj does not reach the output through a residual sum: the check must catch it. up_proj
    alone as the last group (gate and down kept dense by a pass) outputs the MLP width, not the
    block's: it must fall back too, not fail on the reshape."""
    block, inp = _setup(tiny_llama)
    x, out = last_group_inputs(block, inp, name, lambda t: None)
    lin = block.get_submodule(name)
    delta = 0.5 * torch.randn_like(lin.weight)
    lin.weight.data += delta
    fixed = residual_update(block, inp, out, name, x, delta)
    real = run_block(block, inp)
    assert all(torch.equal(a, b) for a, b in zip(fixed.hidden, real.hidden))


def test_collect_inputs_can_store_half(tiny_llama):
    block, inp = _setup(tiny_llama)
    got, _ = collect_inputs(block, inp, ["mlp.down_proj"], store=torch.float16)
    full, _ = collect_inputs(block, inp, ["mlp.down_proj"])
    for a, b in zip(got["mlp.down_proj"], full["mlp.down_proj"]):
        assert a.dtype == torch.float16
        torch.testing.assert_close(a.float(), b, rtol=1e-3, atol=1e-4)
