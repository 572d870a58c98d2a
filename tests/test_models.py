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


def _gguf(kvs: bytes, n_kv: int, n_tensors: int = 0, tail: bytes = b"") -> bytes:
    import struct
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs + tail


def _key(name: str) -> bytes:
    import struct
    return struct.pack("<Q", len(name)) + name.encode()


@pytest.mark.parametrize("case", ["string array of 2**60", "u32 array of 2**40", "key longer than the file",
                                  "2**50 key/values", "unknown value type", "2**40 tensors"])
def test_gguf_header_counts_are_bounded_by_the_file(tmp_path, case):
    """Counts and lengths a GGUF header claims are checked against the bytes left before gguf's reader loops over
    them (a string array of 2**60 items made it build objects until the machine ran out of memory)."""
    import struct
    import time
    from compressor.models import ModelError, gguf_to_hf
    pad = b"\0" * 4096
    data = {
        "string array of 2**60": _gguf(_key("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2 ** 60) + pad, 1),
        "u32 array of 2**40": _gguf(_key("a") + struct.pack("<IIQ", 9, 4, 2 ** 40) + pad, 1),
        "key longer than the file": _gguf(struct.pack("<Q", 2 ** 62) + pad, 1),
        "2**50 key/values": _gguf(pad, 2 ** 50),
        "unknown value type": _gguf(_key("a") + struct.pack("<I", 77) + pad, 1),
        "2**40 tensors": _gguf(b"", 0, n_tensors=2 ** 40, tail=pad),
    }[case]
    f = tmp_path / "m.gguf"
    f.write_bytes(data)
    t = time.perf_counter()
    with pytest.raises(ModelError, match="m.gguf: GGUF"):
        gguf_to_hf(f, tmp_path / "hf")
    assert time.perf_counter() - t < 5
