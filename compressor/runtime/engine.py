"""The engine's ctypes binding (csrc/engine/engine.cpp) and the prepared weights it runs on. No torch.

`Resident(index, arrays)` is the same in memory: `compressor.nn.decoder.FastDecoder` hands the engine the
tensors it holds (`compressor.runtime.pack.describe`), so `compressor.load`'s generate runs the engine's step too.
`Prepared(directory)` reads what `compressor.runtime.pack` wrote: ``weights.bin`` into one buffer, on
transparent huge pages where the kernel allows (as `compressor.nn.decoder`'s arena: ~90 MB read per token
through 4 KB pages costs a TLB miss every 64 cache lines), with plain reads, so the file's pages are never
mapped into the process; ``index.json`` for the views. `Engine(prepared, threads)` hands the engine
pointers into that buffer, which it keeps alive.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import sys
from pathlib import Path

import numpy as np

from ..files import CheckpointError

__all__ = ["Prepared", "Resident", "Engine"]

_HUGE = 2 << 20
_P = ctypes.c_void_p
_I64 = ctypes.c_int64


class Prepared:
    """weights.bin and index.json of a prepared checkpoint: `array(name)` views into one buffer."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        try:
            self.index = json.loads((self.directory / "index.json").read_text())
            size = (self.directory / "weights.bin").stat().st_size
            self.buf = np.empty(size + _HUGE, dtype=np.uint8)
            start = (-self.buf.ctypes.data) % _HUGE
            self.data = self.buf[start:start + size]
            _advise_huge(self.data.ctypes.data, size)
            with open(self.directory / "weights.bin", "rb") as f:
                if f.readinto(memoryview(self.data)) != size:
                    raise OSError("short read")
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.directory}: the prepared weights are unreadable ({e}); delete the "
                                  f"directory and load again") from None

    def array(self, name: str | None) -> np.ndarray | None:
        if name is None:
            return None
        a = self.index["arrays"][name]
        dtype = np.dtype(a["dtype"])
        n = int(np.prod(a["shape"], dtype=np.int64)) * dtype.itemsize
        off = a["offset"]
        if off + n > self.data.size:
            raise CheckpointError(f"{self.directory}: array {name!r} runs past the end of weights.bin; delete the "
                                  f"directory and load again")
        return self.data[off:off + n].view(dtype).reshape(a["shape"])


class Resident:
    """An index as `compressor.runtime.pack.describe` builds it and its arrays by name (numpy views of memory the
    caller keeps alive): what `Prepared` gives the engine, without a file."""

    def __init__(self, index: dict, arrays: dict[str, np.ndarray]):
        self.index, self.arrays = index, arrays

    def array(self, name: str | None) -> np.ndarray | None:
        return None if name is None else self.arrays[name]


def _advise_huge(addr: int, nbytes: int) -> None:
    if not sys.platform.startswith("linux") or nbytes < _HUGE:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(nbytes // _HUGE * _HUGE), getattr(mmap, "MADV_HUGEPAGE", 14))
    except (OSError, AttributeError):
        pass


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.cmp_error.restype = ctypes.c_char_p
    lib.cmp_isa.restype = ctypes.c_char_p
    lib.cmp_set_isa.argtypes = [ctypes.c_char_p]
    lib.cmp_new.restype = _P
    lib.cmp_new.argtypes = [_I64] * 6 + [ctypes.c_double, ctypes.c_int]
    lib.cmp_free.argtypes = [_P]
    lib.cmp_set_block.argtypes = [_P, _I64, ctypes.POINTER(_P), ctypes.POINTER(_I64), ctypes.c_double]
    lib.cmp_set_rope.argtypes = [_P, _P, _P, _I64]
    lib.cmp_set_head.argtypes = [_P, ctypes.c_int, ctypes.POINTER(_P), ctypes.POINTER(_I64), _P]
    lib.cmp_set_embedding.argtypes = [_P, ctypes.c_int, _P]
    lib.cmp_reserve.argtypes = [_P, _I64, _I64, ctypes.c_int]
    lib.cmp_forward.argtypes = [_P, _P, _I64, _I64, _I64, ctypes.c_int, _P]
    lib.cmp_set_threads.argtypes = [_P, ctypes.c_int]
    lib.cmp_decode_groups.restype = _I64
    lib.cmp_decode_groups.argtypes = [_P, _I64]
    for f in ("cmp_set_isa", "cmp_set_block", "cmp_set_rope", "cmp_set_head", "cmp_set_embedding", "cmp_reserve",
              "cmp_forward", "cmp_set_threads"):
        getattr(lib, f).restype = ctypes.c_int
    return lib


_LIB: ctypes.CDLL | None = None


def library() -> ctypes.CDLL:
    """The engine library, compiled on first use (`compressor.runtime.build`)."""
    global _LIB
    if _LIB is None:
        from .build import load_engine
        _LIB = _bind(load_engine())
    return _LIB


_HEADS = {"f16": 0, "packed": 1}
_EMBEDDINGS = {"f16": 0, "f32": 1, "tied": 2}


class Engine:
    """A prepared model in the engine: `reserve` its caches, then `forward` token ids to logits."""

    def __init__(self, prepared: Prepared, threads: int):
        self.lib, self.prepared = library(), prepared
        ix = prepared.index
        s = ix["shape"]
        self.vocab, self.hidden = int(s["vocab"]), int(s["hidden"])
        self.rope_rows = int(ix["rope"]["rows"])
        self.handle = self.lib.cmp_new(s["hidden"], s["heads"], s["kv_heads"], s["head_dim"], s["layers"], s["vocab"],
                                       s["eps"], threads)
        self._check(0 if self.handle else -1)
        arr = prepared.array
        for i, b in enumerate(ix["blocks"]):
            ptrs = [_ptr(arr(n)) for lin in b["linears"] for n in lin["arrays"]] + [_ptr(arr(b["ln1"])),
                                                                                    _ptr(arr(b["ln2"]))]
            meta = [int(v) for lin in b["linears"] for v in lin["meta"]]
            self._check(self.lib.cmp_set_block(self.handle, i, (_P * 22)(*ptrs), (_I64 * 20)(*meta), b["scale"]))
        self._check(self.lib.cmp_set_rope(self.handle, _ptr(arr(ix["rope"]["cos"])), _ptr(arr(ix["rope"]["sin"])),
                                          self.rope_rows))
        h = ix["head"]
        if h["kind"] == "packed":
            ptrs, meta = [_ptr(arr(n)) for n in h["arrays"][:4]], [int(v) for v in h["meta"]]
        else:
            ptrs, meta = [_ptr(arr(h["weight"])), None, None, None], [0] * 5
        self._check(self.lib.cmp_set_head(self.handle, _HEADS[h["kind"]], (_P * 4)(*ptrs), (_I64 * 5)(*meta),
                                          _ptr(arr(ix["norm"]))))
        e = ix["embedding"]
        self._check(self.lib.cmp_set_embedding(self.handle, _EMBEDDINGS[e["kind"]], _ptr(arr(e.get("table")))))
        self.batch = self.length = 0
        self.half = False
        self.threads = threads

    def set_threads(self, threads: int) -> None:
        """Run later calls on `threads` threads."""
        if threads != self.threads:
            self._check(self.lib.cmp_set_threads(self.handle, threads))
            self.threads = threads

    def _check(self, rc: int) -> None:
        if rc != 0:
            raise ValueError(self.lib.cmp_error().decode())

    def reserve(self, batch: int, length: int, half: bool) -> None:
        """KV caches for `batch` rows of `length` positions (kept while a request fits them)."""
        if (batch, half) != (self.batch, self.half) or length > self.length:
            self._check(self.lib.cmp_reserve(self.handle, batch, length, int(half)))
            self.batch, self.length, self.half = batch, length, half

    def forward(self, ids: np.ndarray, pos: int, int8: bool) -> np.ndarray:
        """Logits (B, vocab) float32 after the last of ids (B, T) at positions pos .. pos + T - 1."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        out = np.empty((ids.shape[0], self.vocab), dtype=np.float32)
        self._check(self.lib.cmp_forward(self.handle, ids.ctypes.data, ids.shape[0], ids.shape[1], pos, int(int8),
                                         out.ctypes.data))
        return out

    def generate(self, ids: np.ndarray, max_new_tokens: int, min_new_tokens: int = 0,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> np.ndarray:
        """Greedy decoding of the (B, T) int64 `ids` (`compressor.greedy`): batches of several rows with an fp16
        cache and int8-activation steps (`approximate_batches`), one row exact."""
        from ..greedy import greedy
        b, t = ids.shape
        if t + max_new_tokens > self.rope_rows:
            raise ValueError(f"{t} prompt + {max_new_tokens} new tokens exceed the {self.rope_rows} positions "
                             f"this model was prepared for")
        return greedy(self.stepper(b, t + max_new_tokens), ids, max_new_tokens, min_new_tokens, eos_token_id,
                      pad_token_id)

    def stepper(self, batch: int, length: int):
        """Caches for `batch` rows of `length` positions, and ``step(tokens (B, t), pos)`` -> (B, vocab) logits as
        `generate` runs it: batches of several rows with an fp16 cache and int8-activation single-token steps
        (`approximate_batches`), prompts and one row exact."""
        from ..greedy import approximate_batches
        batched = approximate_batches(batch)
        self.reserve(batch, length, batched)
        return lambda tokens, pos: self.forward(tokens, pos, batched and tokens.shape[1] == 1)

    def decode_groups(self, batch: int) -> int:
        """The row groups a decode step of `batch` rows runs in, one per thread or one shared (csrc/cpu/block.h,
        DecodeStack)."""
        return int(self.lib.cmp_decode_groups(self.handle, batch))

    def __del__(self):
        if getattr(self, "handle", None):
            self.lib.cmp_free(self.handle)
            self.handle = None


def _ptr(a: np.ndarray | None) -> int | None:
    if a is None:
        return None
    if not a.flags.c_contiguous:
        raise ValueError("engine arrays must be contiguous")
    return a.ctypes.data
