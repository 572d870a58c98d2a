"""LoRA pass: adapters only where targeted, merge math, exact resume, adapter save/load, recipe rules."""
import json

import pytest
import torch
import torch.nn as nn

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

import compressor
import compressor.train as train_mod
from compressor.api import compress, compress_
from compressor.cli import main
from compressor.models import load_hf
from compressor.passes import Context
from compressor.passes.lora import merge_lora_weight, merge_to_float
from compressor.passes.nf4 import NF4Config
from compressor.passes.rtn import RTNConfig
from compressor.quant.primitives import sqnr_db
from compressor.recipe import RecipeError, load_recipe, parse_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = {"r": 4, "alpha": 8, "steps": 6, "lr": 5e-3, "warmup": 2, "batch_size": 2, "seqlen": 32,
         "checkpoint_every": 2}


def _recipe(**lora):
    return parse_recipe({"passes": [{"nf4": {}}, {"lora": {**SMALL, **lora}}]})


def _ids(n=24, seed=0):
    return torch.randint(3, 200, (2, n), generator=torch.Generator().manual_seed(seed))


# --- targeting ---------------------------------------------------------------------------------------

def test_adapters_attach_only_to_targeted_modules(tiny_llama, train_file, tmp_path):
    from peft.tuners.lora import LoraLayer

    def adapted(m):
        return sorted(n.removeprefix("base_model.model.") for n, x in m.named_modules() if isinstance(x, LoraLayer))

    recipe = _recipe(steps=1, targets=[r"self_attn\.(q|v)_proj$"], ignore=["layers\\.1\\."])
    res = compress(str(tiny_llama), recipe, tmp_path / "a", train_data=str(train_file), progress=False)
    want = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert adapted(res.model) == want
    trainable = {n for n, p in res.model.named_parameters() if p.requires_grad}
    assert trainable and all(".layers.0.self_attn.q_proj.lora_" in n or ".layers.0.self_attn.v_proj.lora_" in n
                             for n in trainable)
    assert adapted(compressor.load(tmp_path / "a")) == want          # the saved config keeps the selection
    # the default targets: every Linear of the decoder blocks (NF4 now), never lm_head or embeddings
    model, tok = load_hf(tiny_llama)
    model = compress_(model, _recipe(steps=1), Context(tokenizer=tok, train_data=str(train_file), progress=False))
    names = adapted(model)
    assert len(names) == 14 and not any("lm_head" in n or "embed" in n for n in names)


# --- merge -------------------------------------------------------------------------------------------

def _trained_nf4_lora(tiny_llama, train_file, **kw):
    model, tok = load_hf(tiny_llama)
    ctx = Context(tokenizer=tok, train_data=str(train_file), progress=False)
    model = compress_(model, _recipe(**kw), ctx)
    with torch.no_grad():                        # make the deltas large enough to matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    return model.eval(), ctx


def test_merge_matches_unmerged_forward(tiny_llama, train_file):
    """dequantize(NF4) + (alpha/r) B A in float gives the unmerged forward up to float rounding; after
    re-quantization (RTN w8 per channel, w4 g32) the logits stay within the quantizer's error."""
    model, ctx = _trained_nf4_lora(tiny_llama, train_file)
    x = _ids()
    with torch.no_grad():
        ref = model(input_ids=x).logits
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    from compressor.passes.nf4 import nf4_dequantize
    W = nf4_dequantize(q.base_layer.weight.data, q.base_layer.weight.quant_state)
    manual = merge_lora_weight(W, q.lora_A["default"].weight, q.lora_B["default"].weight, q.scaling["default"])
    torch.testing.assert_close(manual, W + q.get_delta_weight("default"), rtol=1e-5, atol=1e-6)

    merged = merge_to_float(model)
    kinds = {type(m) for m in merged.modules() if isinstance(m, nn.Linear)}
    assert kinds == {nn.Linear} and not getattr(merged, "is_loaded_in_4bit", False)
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, manual)
    with torch.no_grad():
        out = merged(input_ids=x).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for cfg, floor in ((RTNConfig(bits=8, group_size=-1), 30), (RTNConfig(bits=4, group_size=32), 12)):
        m = __import__("copy").deepcopy(merged)
        cfg.apply(m, Context(progress=False))
        with torch.no_grad():
            assert sqnr_db(ref, m(input_ids=x).logits) > floor, cfg


@pytest.mark.parametrize("autocast", [None, "bfloat16"])
def test_merged_recipe_writes_a_gptq_checkpoint(tiny_llama, train_file, tmp_path, autocast):
    recipe = parse_recipe({"calibration": {"samples": 4, "seqlen": 64},
                           "passes": [{"nf4": {}}, {"lora": {**SMALL, "save": "merged", "autocast": autocast}},
                                      {"gptq": {"bits": 4, "group_size": 32}}]})
    res = compress(str(tiny_llama), recipe, tmp_path / "m", calib_data=str(train_file), train_data=str(train_file),
                   progress=False)
    meta = json.loads((tmp_path / "m" / "compression.json").read_text())
    assert {s["type"] for s in meta["modules"].values()} == {"gptq"} and len(meta["modules"]) == 14
    loss = meta["training"]["lora"]["loss"]
    assert len(loss) == SMALL["steps"] and all(0 <= v < 1 for v in loss)
    loaded = compressor.load(tmp_path / "m")
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, res.model(input_ids=x).logits)
    assert not (tmp_path / "m.work").exists()


# --- adapter artifact ----------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_adapter_saved_in_peft_format_and_reloads(tiny_llama, train_file, tmp_path):
    from peft import PeftModel
    out = tmp_path / "a"
    res = compress(str(tiny_llama), _recipe(), out, train_data=str(train_file), progress=False)
    assert {"adapter_config.json", "adapter_model.safetensors", "compression.json", "tokenizer.json"} <= \
        {p.name for p in out.iterdir()}
    meta = json.loads((out / "compression.json").read_text())
    assert meta["artifact"] == "peft-adapter" and meta["source"]["sha256"]
    loss = meta["training"]["lora"]["loss"]
    assert len(loss) == SMALL["steps"] and all(0 <= v < 1 for v in loss)
    x = _ids()
    with torch.no_grad():
        ref = res.model(input_ids=x).logits
        # peft's own loader on a base quantized by the nf4 pass
        base, _ = load_hf(tiny_llama)
        NF4Config().apply(base, Context(progress=False))
        torch.testing.assert_close(PeftModel.from_pretrained(base, out).eval()(input_ids=x).logits, ref)
        torch.testing.assert_close(compressor.load(out)(input_ids=x).logits, ref)


# --- resume --------------------------------------------------------------------------------------------

def test_resume_restores_optimizer_state_and_matches_uninterrupted(tiny_llama, train_file, tmp_path, monkeypatch,
                                                                   interrupt_training):
    recipe = _recipe(dropout=0.1)                   # dropout: the RNG state must be restored too
    full = compress(str(tiny_llama), recipe, tmp_path / "full", train_data=str(train_file), progress=False)
    full_losses = full.ctx.training["lora"]["loss"]

    interrupt_training(5)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        compress(str(tiny_llama), recipe, out, train_data=str(train_file), progress=False)
    interrupt_training.undo()
    state_file = tmp_path / "run.work" / "lora-state.pt"
    assert not out.exists() and state_file.exists()
    state = torch.load(state_file, weights_only=True)
    assert state["step"] == 4 and state["losses"] == full_losses[:4]
    adam = state["optimizer"]["state"]
    assert len(adam) == 2 * 14 and all(s["exp_avg_sq"].abs().sum() > 0 and int(s["step"]) == 4 for s in adam.values())

    with pytest.raises(FileExistsError, match="pass --resume to continue it or --overwrite"):
        compress(str(tiny_llama), recipe, out, train_data=str(train_file), progress=False)

    # restoring the optimizer: after resume, Adam's moments are the saved ones, not fresh zeros
    seen = {}
    real_load = torch.optim.AdamW.load_state_dict

    def spy(self, sd):
        real_load(self, sd)
        seen.update({i: s["exp_avg"].clone() for i, s in enumerate(self.state.values())})

    monkeypatch.setattr(torch.optim.AdamW, "load_state_dict", spy)
    res = compress(str(tiny_llama), recipe, out, train_data=str(train_file), progress=False, resume=True)
    assert len(seen) == 2 * 14
    for i, s in enumerate(adam.values()):
        assert torch.equal(seen[i], s["exp_avg"])
    assert res.ctx.training["lora"]["resumed_at_step"] == 4
    assert res.ctx.training["lora"]["loss"] == full_losses             # exact, not within 1%
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(res.model(input_ids=x).logits, full.model(input_ids=x).logits, rtol=0, atol=0)
    assert not (tmp_path / "run.work").exists()


def test_resume_refuses_a_different_recipe(tiny_llama, train_file, tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "step_loss", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        compress(str(tiny_llama), _recipe(checkpoint_every=0), tmp_path / "o", train_data=str(train_file),
                 progress=False)
    assert not (tmp_path / "o.work").exists()         # nothing to resume: no state written before step 1
    monkeypatch.undo()
    real = train_mod.step_loss
    calls = []
    monkeypatch.setattr(train_mod, "step_loss",
                        lambda *a, **k: real(*a, **k) if calls.append(1) or len(calls) < 3 else
                        (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        compress(str(tiny_llama), _recipe(), tmp_path / "o", train_data=str(train_file), progress=False)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"written by a different run \(recipe: "):
        compress(str(tiny_llama), _recipe(lr=1e-3), tmp_path / "o", train_data=str(train_file), progress=False,
                 resume=True)


# --- CLI and recipe errors -------------------------------------------------------------------------------

def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr()


def test_cli_resume_without_state(capsys, tiny_llama, tmp_path):
    code, io = _cli(capsys, "--recipe", "qlora-4bit", tiny_llama, "-o", tmp_path / "o", "--resume")
    assert code == 2 and "--resume: no progress in" in io.err and len(io.err.strip().splitlines()) == 1


def test_cli_unknown_lora_field(capsys, tiny_llama, tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("passes:\n  - nf4: {}\n  - lora: {rank: 8}\n")
    code, io = _cli(capsys, "--recipe", r, tiny_llama, "-o", tmp_path / "o")
    assert code == 2 and "unknown key 'rank' for pass 'lora'; allowed: ['targets', 'ignore', 'steps'," in io.err and "'r', 'alpha'" in io.err


def test_cli_qlora_with_default_text_and_eval(capsys, tiny_llama, train_file, tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "wikitext2-valid.tokens").write_text(train_file.read_text())
    monkeypatch.setenv("COMPRESSOR_DATA", str(tmp_path / "data"))
    r = tmp_path / "q.yaml"
    r.write_text("passes:\n  - nf4: {}\n  - lora: {r: 4, steps: 3, batch_size: 2, seqlen: 32}\n")
    code, io = _cli(capsys, "--recipe", r, tiny_llama, "-o", tmp_path / "o", "--eval-data", train_file,
                    "--seqlen", "64", "--eval-windows", "2", "-q")
    assert code == 0, io.err
    assert f"using training text {tmp_path / 'data' / 'wikitext2-valid.tokens'} (pass --train-data to choose)" in io.out
    for row in ("original (fp32)", "nf4", "nf4 + lora", "perplexity by stage", "reloaded adapter vs in-memory"):
        assert row in io.out


@pytest.mark.parametrize("passes,match", [
    ([{"nf4": {}}, {"lora": {}}, {"gptq": {}}], r"'gptq' cannot follow 'lora': after 'lora' the model is adapter"),
    ([{"nf4": {}}, {"gptq": {}}, {"lora": {}}], r"'gptq' cannot follow 'nf4': after 'nf4' the model is nf4"),
    ([{"nf4": {}}, {"lora": {"save": "merged"}}, {"rtn": {}}, {"lora": {}}, {"rtn": {}}],
     r"'lora' cannot follow 'rtn': after 'rtn' the model is int-quantized, and 'lora' takes float.*nf4"),
    ([{"awq": {}}, {"nf4": {}}, {"lora": {}}], r"'nf4' comes next and is not an integer quantizer"),
    ([{"lora": {}}, {"lora": {}}], r"save: adapter must be the last pass"),
    ([{"lora": {"teacher": "student"}}], r"lora.teacher='student' is not supported; allowed: \['original', 'null'\]"),
    ([{"lora": {"save": "both"}}], r"lora.save='both' is not supported; allowed: \['adapter', 'merged'\]"),
    ([{"lora": {"r": 0}}], r"lora.r=0 must be an integer >= 1"),
    ([{"lora": {"lr": -1}}], r"lora.lr=-1 must be a positive number"),
    ([{"lora": {"dropout": 1.5}}], r"lora.dropout=1.5 must be in \[0, 1\)"),
])
def test_recipe_rules(passes, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe({"passes": passes})


def test_recipe_rules_that_pass_and_shipped_recipes():
    parse_recipe({"passes": [{"nf4": {}}, {"lora": {"save": "merged"}}, {"awq": {}}, {"gptq": {}}]})
    parse_recipe({"passes": [{"lora": {"teacher": None}}]})
    r = load_recipe("qlora-4bit")
    assert [p.name for p in r.passes] == ["nf4", "lora"] and r.artifact == "adapter"
    assert r.passes[1].r == 16 and r.passes[1].teacher.value == "original" and r.needs_original
    r = load_recipe("qlora-4bit-merged")
    assert [p.name for p in r.passes] == ["nf4", "lora", "gptq", "peqa"] and r.artifact == "checkpoint"
    assert r.passes[2].bits == 4 and r.needs_calibration and r.needs_train_data
