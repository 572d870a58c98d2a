"""Where `Runtime` finds a checkpoint's prepared weights: ``$COMPRESSOR_CACHE/runtime/<key>/``.

`prepared(checkpoint)` returns the directory, preparing it first when it is missing: a child process with
torch runs `compressor.runtime.pack` into a temporary directory beside it, which is renamed into place when
complete (a crash or Ctrl-C leaves no half-written entry), under the cache's lock (`compressor.buildcache`)
so two processes starting at once prepare once. The key hashes what the prepared arrays depend on: the
checkpoint's files (path, size and modification time of each), `PACK_FORMAT`, and the sources that decide
the packed layout, so a re-saved checkpoint or a new compressor prepares again.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .. import buildcache
from ..files import META, WEIGHTS, CheckpointError

__all__ = ["prepared", "key"]

_PACKAGE = Path(__file__).resolve().parents[1]
# the code that decides what pack writes (the layout, the fold, the fusing)
_LAYOUT_SOURCES = ("runtime/pack.py", "kernels/repack.py", "kernels/ops.py", "nn/prepare.py", "nn/decoder.py",
                   "nn/qlinear.py", "nn/qembedding.py", "nn/half.py")


def root() -> Path:
    """The directory of every prepared checkpoint."""
    return buildcache.cache_root() / "runtime"


def key(checkpoint: Path) -> str:
    from . import PACK_FORMAT
    h = hashlib.sha256(f"pack {PACK_FORMAT}\0{checkpoint.resolve()}\0".encode())
    for name in ("config.json", META, WEIGHTS):
        st = (checkpoint / name).stat()
        h.update(f"{name} {st.st_size} {st.st_mtime_ns}\0".encode())
    for rel in _LAYOUT_SOURCES:
        h.update(rel.encode() + b"\0" + (_PACKAGE / rel).read_bytes())
    return h.hexdigest()[:16]


def prepared(checkpoint: Path) -> Path:
    """The directory of `checkpoint`'s prepared weights (index.json, weights.bin), preparing it if needed."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / WEIGHTS).is_file():
        raise CheckpointError(f"{checkpoint}: no {WEIGHTS}")
    directory = root() / key(checkpoint)
    if buildcache.is_complete(directory):
        return directory
    try:
        lock = buildcache.lock_file(directory)
    except OSError as e:
        raise CheckpointError(f"cannot write the runtime cache {directory.parent} ({e}); set COMPRESSOR_CACHE to a "
                              f"writable directory") from None
    with buildcache.exclusive(lock, f"waiting for another process preparing {checkpoint} ({lock})"):
        if not buildcache.is_complete(directory):
            _prepare(checkpoint, directory)
    return directory


def _prepare(checkpoint: Path, directory: Path) -> None:
    print(f"preparing {checkpoint} for compressor.runtime (once per checkpoint)...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
    try:
        proc = subprocess.run([sys.executable, "-m", "compressor.runtime.pack", str(checkpoint), str(tmp)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode == 3:
            raise CheckpointError(proc.stderr.strip().splitlines()[-1].removeprefix("CheckpointError: "))
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
            raise RuntimeError(f"preparing {checkpoint} for compressor.runtime failed (exit status {proc.returncode}):"
                               f"\n{tail}")
        buildcache.mark_complete(tmp, {"checkpoint": str(checkpoint.resolve()),
                                       "seconds": round(time.perf_counter() - t0, 1)})
        shutil.rmtree(directory, ignore_errors=True)       # a stale, unmarked one
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _forget_stale(directory)


def _forget_stale(kept: Path) -> None:
    """Delete the entries of checkpoints that are gone, or that were re-saved since (the same path under an
    older key): without this every re-saved checkpoint would leave its old copy in the cache. Lock files stay
    (`compressor.buildcache`: unlinking one races with a process that has just opened it)."""
    mine = _source(kept)
    for d in kept.parent.iterdir():
        src = _source(d) if d != kept and d.is_dir() else None
        if src is not None and (src == mine or not Path(src).exists()):
            shutil.rmtree(d, ignore_errors=True)


def _source(entry: Path) -> str | None:
    """The checkpoint path an entry's marker records, or None (not an entry, or unreadable)."""
    try:
        return str(json.loads((entry / buildcache.MARKER).read_text())["checkpoint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
