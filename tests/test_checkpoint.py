"""Checkpoints: GPTQ config fields, exact reload, atomic writes, bad checkpoints."""
import json

import pytest
import torch

import compressor
from compressor.checkpoint import CheckpointError, atomic_dir
from compressor.nn.qlinear import QuantLinear


@pytest.mark.parametrize("recipe", ["rtn-w4g64", "rtn-w8"])
def test_save_load_exact(tiny_llama, tmp_path, recipe):
    out = tmp_path / "out"
    res = compressor.compress(str(tiny_llama), recipe, out, progress=False)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    r = compressor.recipe.load_recipe(recipe).passes[0]
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == r.bits and cfg["group_size"] == r.group_size
    assert cfg["sym"] == r.sym and cfg["desc_act"] is False
    meta = json.loads((out / "compression.json").read_text())
    assert meta["source"]["sha256"] and meta["versions"]["torch"] and meta["recipe"]["passes"][0]["pass"] == "rtn"
    assert all("sqnr_db" in meta["layers"][n] for n in meta["modules"])
    loaded = compressor.load(out, for_inference=False)
    n_q = sum(isinstance(m, QuantLinear) for m in loaded.modules())
    assert n_q == 14  # 2 layers x 7 linears; lm_head and embedding stay float
    x = torch.randint(0, 200, (2, 33))
    with torch.no_grad():
        assert torch.equal(res.model(x).logits, loaded(x).logits)
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16
        assert "lm_head.weight" not in keys  # tied: stored once
        assert f.get_tensor("model.layers.0.mlp.down_proj.qweight").dtype == torch.int32


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_overwrite_keeps_old_until_done(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old").write_text("1")
    with pytest.raises(FileExistsError, match="--overwrite"):
        with atomic_dir(dest):
            pass
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(dest, overwrite=True):
            raise KeyboardInterrupt
    assert (dest / "old").exists()
    with atomic_dir(dest, overwrite=True) as tmp:
        (tmp / "new").write_text("2")
    assert sorted(p.name for p in dest.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _dead_pid() -> int:
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_atomic_dir_sweeps_what_a_killed_writer_left(tmp_path):
    """A SIGKILL inside a write leaves ``.out.tmp-PID-*`` (swept by the next write) or, between the two renames
    of an overwrite, ``.out.old-PID`` with no ``out`` (put back: it is the complete previous output)."""
    import os
    dest, dead = tmp_path / "out", _dead_pid()
    (tmp_path / f".out.tmp-{dead}-abc").mkdir()
    (tmp_path / f".out.tmp-{os.getpid()}-live").mkdir()        # a live writer's: left alone
    (tmp_path / f".out.old-{dead}").mkdir()
    (tmp_path / f".out.old-{dead}" / "w").write_text("previous")
    with pytest.raises(FileExistsError):                        # the old output is back, so it exists
        with atomic_dir(dest):
            pass
    assert (dest / "w").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".out.tmp-{os.getpid()}-live", "out"]


def test_atomic_dir_traces_its_writes(tmp_path, monkeypatch):
    trace = tmp_path / "trace"
    monkeypatch.setenv("COMPRESSOR_TRACE_WRITES", str(trace))
    with atomic_dir(tmp_path / "a") as tmp:
        assert [line.split()[0] for line in trace.read_text().splitlines()] == ["begin"]
        (tmp / "x").write_text("1")
    lines = [line.split() for line in trace.read_text().splitlines()]
    assert [(k, p) for k, p, _ in lines] == [("begin", str(tmp_path / "a")), ("end", str(tmp_path / "a"))]


def test_load_refuses_non_checkpoint(tiny_llama, tmp_path):
    with pytest.raises(CheckpointError, match="not a compressed checkpoint"):
        compressor.load(tiny_llama)


# --- module types own their format; shapes that differ from the config reload -----------------

def _save(model, tok, out, **kw):
    from compressor import checkpoint
    return checkpoint.save(model, tok, out, recipe={"passes": []}, layer_stats={}, source={}, **kw)


def _check_shrunk_reload(model, tok, out, widths, full):
    _save(model, tok, out)
    meta = json.loads((out / "compression.json").read_text())
    loaded = compressor.load(out, for_inference=False)
    ids = torch.randint(3, 200, (2, 19))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    sd = loaded.state_dict()
    for i, w in widths.items():
        for name in ("gate_proj", "up_proj", "down_proj"):
            spec = meta["modules"][f"model.layers.{i}.mlp.{name}"]
            assert (spec["out_features"] if name != "down_proj" else spec["in_features"]) == w
        shapes = [tuple(t.shape) for k, t in sd.items() if k.startswith(f"model.layers.{i}.mlp.")]
        assert shapes and not any(full in s for s in shapes)      # no full-width tensor left in a shrunk layer
    return loaded


def test_shrunk_mlp_reloads(tiny_llama, tmp_path, shrink_mlp):
    from compressor.models import load_hf
    model, tok = load_hf(tiny_llama)
    widths = {0: 96, 1: 32}                                  # config says 128
    shrink_mlp(model, widths)
    _check_shrunk_reload(model, tok, tmp_path / "float", widths, 128)
    recipe = compressor.recipe.parse_recipe({"passes": [{"rtn": {"bits": 4, "group_size": 32}}]})
    compressor.compress_(model, recipe, compressor.Context(progress=False))   # and quantized after it
    loaded = _check_shrunk_reload(model, tok, tmp_path / "w4", widths, 128)
    assert loaded.model.layers[1].mlp.down_proj.in_features == 32


@pytest.mark.slow
def test_shrunk_smollm2_reloads(tmp_path, shrink_mlp):
    from compressor.models import load_hf, resolve
    model, tok = load_hf(resolve("smollm2-135m"))
    widths = {0: 1024, 3: 768, 7: 1280, 29: 512}            # config says 1536
    shrink_mlp(model, widths)
    _check_shrunk_reload(model, tok, tmp_path / "float", widths, 1536)


class ScaledLinear(torch.nn.Module):
    """A module type defined and registered here, in the test file only: y = (x W^T) * s."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features))
        self.s = torch.nn.Parameter(torch.empty(out_features))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight) * self.s

    def spec(self):
        return {"in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def from_spec(cls, spec):
        with torch.device("meta"):
            return cls(spec["in_features"], spec["out_features"])


@pytest.fixture
def scaled_linear_type():
    from compressor.nn import MODULE_TYPES, register_module
    from compressor.nn.formats import _BY_CLASS
    cls = register_module("test-scaled")(ScaledLinear)
    yield cls
    del MODULE_TYPES["test-scaled"], _BY_CLASS[cls]


def test_a_registered_module_type_round_trips(tiny_llama, tmp_path, scaled_linear_type):
    from compressor.models import load_hf
    model, tok = load_hf(tiny_llama)
    old = model.model.layers[1].self_attn.o_proj
    m = scaled_linear_type(old.in_features, old.out_features)
    m.weight.data, m.s.data = old.weight.data.clone(), torch.rand(old.out_features) + 0.5
    model.model.layers[1].self_attn.o_proj = m
    _save(model, tok, tmp_path / "o")
    meta = json.loads((tmp_path / "o" / "compression.json").read_text())
    assert meta["modules"] == {"model.layers.1.self_attn.o_proj": {"type": "test-scaled", "in_features": 64,
                                                                   "out_features": 64}}
    loaded = compressor.load(tmp_path / "o", for_inference=False)
    assert type(loaded.model.layers[1].self_attn.o_proj) is scaled_linear_type
    ids = torch.randint(3, 200, (1, 11))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_mixed_bits_save_gptq_dynamic_overrides(tiny_llama, tmp_path):
    from compressor.models import load_hf
    from compressor.passes.rtn import RTNConfig
    model, tok = load_hf(tiny_llama)
    ctx = compressor.Context(progress=False)
    RTNConfig(bits=8, group_size=-1, sym=True, targets=(r"down_proj",)).apply(model, ctx)
    RTNConfig(bits=4, group_size=32, sym=False).apply(model, ctx)
    out = tmp_path / "mixed"
    _save(model, tok, out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["sym"]) == (4, 32, False)     # the most common settings
    assert qc["dynamic"] == {rf"+:^model\.layers\.{i}\.mlp\.down_proj$": {"bits": 8, "group_size": -1, "sym": True,
                                                                        "desc_act": False} for i in range(2)}
    loaded = compressor.load(out, for_inference=False)
    assert {(m.bits, m.group_size) for m in loaded.modules() if isinstance(m, QuantLinear)} == {(4, 32), (8, -1)}
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_uniform_quantization_config_is_plain_gptq(tiny_llama, tmp_path):
    compressor.compress(str(tiny_llama), "rtn-w4g64", tmp_path / "o", progress=False)
    qc = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": False, "sym": False,
                  "checkpoint_format": "gptq", "true_sequential": True, "damp_percent": 0.01}


def test_weight_file_bytes_are_deterministic(tiny_llama, tmp_path):
    """Same model, two saves (and a second process): the same bytes, header included."""
    import subprocess
    import sys
    compressor.compress(str(tiny_llama), "rtn-w4g64", tmp_path / "a", progress=False)
    code = ("import compressor, sys; compressor.compress(sys.argv[1], 'rtn-w4g64', sys.argv[2], progress=False)")
    subprocess.run([sys.executable, "-c", code, str(tiny_llama), str(tmp_path / "b")], check=True,
                   env={**__import__("os").environ, "COMPRESSOR_NO_EXT": "1"})
    a, b = (tmp_path / "a" / "model.safetensors").read_bytes(), (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a == b


@pytest.mark.parametrize("damage", ["not-utf8", "modules-not-specs", "config-layers", "unknown-module"])
def test_load_refuses_a_damaged_checkpoint_with_a_typed_error(tiny_llama, tmp_path, damage):
    """Every way the fuzzer (benchmarks/fuzz_loaders.py) once broke `load` is a CheckpointError naming the path."""
    import json
    import shutil
    from compressor import compress, load
    ck = tmp_path / "ck"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - rtn: {bits: 4, group_size: 32}\n")
    compress(str(tiny_llama), recipe, ck, progress=False)
    bad = tmp_path / "bad"
    shutil.copytree(ck, bad)
    meta = json.loads((bad / "compression.json").read_text())
    if damage == "not-utf8":
        (bad / "compression.json").write_bytes(b"{\"format_version\": 1, \xbe}")
    elif damage == "modules-not-specs":
        meta["modules"] = {"model.layers.0.mlp.up_proj": 3}
        (bad / "compression.json").write_text(json.dumps(meta))
    elif damage == "unknown-module":
        name = next(iter(meta["modules"]))
        meta["modules"][name.replace("layers.0", "layers.65")] = meta["modules"][name]
        (bad / "compression.json").write_text(json.dumps(meta))
    else:
        cfg = json.loads((bad / "config.json").read_text())
        cfg["num_hidden_layers"] = 1
        (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=str(bad)):
        load(bad)


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("recipe", ["rtn-w4g64", "rtn-w8"])
def test_inference_load_leaves_no_tensor_on_the_file(tiny_llama, tmp_path, recipe):
    """safetensors maps the file; one small tensor left on the mapping (a norm weight) keeps the whole file
    resident beside the packed copies. compressor.load for inference must give every tensor its own memory."""
    import gc
    out = tmp_path / "out"
    compressor.compress(str(tiny_llama), recipe, out, progress=False)
    weights = str((out / "model.safetensors").resolve())

    def mapped() -> bool:
        return any(line.rstrip().endswith(weights) for line in open("/proc/self/maps"))

    loaded = compressor.load(out, for_inference=False)       # as saved: the tensors stay on the mapping
    gc.collect()
    assert mapped()
    del loaded
    gc.collect()
    model = compressor.load(out)
    gc.collect()
    assert not mapped()
    x = torch.randint(0, 200, (1, 9))
    with torch.no_grad():
        ref = compressor.load(out, for_inference=False)(x).logits
        assert torch.allclose(model(x).logits, ref, atol=1e-4, rtol=1e-4)
