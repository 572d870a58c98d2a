"""`compressor.api`: when the checks run, and on which model."""
from dataclasses import dataclass

import pytest
import torch

import compressor
from compressor.api import compress, compress_, preflight
from compressor.models import load_hf
from compressor.passes import FLOATS, PASSES, Context, PassConfig, State, register_pass
from compressor.recipe import parse_recipe


def test_a_later_pass_with_a_bad_group_size_fails_before_any_work(tiny_llama_96, tmp_path):
    """nf4 and lora change no shapes, so gptq's group size is checked against the original widths at once."""
    recipe = parse_recipe({"passes": [{"nf4": {"blocksize": 32}}, {"lora": {"save": "merged", "steps": 1}},
                                      {"gptq": {"group_size": 64}}]})
    with pytest.raises(ValueError, match=r"gptq.group_size=64 does not divide in_features of .*q_proj \(in_features=96\)"):
        compress(str(tiny_llama_96), recipe, tmp_path / "o", calib_data=__file__, train_data=__file__, progress=False)
    assert not any(tmp_path.iterdir())                       # no output, no training state


@pytest.fixture
def halve_mlp_pass(shrink_mlp):
    """A shape-changing pass registered by the test: keeps the first half of every MLP's channels."""
    @register_pass("test-halve-mlp")
    @dataclass(frozen=True)
    class HalveMLP(PassConfig):
        accepts = FLOATS
        changes_shapes = True

        def produces(self, state):
            return State.FLOAT_SPARSE

        def apply(self, model, ctx):
            shrink_mlp(model, {i: l.mlp.down_proj.in_features // 2 for i, l in enumerate(model.model.layers)})
            return model
    yield HalveMLP
    del PASSES["test-halve-mlp"]


def test_checks_run_on_the_model_each_pass_sees(tiny_llama_96, halve_mlp_pass):
    """After a shape change, the next pass is checked just before it runs, against the new widths."""
    model, _ = load_hf(tiny_llama_96)                        # intermediate 192 -> 96 after the halving
    ok = parse_recipe({"passes": [{"test-halve-mlp": {}}, {"rtn": {"group_size": 32}}]})
    preflight(model, ok)                                     # the rtn check waits for the halved model
    compress_(model, ok, Context(progress=False))
    assert model.model.layers[0].mlp.down_proj.in_features == 96
    model, _ = load_hf(tiny_llama_96)
    bad = parse_recipe({"passes": [{"test-halve-mlp": {}}, {"rtn": {"group_size": 64, "targets": ["down_proj"]}}]})
    preflight(model, bad)                                    # 192 is a multiple of 64: nothing to refuse yet
    with pytest.raises(ValueError, match=r"rtn.group_size=64 does not divide in_features of 2 layers: "
                                         r"model.layers.0.mlp.down_proj \(in_features=96\)"):
        compress_(model, bad, Context(progress=False))
