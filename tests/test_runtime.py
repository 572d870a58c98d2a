"""compressor.runtime.Runtime: generation without transformers, equal to compressor.load's fast path."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

import compressor
from compressor.checkpoint import CheckpointError
from compressor.kernels import extension
from compressor.nn import HalfLinear, QuantLinear
from compressor.nn.half import HalfEmbedding
from compressor.nn.qembedding import TiedQuantEmbedding
from compressor.runtime import Runtime

pytestmark = pytest.mark.skipif(extension is None, reason="Runtime runs on the C++ extension")


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


def _same_as_load(path, batch: int, new: int = 20):
    rt, m = Runtime(path), compressor.load(path)
    ids = torch.randint(3, 250, (batch, 9), generator=torch.Generator().manual_seed(batch))
    want = m.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    assert torch.equal(rt.generate(ids, max_new_tokens=new, min_new_tokens=new), want)
    dec = m.generate.fast
    assert torch.equal(rt.logits(want), dec.forward(want, 0, dec.caches(batch, want.shape[1])))
    return rt


@pytest.mark.parametrize("batch", [1, 3])
def test_tokens_and_logits_equal_compressor_load(ckpt, batch):
    rt = _same_as_load(ckpt, batch)
    int8_head = ckpt.name.endswith("int8-head")
    assert isinstance(rt.model.lm_head, QuantLinear if int8_head else HalfLinear)
    assert isinstance(rt.model.model.embed_tokens, TiedQuantEmbedding if int8_head else HalfEmbedding)
    assert rt.model.model.layers[0].self_attn.q_proj._released                 # every weight held once


def test_act_order_checkpoint_is_folded_and_equal(tmp_path, data_dir):
    from compressor.testing import make_tiny_llama
    src = make_tiny_llama(tmp_path / "src", hidden=128, inter=256)      # two groups of 64: a real permutation
    out = tmp_path / "gptq"
    compressor.compress(str(src), "gptq-w4g64", out, calib_data=str(data_dir / "wikitext2-valid.tokens"),
                        progress=False)
    rt = _same_as_load(out, 1)
    mlp = rt.model.model.layers[0].mlp
    assert mlp.gate_proj.desc_act() and mlp.down_proj.packed().perm is None      # fold_act_order_ ran


def test_does_not_import_transformers(ckpt):
    code = ("import sys, torch, compressor; rt = compressor.Runtime(sys.argv[1]); "
            "ids = rt.generate(torch.tensor([rt.tokenizer.encode('hello world').ids]), max_new_tokens=4); "
            "assert isinstance(rt.tokenizer.decode(ids[0].tolist()), str); "
            "print(sorted(m for m in ('transformers', 'torch._dynamo', 'sympy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(ckpt)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


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
    (bad / "config.json").write_text(json.dumps(cfg))
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        Runtime(bad)
    rt = Runtime(ckpt)
    with pytest.raises(ValueError, match="greedy"):
        rt.generate(torch.tensor([[5, 6]]), max_new_tokens=2, do_sample=True)
    with pytest.raises(ValueError, match="one length"):
        rt.generate(torch.tensor([[5, 6]]), max_new_tokens=2, attention_mask=torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="input_ids must be"):
        rt.generate(torch.tensor([5.0]), max_new_tokens=2)
