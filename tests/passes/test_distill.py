"""distill: it lowers the loss after pruning and quantization, masks and codes hold, the checkpoint
reloads, resume is exact (also after a SIGKILL), and bad settings fail before training."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import compressor
import compressor.train as train_mod
from compressor.api import compress
from compressor.nn import QuantLinear, SparseLinear
from compressor.recipe import RecipeError, parse_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"steps": 8, "lr": 3e-3, "warmup": 1, "batch_size": 2, "seqlen": 32, "checkpoint_every": 2, "top_k": 16}
CAL = {"samples": 8, "seqlen": 64}


def _recipe(first, **distill):
    return parse_recipe({"calibration": CAL, "passes": [first, {"distill": {**SMALL, **distill}}]})


def _run(tiny_llama, recipe, out, files, **kw):
    return compress(str(tiny_llama), recipe, out, calib_data=str(files[0]), train_data=str(files[1]),
                    progress=False, **kw)


@pytest.fixture
def files(calib_file, train_file):
    return calib_file, train_file


def _sparse(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


@pytest.mark.parametrize("how", [{"sparsity": 0.5}, {"pattern": "2:4"}])
def test_after_pruning_the_masks_hold_exactly_and_the_loss_falls(tiny_llama, files, tmp_path, how):
    pruned = compress(str(tiny_llama), parse_recipe({"calibration": CAL, "passes": [{"wanda": how}]}),
                      tmp_path / "p", calib_data=str(files[0]), progress=False)
    masks = {n: m.mask.clone() for n, m in _sparse(pruned.model).items()}
    res = _run(tiny_llama, _recipe({"wanda": how}, steps=12, divergence="js", ce=1.0), tmp_path / "o", files)
    log = res.ctx.training["distill"]
    assert sum(log["loss"][-3:]) < sum(log["loss"][:3])
    after = _sparse(res.model)
    assert set(after) == set(masks)
    for n, m in after.items():
        assert torch.equal(m.mask, masks[n]), n                       # not one weight more or less
        assert torch.equal(m.weight, m.weight.half().float())          # fp16-exact, as stored
    moved = sum(float((m.weight - pruned.model.get_submodule(n).weight).abs().sum()) for n, m in after.items())
    assert moved > 0                                                   # the kept weights did train
    back = compressor.load(tmp_path / "o")
    for n, m in _sparse(back).items():
        assert torch.equal(m.weight, after[n].weight), n
    meta = json.loads((tmp_path / "o" / "compression.json").read_text())
    assert meta["training"]["distill"]["tokens"] == 12 * 2 * 32


def test_after_rtn_it_trains_scales_and_norms_and_keeps_the_codes(tiny_llama, files, tmp_path):
    first = {"rtn": {"bits": 4, "group_size": 32}}
    base = compress(str(tiny_llama), parse_recipe({"passes": [first]}), tmp_path / "q", progress=False)
    res = _run(tiny_llama, _recipe(first, trainable=["scales", "norms"], lr=2e-2, ce=1.0), tmp_path / "o", files)
    log = res.ctx.training["distill"]
    assert sum(log["loss"][-3:]) < sum(log["loss"][:3])
    changed = 0
    for n, m in res.model.named_modules():
        if isinstance(m, QuantLinear):
            ref = base.model.get_submodule(n)
            assert torch.equal(m.codes()[0], ref.codes()[0]), n       # the integer codes do not move
            changed += not torch.equal(m.scales, ref.scales)
    assert changed > 0
    assert not torch.equal(res.model.model.norm.weight, base.model.model.norm.weight)
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(compressor.load(tmp_path / "o")(input_ids=x).logits, res.model(input_ids=x).logits)


def test_after_nf4_it_trains_the_norms(tiny_llama, files, tmp_path):
    pytest.importorskip("bitsandbytes")
    from compressor.api import compress_
    from compressor.models import load_hf
    from compressor.passes import Context
    model, tok = load_hf(tiny_llama)
    before = model.model.norm.weight.clone()
    ctx = Context(tokenizer=tok, train_data=str(files[1]), progress=False)
    recipe = parse_recipe({"passes": [{"nf4": {}}, {"distill": {**SMALL, "trainable": ["norms"], "lr": 2e-2,
                                                                "ce": 1.0}}]})
    model = compress_(model, recipe, ctx)
    log = ctx.training["distill"]
    assert sum(log["loss"][-3:]) < sum(log["loss"][:3])
    assert not torch.equal(model.model.norm.weight, before)
    assert log["trainable_parameters"] == sum(p.numel() for n, p in model.named_parameters() if "norm" in n)


def test_after_structured_pruning_the_shapes_stay(tiny_llama, files, tmp_path):
    res = _run(tiny_llama, _recipe({"prune-structured": {"mlp": 0.25, "multiple_of": 8}}, hidden=1.0,
                                   hidden_layers=[0, 1], ce=0.1), tmp_path / "o", files)
    assert res.model.model.layers[0].mlp.up_proj.out_features == 96
    assert compressor.load(tmp_path / "o").model.layers[1].mlp.down_proj.in_features == 96


def test_resume_after_an_interruption_is_exact(tiny_llama, files, tmp_path, interrupt_training):
    recipe = _recipe({"magnitude": {"sparsity": 0.5}})
    full = _run(tiny_llama, recipe, tmp_path / "full", files).ctx.training["distill"]["loss"]
    interrupt_training(5)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_llama, recipe, tmp_path / "run", files)
    interrupt_training.undo()
    work = tmp_path / "run.work"
    assert (work / "distill-state.pt").exists() and (work / "distill-state-teacher.pt").exists()
    res = _run(tiny_llama, recipe, tmp_path / "run", files, resume=True)
    assert res.ctx.training["distill"]["resumed_at_step"] == 4
    assert res.ctx.training["distill"]["loss"] == full                  # bit for bit


def test_sigkill_then_resume_gives_the_same_final_loss(tiny_llama, files, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"calibration": CAL, "passes": [
        {"magnitude": {"sparsity": 0.5}}, {"distill": {**SMALL, "steps": 400, "checkpoint_every": 1}}]}))
    def cmd(out, *more):
        return [sys.executable, "-m", "compressor.cli", "--recipe", str(recipe), str(tiny_llama), "-o", str(out),
                "--calib-data", str(files[0]), "--train-data", str(files[1]), "--quiet", *more]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd(tmp_path / "o"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = tmp_path / "o.work" / "distill-state.pt"
    t0 = time.time()
    while not state.exists() and p.poll() is None and time.time() - t0 < 120:
        time.sleep(0.02)
    time.sleep(0.3)
    assert p.poll() is None, p.stderr.read().decode()[-2000:]
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "o").exists()
    killed_at = torch.load(state, weights_only=True)["step"]
    assert 0 < killed_at < 400
    subprocess.run(cmd(tmp_path / "o", "--resume"), env=env, check=True, capture_output=True)
    subprocess.run(cmd(tmp_path / "ref"), env=env, check=True, capture_output=True)
    a = json.loads((tmp_path / "o" / "compression.json").read_text())["training"]["distill"]
    b = json.loads((tmp_path / "ref" / "compression.json").read_text())["training"]["distill"]
    assert a["resumed_at_step"] == killed_at and b["resumed_at_step"] is None
    assert a["loss"] == b["loss"]


@pytest.mark.parametrize("entry, match", [
    ({"trainable": ["scales"]}, r"distill.trainable=\['scales'\] matches no parameter"),
    ({"trainable": ["nothing_named_like_this"]}, "matches no parameter"),
    ({"hidden": 1.0, "hidden_layers": [7]}, r"hidden_layers: \[7\] do not exist; the student has decoder blocks 0..1"),
])
def test_bad_settings_fail_before_training(tiny_llama, files, tmp_path, entry, match, monkeypatch):
    monkeypatch.setattr(train_mod, "step_loss", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(ValueError, match=match):
        _run(tiny_llama, parse_recipe({"passes": [{"distill": {**SMALL, **entry}}]}), tmp_path / "o", files)
    assert not (tmp_path / "o").exists()


def test_a_teacher_with_another_vocabulary_is_refused(tiny_llama, files, tmp_path, monkeypatch):
    other = tmp_path / "t"
    other.mkdir()
    cfg = json.loads((tiny_llama / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 5}))
    monkeypatch.setattr(train_mod, "step_loss", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(ValueError, match=r"vocabulary of \d+ tokens, the student \d+"):
        _run(tiny_llama, parse_recipe({"passes": [{"distill": {**SMALL, "teacher": str(other)}}]}),
             tmp_path / "o", files)
    with pytest.raises(ValueError, match="no such file or directory"):
        _run(tiny_llama, parse_recipe({"passes": [{"distill": {**SMALL, "teacher": str(tmp_path / "nope")}}]}),
             tmp_path / "o", files)


@pytest.mark.parametrize("entry, match", [
    ({"temperature": 0}, "temperature=0 must be a positive number"),
    ({"temperature": -1.0}, "must be a positive number"),
    ({"trainable": []}, "trainable is empty"),
    ({"trainable": ["("]}, "neither a keyword"),
    ({"divergence": "kl2"}, r"distill.divergence='kl2' is not supported"),
    ({"kl": 0, "ce": 0}, "all 0"),
    ({"hidden": 1.0}, "needs hidden_layers"),
    ({"top_k": -1}, "top_k=-1 must be an integer >= 0"),
    ({"teacher": None}, "teacher=null leaves nothing"),
])
def test_bad_values_are_refused_when_the_recipe_is_read(entry, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe({"passes": [{"distill": entry}]})
