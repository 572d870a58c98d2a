"""The on-disk cache of binaries compiled on first use, shared by every such build.

Two binaries compile once per machine and are reused by later processes: the torch extension of
the CPU kernels (`compressor.kernels.build`) and the torch-free generation engine
(`compressor.runtime.build`). Both keep one directory per cache key under `cache_root()` and follow
the same protocol, which lives here so the two cannot drift apart:

* The build of ``<dir>`` runs under an exclusive `fcntl.flock` on the sibling file ``<dir>.lock``
  (`lock_file` and `exclusive`), so two processes starting at once compile once: the second waits,
  then finds the work done. The kernel drops the lock when its holder dies, so a killed compile
  never blocks the next one. The lock file is never deleted: unlinking a flock file races with a
  process that has just opened it.
* ``<dir>`` is complete only when its marker ``build.json`` exists (`is_complete`), and the marker
  is written last and atomically (`mark_complete`). A compile killed half-way leaves no marker, and
  the next process, holding the lock, starts that directory afresh.

This module is stdlib only (no torch, numpy or `compressor.kernels`): the engine is loaded by
processes that never import torch.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
from pathlib import Path
from typing import Iterator

__all__ = ["MARKER", "cache_root", "lock_file", "exclusive", "is_complete", "mark_complete", "unmark"]

MARKER = "build.json"   # written last: its presence means everything else in the directory is complete


def cache_root() -> Path:
    """``$COMPRESSOR_CACHE``, or ``~/.cache/compressor`` when it is unset."""
    return Path(os.environ.get("COMPRESSOR_CACHE", Path.home() / ".cache" / "compressor"))


def lock_file(directory: Path) -> Path:
    """Create (if needed) and return the lock file of cache entry `directory`: ``<directory>.lock``.

    Raises OSError when the cache is not writable; callers turn that into their own message.
    """
    lock = directory.parent / f"{directory.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    return lock


@contextlib.contextmanager
def exclusive(lock: Path, waiting: str) -> Iterator[None]:
    """Hold an exclusive flock on `lock`; the kernel drops it if the process dies.

    When another process holds it, print `waiting` to stderr first, so a user whose process seems
    stuck knows it is waiting for someone else's compile rather than hung.
    """
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_complete(directory: Path) -> bool:
    """True if the build in `directory` finished: its marker exists."""
    return (directory / MARKER).is_file()


def mark_complete(directory: Path, info: dict) -> None:
    """Write the marker of `directory` (`info` as JSON). Call it last, once everything is in place.

    Written to a temporary name and renamed: a reader sees no marker or a complete one.
    """
    tmp = directory / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp, directory / MARKER)


def unmark(directory: Path) -> None:
    """Forget that `directory` is complete (a damaged entry), so the next build redoes it."""
    (directory / MARKER).unlink(missing_ok=True)
