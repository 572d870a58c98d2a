"""compressor/workdir.py and the resume it gives `compress`: a run interrupted after any block or pass, resumed,
writes the same bytes as an uninterrupted one; a different run's progress and a damaged commit are refused."""
from __future__ import annotations

import pytest

from compressor import workdir
from compressor.api import compress, work_dir_for
from compressor.testing import make_tiny_llama

AWQ_GPTQ = """calibration: {samples: 8, seqlen: 64}
passes:
  - awq: {bits: 4, group_size: 32, sym: false, clip: false}
  - gptq: {bits: 4, group_size: 32, sym: false, act_order: true, fp_target: true, fp_target_samples: 4}
"""


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("llama4") / "m", layers=4)


@pytest.fixture
def recipe(tmp_path):
    f = tmp_path / "awq-gptq.yaml"
    f.write_text(AWQ_GPTQ)
    return f


def _run(model, recipe, out, calib, **kw):
    return compress(str(model), recipe, out, calib_data=str(calib), progress=False, **kw)


def _bytes(out):
    return (out / "model.safetensors").read_bytes()


@pytest.fixture
def interrupt_after(monkeypatch):
    """``interrupt_after(pass_name, block)``: KeyboardInterrupt right after that block's commit. Records every
    (pass, block) committed in ``.log``."""
    real = workdir.LoopStore.commit_block

    class Interrupt:
        log: list[tuple[str, int]] = []
        at: tuple[str, int] | None = None

        def __call__(self, name: str | None, block: int = 0):
            self.at = None if name is None else (name, block)

    it = Interrupt()
    it.log = []

    def commit_block(self, b, *a, **k):
        real(self, b, *a, **k)
        name = self.root.parent.name.split("-", 2)[2]
        it.log.append((name, b))
        if it.at == (name, b):
            raise KeyboardInterrupt
    monkeypatch.setattr(workdir.LoopStore, "commit_block", commit_block)
    return it


@pytest.mark.parametrize("where", [("awq", 1), ("gptq", 0), ("gptq", 2)])
def test_resume_after_a_block_is_bit_identical(llama4, recipe, calib_file, tmp_path, interrupt_after, where):
    whole = _run(llama4, recipe, tmp_path / "whole", calib_file).out
    out = tmp_path / "resumed"
    interrupt_after(*where)
    with pytest.raises(KeyboardInterrupt):
        _run(llama4, recipe, out, calib_file)
    assert not out.exists() and workdir.has_progress(work_dir_for(out))
    interrupt_after(None)
    interrupt_after.log.clear()
    _run(llama4, recipe, out, calib_file, resume=True)
    assert _bytes(out) == _bytes(whole)
    name, b = where
    # the resumed run redid no committed block: it started after `where` (and awq, when done, not at all)
    assert interrupt_after.log[0] == ((name, b + 1) if b < 3 else ("gptq", 0))
    assert not work_dir_for(out).exists()


def test_resume_after_a_pass_restores_the_model(llama4, recipe, calib_file, tmp_path, interrupt_after):
    whole = _run(llama4, recipe, tmp_path / "whole", calib_file).out
    out = tmp_path / "resumed"
    interrupt_after("awq", 3)        # awq's last block: the pass commit has not happened yet
    with pytest.raises(KeyboardInterrupt):
        _run(llama4, recipe, out, calib_file)
    interrupt_after(None)
    interrupt_after("gptq", 0)
    with pytest.raises(KeyboardInterrupt):     # resumed: awq committed whole, gptq block 0 done
        _run(llama4, recipe, out, calib_file, resume=True)
    work = work_dir_for(out)
    assert (work / "pass-00.done").is_dir() and not (work / "pass-00-awq").exists()
    interrupt_after(None)
    interrupt_after.log.clear()
    _run(llama4, recipe, out, calib_file, resume=True)
    assert interrupt_after.log[0] == ("gptq", 1)
    assert _bytes(out) == _bytes(whole)


def test_a_different_run_is_refused_by_field(llama4, recipe, calib_file, tmp_path, interrupt_after):
    out = tmp_path / "o"
    interrupt_after("awq", 0)
    with pytest.raises(KeyboardInterrupt):
        _run(llama4, recipe, out, calib_file)
    other = tmp_path / "other.txt"
    other.write_text(calib_file.read_text().replace("fox", "cat"))
    with pytest.raises(workdir.WorkDirError, match=r"different run \(calib_file: .* calibration: "):
        _run(llama4, recipe, out, other, resume=True)
    recipe.write_text(AWQ_GPTQ.replace("clip: false", "clip: true"))
    with pytest.raises(workdir.WorkDirError, match=r"different run \(recipe: "):
        _run(llama4, recipe, out, calib_file, resume=True)
    assert workdir.has_progress(work_dir_for(out))          # refused, and nothing was lost


def test_a_damaged_commit_is_refused_by_name(llama4, recipe, calib_file, tmp_path, interrupt_after):
    out = tmp_path / "o"
    interrupt_after("awq", 1)
    with pytest.raises(KeyboardInterrupt):
        _run(llama4, recipe, out, calib_file)
    f = work_dir_for(out) / "pass-00-awq" / "layerwise" / "block-0000" / workdir.TENSORS
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x40
    f.write_bytes(bytes(data))
    with pytest.raises(workdir.WorkDirError, match="block-0000/tensors.safetensors: its sha256 does not match"):
        _run(llama4, recipe, out, calib_file, resume=True)


def test_a_new_run_over_progress_is_refused_and_resume_needs_progress(llama4, recipe, calib_file, tmp_path,
                                                                      interrupt_after):
    out = tmp_path / "o"
    with pytest.raises(FileNotFoundError, match="--resume: no progress in"):
        _run(llama4, recipe, out, calib_file, resume=True)
    interrupt_after("awq", 0)
    with pytest.raises(KeyboardInterrupt):
        _run(llama4, recipe, out, calib_file)
    with pytest.raises(FileExistsError, match="pass --resume to continue it or --overwrite"):
        _run(llama4, recipe, out, calib_file)


def test_save_and_restore_modules_round_trip(llama4):
    """A quantized model's state (module types, tied weights, every dtype) survives save/restore exactly."""
    import torch
    from compressor.models import load_hf
    from compressor.nn import QuantLinear
    from compressor.recipe import parse_recipe
    from compressor.api import compress_
    model, _ = load_hf(llama4)
    compress_(model, parse_recipe({"passes": [{"rtn": {"bits": 4, "group_size": 32}}]}))
    tensors, meta = workdir.save_modules(model)
    fresh, _ = load_hf(llama4)
    workdir.restore_modules(fresh, tensors, meta)
    assert isinstance(fresh.model.layers[0].mlp.down_proj, QuantLinear)
    a, b = model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()


def test_restore_keeps_the_in_memory_dtype_not_the_checkpoint_form(llama4):
    """A SparseLinear computes in fp32 and saves fp16: the commit holds the fp32 weights, bit for bit."""
    import torch
    from compressor.api import compress_
    from compressor.models import load_hf
    from compressor.nn import SparseLinear
    from compressor.recipe import parse_recipe
    model, _ = load_hf(llama4)
    compress_(model, parse_recipe({"passes": [{"magnitude": {"sparsity": 0.5}}]}))
    tensors, meta = workdir.save_modules(model)
    fresh, _ = load_hf(llama4)
    workdir.restore_modules(fresh, tensors, meta)
    a, b = model.model.layers[2].mlp.up_proj, fresh.model.layers[2].mlp.up_proj
    assert isinstance(b, SparseLinear) and b.weight.dtype == a.weight.dtype == torch.float32
    assert torch.equal(a.weight, b.weight)
    x = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, fresh(input_ids=x).logits)


def test_a_module_type_without_a_format_is_not_committable(llama4):
    import torch.nn as nn
    from compressor.models import load_hf
    model, _ = load_hf(llama4)
    known = {type(m) for m in model.modules()}
    assert workdir.committable(model, known)

    class Opaque(nn.Linear):                  # as bitsandbytes' Linear4bit is: no format, not the model's own
        pass
    model.model.layers[1].mlp.up_proj = Opaque(64, 128)
    assert not workdir.committable(model, known)


def test_an_interruption_before_any_commit_leaves_no_work_dir(llama4, recipe, calib_file, tmp_path, monkeypatch):
    """The fingerprint alone is not progress: stopped before the first block commit, nothing is left, and a
    plain rerun is not told to --resume."""
    def stop(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(workdir.LoopStore, "commit_block", stop)
    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        _run(llama4, recipe, out, calib_file)
    assert not work_dir_for(out).exists() and not out.exists()
    work = work_dir_for(out)                  # a fingerprint left by a kill does not block a plain rerun
    work.mkdir()
    (work / workdir.FINGERPRINT).write_text("{}")
    assert not workdir.has_progress(work)
    monkeypatch.undo()
    _run(llama4, recipe, out, calib_file)
    assert (out / "model.safetensors").exists() and not work.exists()
