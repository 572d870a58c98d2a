"""compressor.runtime.Runtime: generation in a process without torch, equal to compressor.load's fast path."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import compressor
from compressor.files import CheckpointError
from compressor.kernels import extension
from compressor.runtime import Runtime
from compressor.runtime.store import prepared

pytestmark = pytest.mark.skipif(extension is None, reason="compressor.load's side of the comparison needs the kernels")


@pytest.fixture(scope="module", params=["rtn-w4g64", "rtn-w8", "rtn-w4g64 int8 head"])
def ckpt(request, tiny_llama, tmp_path_factory):
    from compressor.testing import make_tiny_llama
    tmp = tmp_path_factory.mktemp("rt")
    src = tiny_llama                        # vocabulary 259: the head stays fp16 (8-bit packing needs 4 | rows)
    if request.param.endswith("int8 head"):
        src = make_tiny_llama(tmp / "src", vocab=300)
    out = tmp / request.param.replace(" ", "-")
    compressor.compress(str(src), request.param.split()[0], out, progress=False)
    return out


def _close(got: np.ndarray, want: torch.Tensor) -> None:
    """Logits within fp32 rounding: the final norm is the engine's own loop (the blocks are the same code)."""
    want = want.numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def _same_as_load(path, batch: int, new: int = 20, prompt: int = 9):
    rt, m = Runtime(path), compressor.load(path)
    ids = torch.randint(3, 250, (batch, prompt), generator=torch.Generator().manual_seed(batch))
    want = m.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    assert np.array_equal(rt.generate(ids, max_new_tokens=new, min_new_tokens=new), want.numpy())
    dec = m.generate.fast
    _close(rt.logits(want), dec.forward(want, 0, dec.caches(batch, want.shape[1])))
    # decode steps from position 0: the same blocks (block.h) on both sides
    caches = dec.caches(batch, 6)
    rt.engine.reserve(batch, 6, batch > 1)
    for pos in range(6):
        tok = want[:, pos:pos + 1]
        int8 = batch > 1
        _close(rt.engine.forward(tok.numpy(), pos, int8), dec.forward(tok, pos, caches))
    return rt


@pytest.mark.parametrize("batch", [1, 3])
def test_tokens_and_logits_equal_compressor_load(ckpt, batch):
    rt = _same_as_load(ckpt, batch)
    index = rt.engine.prepared.index
    int8_head = ckpt.name.endswith("int8-head")
    assert index["head"]["kind"] == ("packed" if int8_head else "f16")
    assert index["embedding"]["kind"] == ("tied" if int8_head else "f16")
    if not int8_head:                                         # the tied fp16 matrix is stored once
        assert index["embedding"]["table"] == index["head"]["weight"]


def test_prompt_of_gemm_rows_and_a_batch_of_32(ckpt, monkeypatch):
    """A 40-token prompt runs its projections on the prefill GEMM (>= 32 rows); 32 one-token rows take
    block_rows rather than the decode region; with fp32 caches and fp16 ones."""
    _same_as_load(ckpt, 1, new=4, prompt=40)
    rt, m = Runtime(ckpt), compressor.load(ckpt)
    dec = m.generate.fast
    ids = torch.randint(3, 250, (32, 1), generator=torch.Generator().manual_seed(7))
    for exact in ("1", "0"):
        monkeypatch.setenv("COMPRESSOR_EXACT_DECODE", exact)
        rt.engine.reserve(32, 1, exact == "0")
        _close(rt.engine.forward(ids.numpy(), 0, False), dec.forward(ids, 0, dec.caches(32, 1)))


def test_act_order_checkpoint_is_folded_and_equal(tmp_path, data_dir):
    from compressor.testing import make_tiny_llama
    src = make_tiny_llama(tmp_path / "src", hidden=128, inter=256)      # two groups of 64: a real permutation
    out = tmp_path / "gptq"
    compressor.compress(str(src), "gptq-w4g64", out, calib_data=str(data_dir / "wikitext2-valid.tokens"),
                        progress=False)
    rt = _same_as_load(out, 1)
    linears = rt.engine.prepared.index["blocks"][0]["linears"]
    assert linears[2]["arrays"][3] is not None and linears[3]["arrays"][3] is None   # gate/up keep a perm, down none


def test_no_torch_in_the_process(ckpt):
    prepared(ckpt)                                                    # the child that prepares has torch
    code = ("import sys, compressor; rt = compressor.Runtime(sys.argv[1]); "
            "ids = rt.generate([rt.tokenizer.encode('hello world').ids], max_new_tokens=4); "
            "assert isinstance(rt.tokenizer.decode(ids[0].tolist()), str); "
            "print(sorted(m for m in ('torch', 'transformers', 'sympy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(ckpt)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_prepared_once_and_again_when_the_checkpoint_changes(ckpt, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(ckpt, copy)
    first = prepared(copy)
    stamp = (first / "weights.bin").stat().st_mtime_ns
    assert prepared(copy) == first and (first / "weights.bin").stat().st_mtime_ns == stamp
    w = copy / "model.safetensors"
    os.utime(w, ns=(w.stat().st_atime_ns, w.stat().st_mtime_ns + 10**9))     # re-saved
    again = prepared(copy)
    assert again != first and again.is_dir() and not first.exists()         # the old copy is forgotten
    shutil.rmtree(copy)
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    prepared(other)
    assert not again.exists()                                               # a checkpoint that is gone


def test_failed_preparation_leaves_nothing(ckpt, tmp_path, monkeypatch):
    from compressor.runtime import store
    monkeypatch.setattr(store, "root", lambda: tmp_path / "cache" / "runtime")
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        Runtime(bad)
    left = [p.name for p in (tmp_path / "cache" / "runtime").iterdir() if not p.name.endswith(".lock")]
    assert left == []


def test_bad_inputs_say_what(ckpt, tmp_path, tiny_llama):
    with pytest.raises(CheckpointError, match="not a compressed checkpoint"):
        Runtime(tiny_llama)
    bad = tmp_path / "other"
    shutil.copytree(ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="model_type 'gpt2'.*compressor.load"):
        Runtime(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(CheckpointError, match="default one only"):
        Runtime(bad)
    rt = Runtime(ckpt)
    with pytest.raises(ValueError, match="greedy"):
        rt.generate([[5, 6]], max_new_tokens=2, do_sample=True)
    with pytest.raises(ValueError, match="one length"):
        rt.generate([[5, 6]], max_new_tokens=2, attention_mask=[[0, 1]])
    with pytest.raises(ValueError, match="input_ids must be"):
        rt.generate([5.0], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        rt.generate([[5, 6]], max_new_tokens=-1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        rt.generate([[5, 10**6]], max_new_tokens=2)
    with pytest.raises(ValueError, match="positions this model was prepared for"):
        rt.generate([[5, 6]], max_new_tokens=rt.engine.rope_rows)
    with pytest.raises(ValueError, match="threads"):
        Runtime(ckpt, threads=0)
