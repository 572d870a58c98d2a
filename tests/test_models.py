"""Model resolution errors: each is one line that says what was expected."""
import shutil

import pytest

from compressor.models import ModelError, check_safetensors, resolve


def test_unknown_name():
    with pytest.raises(ModelError, match=r"'nope-model': no such file or directory, and not a named model \(known: smollm2-135m"):
        resolve("nope-model")


def test_dir_without_config(tmp_path):
    with pytest.raises(ModelError, match="expected config.json"):
        resolve(tmp_path)


def test_truncated_safetensors(tiny_llama, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelError, match="truncated safetensors file") as e:
        resolve(d)
    assert "\n" not in str(e.value)


def test_corrupt_safetensors(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ModelError, match="corrupt safetensors header"):
        check_safetensors(f)
    f.write_bytes(b"\x01")
    with pytest.raises(ModelError, match="truncated"):
        check_safetensors(f)


def test_resolves_directory(tiny_llama):
    assert resolve(tiny_llama) == tiny_llama


def test_read_config_refuses_a_corrupt_or_out_of_bounds_file(tmp_path):
    from compressor.models import ModelError, read_config
    (tmp_path / "config.json").write_bytes(b'{"model_type": "llama", "hidden_size": \xff}')
    with pytest.raises(ModelError, match="config.json: not a valid config.json file"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 1073741824}')
    with pytest.raises(ModelError, match=r"hidden_size = 1073741824 is not a size"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(ModelError, match="transformers cannot read it"):
        read_config(tmp_path)


def test_read_safetensors_names_the_file(tmp_path):
    import json
    import struct
    from compressor.models import ModelError, read_safetensors
    f = tmp_path / "w.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 4]}}).encode()
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(ModelError, match=f"{f}: corrupt safetensors file"):
        read_safetensors(f)                     # a shape the bytes cannot hold: refused, nothing allocated
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": "x"}}).encode()
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(ModelError, match="no valid data_offsets"):
        read_safetensors(f)
