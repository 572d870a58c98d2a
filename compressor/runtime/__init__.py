"""`Runtime`: greedy generation from a compressed checkpoint in a process without torch.

`compressor.load` gives a transformers model: torch, transformers and their imports are 390-470 MiB of RSS
before any weight, so a process that only generates with it peaks near three times llama.cpp's memory for
SmolLM2-135M, and torch's import alone (~220 MiB) is most of llama.cpp's whole process. Generation needs
none of it: `Runtime` runs the same C++ blocks as `compressor.load`'s fast path (csrc/cpu/block.h), as a
plain shared library (csrc/engine/engine.cpp, through ctypes) over numpy arrays.

    rt = compressor.Runtime("out/smollm2-gptq-w4g64")
    ids = rt.generate([rt.tokenizer.encode("The tower is").ids], max_new_tokens=64)
    print(rt.tokenizer.decode(ids[0].tolist()))

The weights are prepared once per checkpoint by a child process that has torch (`compressor.runtime.pack`:
the repacking and fusing of `compressor.load`, written to ``$COMPRESSOR_CACHE/runtime``), and the engine
library is compiled once (`compressor.runtime.build`); later processes read both from the cache.

The blocks compute what ``compressor.load(path).generate``'s compute, bit for bit: the same code
(csrc/cpu/block.h: DecodeBlock for decode steps, block_rows for prompts) on the same kernels. Only the final
norm is the engine's own loop, within fp32 rounding of torch's, so the logits agree to ~1e-7 and the greedy
tokens match (tests/runtime). Scope: llama, mistral and qwen2 checkpoints whose seven
projections per block are 4/8-bit GPTQ layers, with the default rotary embedding; anything else is a
`CheckpointError` that says what and points to `compressor.load`. Greedy only.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..errors import read_json
from ..files import ADAPTER, FORMAT_VERSION, META, CheckpointError, is_checkpoint

__all__ = ["Runtime", "read_description", "PACK_FORMAT"]

MODEL_TYPES = ("llama", "mistral", "qwen2")
PACK_FORMAT = 1          # of compressor.runtime.pack's output; a change makes the cache prepare again


class Runtime:
    """A compressed checkpoint ready to generate: `generate` (greedy) and `logits`; no torch in the process.

    `threads`: the engine's threads (default: ``OMP_NUM_THREADS``, else the CPUs this process may run on)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        from .engine import Engine, Prepared
        from .store import prepared
        self.path = Path(path)
        self.config, _ = read_description(self.path)
        if threads is None:
            threads = _default_threads()
        if type(threads) is not int or threads < 1:
            raise ValueError(f"threads={threads!r}: must be an integer >= 1")
        self.engine = Engine(Prepared(prepared(self.path)), threads)

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer.json as a `tokenizers.Tokenizer` (the Rust library transformers' fast
        tokenizers wrap; no transformers import): ``tokenizer.encode(text).ids``, ``tokenizer.decode(ids)``."""
        if getattr(self, "_tokenizer", None) is None:
            from tokenizers import Tokenizer
            f = self.path / "tokenizer.json"
            if not f.is_file():
                raise CheckpointError(f"{self.path}: no tokenizer.json; pass token ids to generate")
            self._tokenizer = Tokenizer.from_file(str(f))
        return self._tokenizer

    def logits(self, input_ids) -> np.ndarray:
        """(B, vocab) float32 logits after the last of `input_ids` (B, T)."""
        from ..greedy import approximate_batches
        ids = _ids(input_ids)
        self.engine.reserve(ids.shape[0], ids.shape[1], approximate_batches(ids.shape[0]))
        return self.engine.forward(ids, 0, False)

    def generate(self, input_ids, max_new_tokens: int, min_new_tokens: int = 0,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 attention_mask=None, do_sample: bool = False) -> np.ndarray:
        """Greedy decoding as HF's ``generate(do_sample=False)``: (B, T + new) int64 ids. `input_ids`: a (B, T)
        array, nested list or CPU tensor. `eos_token_id` defaults to config.json's; rows that ended are padded
        with `pad_token_id` (default: the first eos).

        Batches of several rows keep their KV cache in fp16 and run decode steps with int8 activations, as
        `compressor.load`'s fast path does (``COMPRESSOR_EXACT_DECODE=1``: fp32 and exact)."""
        ids = _ids(input_ids)
        if do_sample:
            raise ValueError("Runtime.generate is greedy (do_sample=False); sample with compressor.load(path).generate")
        if attention_mask is not None and not bool((np.asarray(attention_mask) == 1).all()):
            raise ValueError("Runtime.generate takes rows of one length (an attention mask of ones); pad with "
                             "compressor.load(path).generate")
        if type(max_new_tokens) is not int or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 0")
        if eos_token_id is None:
            eos_token_id = getattr(self.config, "eos_token_id", None)
        return self.engine.generate(ids, max_new_tokens, min_new_tokens, eos_token_id, pad_token_id)


def _default_threads() -> int:
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _ids(input_ids) -> np.ndarray:
    try:
        ids = np.asarray(input_ids)
    except (TypeError, ValueError, RuntimeError):
        ids = None
    if ids is None or ids.ndim != 2 or ids.dtype.kind not in "iu" or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a (batch, length) array of integer token ids, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    return np.ascontiguousarray(ids, dtype=np.int64)


def read_description(path: Path) -> tuple[SimpleNamespace, dict[str, dict[str, Any]]]:
    """config.json as attributes and compression.json's module specs; CheckpointError for what Runtime cannot run."""
    if not is_checkpoint(path):
        raise CheckpointError(f"{str(path)!r} is not a compressed checkpoint (no {META})")
    meta = read_json(path / META, CheckpointError, META)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta.get('format_version')!r}, this compressor reads "
                              f"{FORMAT_VERSION}")
    if meta.get("artifact") == ADAPTER or meta.get("artifact") == "onnx-export":
        raise CheckpointError(f"{path}: a {meta['artifact']} runs through compressor.load, not Runtime")
    cfg = read_json(path / "config.json", CheckpointError, "config.json")
    kind = cfg.get("model_type")
    if kind not in MODEL_TYPES:
        raise CheckpointError(f"{path}: model_type {kind!r}; Runtime runs {', '.join(MODEL_TYPES)}, "
                              f"use compressor.load")
    for key in ("rope_parameters", "rope_scaling"):                       # transformers 5 / 4 spelling
        rope = cfg.get(key) or {}
        if not isinstance(rope, dict) or (rope.get("rope_type") or rope.get("type") or "default") != "default":
            raise CheckpointError(f"{path}: rotary embedding {key} {rope!r}; Runtime has the default one only, "
                                  f"use compressor.load")
    cfg["rope_theta"] = float((cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0)))
    cfg.pop("quantization_config", None)
    specs = meta.get("modules", {})
    if not isinstance(specs, dict):
        raise CheckpointError(f"{path / META}: 'modules' must be an object; the file is corrupt")
    return SimpleNamespace(**cfg), specs


