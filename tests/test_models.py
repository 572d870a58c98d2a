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
