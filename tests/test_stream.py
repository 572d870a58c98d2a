"""compressor/stream.py: `compress --stream` gives the same bytes as an in-memory run, holds one block at a time,
resumes bit-identically, and refuses what it cannot do before any work."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from compressor import api
from compressor.errors import InputError
from compressor.stream import SafetensorsLayout, ShardReader, Stream, StreamError, _bytes
from compressor.testing import make_tiny_llama

MAGNITUDE = "passes:\n  - magnitude: {sparsity: 0.5}\n"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A 3-block llama in fp16 over several shards with an index, untied head: how large models come."""
    return make_tiny_llama(tmp_path_factory.mktemp("sharded") / "llama", layers=3, tie=False, dtype=torch.float16,
                           max_shard_size="100KB")


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("calib") / "calib.txt"
    f.write_text(" ".join(["the quick brown fox jumps over the lazy dog; a model is smaller and faster"] * 300))
    return f


def _run(src, recipe, out, calib, stream, **kw):
    return api.compress(str(src), recipe, out, calib_data=str(calib), stream=stream, progress=False, **kw)


# --- the safetensors layout ------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_layout_writes_save_file_bytes(tmp_path, seed):
    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.uint8, torch.int8,
              torch.bool, torch.float64]
    tensors = {}
    for i in range(12):
        dt = dtypes[int(torch.randint(len(dtypes), (1,), generator=g))]
        shape = [int(s) for s in torch.randint(0, 5, (int(torch.randint(0, 3, (1,), generator=g)),), generator=g)]
        t = torch.randn(shape, generator=g) * 50
        tensors[f"m.{int(torch.randint(100, (1,), generator=g))}.w{i}"] = t.to(dt)
    ref = tmp_path / "ref.safetensors"
    save_file(tensors, str(ref), metadata={"format": "pt"})
    lay = SafetensorsLayout({k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}, {"format": "pt"})
    ours = tmp_path / "ours.safetensors"
    fd = os.open(ours, os.O_WRONLY | os.O_CREAT)
    os.pwrite(fd, lay.header, 0)
    for k in reversed(list(tensors)):             # any write order: each tensor goes to its offset
        os.pwrite(fd, _bytes(tensors[k]), len(lay.header) + lay.offsets[k][0])
    os.ftruncate(fd, lay.size)
    os.close(fd)
    assert ours.read_bytes() == ref.read_bytes()


# --- same bytes as in memory -------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["rtn-w4g64", "gptq-w4g64", "awq-gptq-w4g64", "wanda-50", "sparsegpt-2of4-w4g64",
                                    "magnitude"])
def test_streamed_checkpoint_is_byte_identical(sharded, calib, tmp_path, recipe):
    if recipe == "magnitude":
        recipe = tmp_path / "magnitude.yaml"
        recipe.write_text(MAGNITUDE)
    a = _run(sharded, recipe, tmp_path / "mem", calib, stream=False)
    b = _run(sharded, recipe, tmp_path / "stream", calib, stream=True)
    for f in ("model.safetensors", "config.json"):
        assert (a.out / f).read_bytes() == (b.out / f).read_bytes(), f
    ma, mb = (json.loads((r.out / "compression.json").read_text()) for r in (a, b))
    assert ma["modules"] == mb["modules"]
    assert set(ma["layers"]) == set(mb["layers"])
    assert not api.work_dir_for(b.out).exists()
    import compressor
    x = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        assert torch.equal(compressor.load(a.out)(input_ids=x).logits, compressor.load(b.out)(input_ids=x).logits)


@pytest.mark.parametrize("tie", [True, False])
def test_streamed_quantized_head(tmp_path, calib, monkeypatch, tie):
    """The head pass (in rtn-w4g64) on the stem of a streamed run: the same bytes as in memory, and a run
    killed in the write after the head pass committed resumes to them."""
    src = make_tiny_llama(tmp_path / "src", layers=2, tie=tie, vocab=320, dtype=torch.float16, max_shard_size="100KB")
    a = _run(src, "rtn-w4g64", tmp_path / "mem", calib, stream=False)
    assert "lm_head" in json.loads((a.out / "compression.json").read_text())["modules"]
    b = _run(src, "rtn-w4g64", tmp_path / "stream", calib, stream=True)
    for f in ("model.safetensors", "config.json", "compression.json"):
        if f != "compression.json":
            assert (a.out / f).read_bytes() == (b.out / f).read_bytes(), f
    import compressor.stream as st
    real = st.write_checkpoint
    monkeypatch.setattr(st, "write_checkpoint", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _run(src, "rtn-w4g64", tmp_path / "out", calib, stream=True)
    monkeypatch.setattr(st, "write_checkpoint", real)
    c = _run(src, "rtn-w4g64", tmp_path / "out", calib, stream=True, resume=True)
    assert (c.out / "model.safetensors").read_bytes() == (a.out / "model.safetensors").read_bytes()


def test_streamed_tied_model(tmp_path, calib):
    src = make_tiny_llama(tmp_path / "tied", layers=2, tie=True, max_shard_size="100KB")
    a = _run(src, "gptq-w4g64", tmp_path / "mem", calib, stream=False)
    b = _run(src, "gptq-w4g64", tmp_path / "stream", calib, stream=True)
    assert (a.out / "model.safetensors").read_bytes() == (b.out / "model.safetensors").read_bytes()


# --- one block at a time -------------------------------------------------------------------------------------
def test_one_block_in_memory_at_a_time(sharded, calib, tmp_path, monkeypatch):
    loads, real = [], Stream.load

    def load(self, b):
        held = [i for i, blk in enumerate(self.blocks) if any(not t.is_meta for t in blk.parameters())]
        assert held == [], f"blocks {held} still in memory when block {b} is read"
        loads.append(b)
        return real(self, b)

    monkeypatch.setattr(Stream, "load", load)
    _run(sharded, "awq-gptq-w4g64", tmp_path / "out", calib, stream=True)
    # awq and gptq sweeps, then the save's two walks (layout, data)
    assert loads == [0, 1, 2] * 4


# --- resume ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe,kill_at,loads", [("awq-gptq-w4g64", 2, 12), ("awq-gptq-w4g64", 4, 12),
                                                   ("rtn-w4g64", 2, 9)])   # awq's sweep, gptq's, rtn's
def test_streamed_resume_is_bit_identical(sharded, calib, tmp_path, monkeypatch, recipe, kill_at, loads):
    ref = _run(sharded, recipe, tmp_path / "ref", calib, stream=True)
    calls, real = [0], Stream.free

    def free(self, b):
        real(self, b)
        calls[0] += 1
        if calls[0] == kill_at:
            raise KeyboardInterrupt

    monkeypatch.setattr(Stream, "free", free)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _run(sharded, recipe, out, calib, stream=True)
    assert not out.exists()
    monkeypatch.setattr(Stream, "free", real)
    seen, real_load = [], Stream.load
    monkeypatch.setattr(Stream, "load", lambda self, b: (seen.append(b), real_load(self, b))[1])
    _run(sharded, recipe, out, calib, stream=True, resume=True)
    assert (out / "model.safetensors").read_bytes() == (ref.out / "model.safetensors").read_bytes()
    assert len(seen) == loads - kill_at           # the committed blocks were not redone


def test_resume_without_stream_is_refused(sharded, calib, tmp_path, monkeypatch):
    real = Stream.free

    def free(self, b):
        real(self, b)
        raise KeyboardInterrupt

    monkeypatch.setattr(Stream, "free", free)
    with pytest.raises(KeyboardInterrupt):
        _run(sharded, "gptq-w4g64", tmp_path / "out", calib, stream=True)
    with pytest.raises(InputError, match="stream"):
        _run(sharded, "gptq-w4g64", tmp_path / "out", calib, stream=False, resume=True)


# --- refusals, before any work --------------------------------------------------------------------------------
def test_refusals(sharded, calib, tmp_path, data_dir):
    out = tmp_path / "out"
    with pytest.raises(StreamError, match="prune-structured.*whole model"):
        _run(sharded, "prune-mlp-25", out, calib, stream=True)
    with pytest.raises(StreamError, match="--eval-data"):
        _run(sharded, "rtn-w4g64", out, calib, stream=True, eval_data=calib)
    with pytest.raises(StreamError, match="--format gguf"):
        _run(sharded, "gptq-w4g64-noact", out, calib, stream=True, format="gguf")
    head = tmp_path / "head.yaml"
    head.write_text("passes:\n  - rtn: {bits: 8, group_size: -1, ignore: []}\n")
    with pytest.raises(StreamError, match="lm_head"):
        _run(sharded, head, out, calib, stream=True)
    owl = tmp_path / "owl.yaml"
    owl.write_text("passes:\n  - wanda: {sparsity: 0.5, allocation: owl}\n")
    with pytest.raises(StreamError, match="allocation=owl"):
        _run(sharded, owl, out, calib, stream=True)
    assert not out.exists() and not api.work_dir_for(out).exists()


def test_truncated_shard_is_named(sharded, tmp_path):
    import shutil
    src = tmp_path / "src"
    shutil.copytree(sharded, src)
    shard = sorted(src.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(InputError, match=shard.name):
        ShardReader(src)
