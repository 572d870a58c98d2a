"""Recipe validation: unknown passes and keys, bad values, ordering, shipped recipes."""
import pytest

from compressor.recipe import RecipeError, list_recipes, load_recipe, parse_recipe


def test_shipped_recipes_parse():
    names = list_recipes()
    assert {"rtn-w4g64", "rtn-w8"} <= set(names)
    for n in names:
        load_recipe(n)
    r = load_recipe("rtn-w4g64").passes[0]
    assert (r.name, r.bits, r.group_size, r.sym) == ("rtn", 4, 64, False)
    r = load_recipe("rtn-w8").passes[0]
    assert (r.bits, r.group_size) == (8, -1)


@pytest.mark.parametrize("data,match", [
    ({"passes": [{"nope": {}}]}, r"unknown pass 'nope'; allowed: \[.*'rtn'"),
    ({"passes": [{"rtn": {"bitz": 4}}]}, r"unknown key 'bitz' for pass 'rtn'; allowed: \[.*'bits'"),
    ({"passes": [{"rtn": {"bits": 5}}]}, r"bits=5 is not supported; allowed: \[3, 4, 8\]"),
    ({"passes": [{"rtn": {"group_size": 48}}]}, r"group_size=48 is not supported"),
    ({"passes": [{"rtn": {"targets": ["("]}}]}, r"invalid regex"),
    ({"passes": [{"rtn": {}}], "extra": 1}, r"unknown key 'extra'; allowed"),
    ({"passes": []}, r"no passes"),
    ({"passes": [{"rtn": {}}, {"rtn": {}}]}, r"'rtn' cannot follow 'rtn': after 'rtn' the model is int-quantized"),
    ({"passes": [{"rtn": {}, "gptq": {}}]}, r"one-key mapping"),
    ({"passes": [{"rtn": {}}], "calibration": {"samplez": 3}}, r"unknown key 'samplez' in calibration"),
    ([1, 2], r"a recipe is a mapping"),
])
def test_validation_errors(data, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(data)


def test_unknown_recipe_name_lists_available():
    with pytest.raises(RecipeError, match=r"unknown recipe 'nope'; available: .*rtn-w4g64"):
        load_recipe("nope")


def test_recipe_file_with_unknown_key(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("passes:\n  - rtn: {bits: 4, grp: 64}\n")
    with pytest.raises(RecipeError, match="unknown key 'grp'"):
        load_recipe(p)
    p.write_text("passes: [rtn: {bits: 4\n")
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(p)


def test_recipe_level_targets_are_defaults():
    r = parse_recipe({"ignore": ["mlp"], "passes": [{"rtn": {}}, ]})
    assert r.passes[0].ignore == ("mlp",)
    r = parse_recipe({"ignore": ["mlp"], "passes": [{"rtn": {"ignore": ["attn"]}}]})
    assert r.passes[0].ignore == ("attn",)


# --- recipe order: a walk over model states ----------------------------------------------------

@pytest.mark.parametrize("passes,states", [
    ([{"gptq": {}}, {"peqa": {}}], ["float", "int-quantized", "int-quantized"]),
    ([{"nf4": {}}, {"lora": {}}], ["float", "nf4", "adapter"]),
    ([{"awq": {}}, {"rtn": {}}], ["float", "float", "int-quantized"]),                   # a transform, a quantizer
    ([{"lora": {"save": "merged"}}, {"lora": {"save": "merged"}}], ["float", "float", "float"]),  # both keep float
    ([{"nf4": {}}, {"lora": {"save": "merged"}}], ["float", "nf4", "float"]),             # float output is saved
    ([{"awq": {}}, {"lora": {"save": "merged"}}, {"gptq": {}}], ["float", "float", "float", "int-quantized"]),
])
def test_order_accepts(passes, states):
    r = parse_recipe({"passes": passes})
    assert [s.value for s in r.states()] == states
    assert r.artifact == ("adapter" if states[-1] == "adapter" else "checkpoint")


@pytest.mark.parametrize("passes,first,second,state", [
    ([{"rtn": {}}, {"gptq": {}}], "gptq", "rtn", "int-quantized"),
    ([{"nf4": {}}, {"rtn": {}}], "rtn", "nf4", "nf4"),
    ([{"gptq": {}}, {"lora": {}}], "lora", "gptq", "int-quantized"),
    ([{"nf4": {}}, {"lora": {}}, {"peqa": {}}], "peqa", "lora", "adapter"),
    ([{"nf4": {}}, {"awq": {}}, {"rtn": {}}], "awq", "nf4", "nf4"),
])
def test_order_refusals_name_both_passes_and_states(passes, first, second, state):
    with pytest.raises(RecipeError) as e:
        parse_recipe({"passes": passes})
    msg = str(e.value)
    assert f"pass {first!r} cannot follow {second!r}: after {second!r} the model is {state}, and {first!r} takes" in msg


@pytest.fixture
def sparsify_pass():
    """A pass registered by a test, in its own code only: float -> float-sparse."""
    from dataclasses import dataclass

    from compressor.passes import FLOATS, PASSES, PassConfig, State, register_pass

    @register_pass("test-sparsify")
    @dataclass(frozen=True)
    class Sparsify(PassConfig):
        accepts = FLOATS

        def produces(self, state):
            return State.FLOAT_SPARSE
    yield Sparsify
    del PASSES["test-sparsify"]


def test_a_new_pass_declares_its_states(sparsify_pass):
    r = parse_recipe({"passes": [{"test-sparsify": {}}, {"gptq": {}}, {"peqa": {}}]})
    assert [s.value for s in r.states()] == ["float", "float-sparse", "int-quantized", "int-quantized"]
    with pytest.raises(RecipeError, match="'awq' cannot follow 'test-sparsify': after 'test-sparsify' the model is "
                                          "float-sparse, and 'awq' takes float"):
        parse_recipe({"passes": [{"test-sparsify": {}}, {"awq": {}}, {"rtn": {}}]})


def test_a_recipe_that_is_not_utf8_is_refused_by_name(tmp_path):
    from compressor.recipe import RecipeError, load_recipe
    f = tmp_path / "r.yaml"
    f.write_bytes(b"passes:\n  - rtn: {bits: \xa4}\n")
    with pytest.raises(RecipeError, match=r"r.yaml: not UTF-8 text"):
        load_recipe(f)
