"""The torch-free generation engine, ``libcompressor_engine.so``: compiled on first use, then cached.

`load_engine()` returns the engine as a `ctypes.CDLL`, once per process. The engine is a plain shared
library (``csrc/engine/engine.cpp`` over the torch-free core of ``csrc/cpu``), loaded by processes
that never import torch, so this module uses the standard library only.

Where the library comes from, in order:

1. ``COMPRESSOR_ENGINE_LIB=/path/to/lib.so``: that file, as is (for developers iterating on the C++).
2. ``$COMPRESSOR_CACHE/engine/<key>/libcompressor_engine.so`` (default ``~/.cache/compressor``),
   compiled there by the first process that needed it. The sources ship in a wheel as
   ``compressor/_sources/csrc`` (setup.py's build_py copies ``csrc/``); a checkout uses ``<repo>/csrc``.

The key (`cache_key`) hashes everything the binary depends on: the compiler (its path and version),
the machine architecture, the flags, and the names and bytes of every source and header. CPU
features are left out on purpose: the library holds AVX-512, AVX2 and scalar kernels (each file
enables its ISA with ``#pragma GCC target``) and picks one with cpuid at run time, so one entry
serves every CPU of the architecture. Compiling needs the compiler anyway, and even a cached
entry is looked up by the compiler's identity, so a machine without one uses COMPRESSOR_ENGINE_LIB.

The compile follows `compressor.buildcache`: under an exclusive lock, with the marker written last,
so concurrent first uses compile once and a killed compile is redone by the next process. The
library is linked to a temporary name and renamed, so a half-written ``.so`` is never loaded. The
five translation units compile in parallel (a few seconds each), largest first.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from .. import buildcache

__all__ = ["load_engine", "cache_key", "compiler_id", "find_compiler", "source_root", "read_sources",
           "ENGINE_SOURCES", "ENGINE_HEADERS", "CFLAGS", "LDFLAGS", "LIB_NAME"]

log = logging.getLogger("compressor")

# Paths relative to csrc/. ops.h, ops.cpp and layer.cpp are the torch extension's: not part of it.
ENGINE_SOURCES = ("engine/engine.cpp", "cpu/decode.cpp", "cpu/kernels_avx512.cpp", "cpu/kernels_avx2.cpp",
                  "cpu/kernels_scalar.cpp")
ENGINE_HEADERS = ("cpu/block.h", "cpu/decode.h", "cpu/kernels.h")
CFLAGS = ("-O3", "-fopenmp", "-std=c++20", "-fPIC")
LDFLAGS = ("-shared", "-fopenmp")
LIB_NAME = "libcompressor_engine.so"

_PACKAGE = Path(__file__).resolve().parents[1]   # compressor/
_SOURCE_ROOTS = (_PACKAGE / "_sources" / "csrc",   # a wheel (setup.py's build_py copies csrc/)
                 _PACKAGE.parent / "csrc")         # a source checkout or editable install
_FIX = ("install a C++20 compiler (`apt-get install g++`, or build-essential) or set CXX to one, then rerun; "
        f"or set COMPRESSOR_ENGINE_LIB to a prebuilt {LIB_NAME}")
_ERROR_LINES = 20   # compiler output quoted in an error; the whole of it is in the log file

_engine: ctypes.CDLL | None = None
_engine_lock = threading.Lock()


# ---------------------------------------------------------------------------------------------
# Sources, compiler and the cache key
# ---------------------------------------------------------------------------------------------

def source_root() -> Path | None:
    """The ``csrc`` directory holding the engine sources, or None."""
    for root in _SOURCE_ROOTS:
        if all((root / name).is_file() for name in ENGINE_SOURCES + ENGINE_HEADERS):
            return root
    return None


def read_sources(root: Path) -> dict[str, bytes]:
    """Path relative to `root` (``"cpu/decode.h"``) -> bytes, for every engine source and header."""
    return {name: (Path(root) / name).read_bytes() for name in ENGINE_SOURCES + ENGINE_HEADERS}


def find_compiler() -> list[str]:
    """The compiler command: ``$CXX`` (split like a shell word list), else ``g++``, else ``c++``.

    The program is resolved to its path; raises RuntimeError when it is not found.
    """
    cxx = os.environ.get("CXX", "").strip()
    if cxx:
        try:
            cmd, where = shlex.split(cxx), "$CXX"
        except ValueError as e:
            raise RuntimeError(f"cannot compile the generation engine: CXX={cxx!r} is not a command line ({e}). "
                               f"Fix: {_FIX}") from None
    else:
        cmd, where = ["g++" if shutil.which("g++") else "c++"], "the default compiler"
    path = shutil.which(cmd[0])
    if path is None:
        raise RuntimeError(f"cannot compile the generation engine: {where} {cmd[0]!r} is not found. Fix: {_FIX}")
    return [path, *cmd[1:]]


def compiler_id(cmd: list[str]) -> str:
    """The compiler's path and version (``-dumpfullversion``, else ``--version``): a part of the key."""
    for flag in ("-dumpfullversion", "--version"):
        try:
            r = subprocess.run([*cmd, flag], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(f"cannot run the C++ compiler `{shlex.join(cmd)}` ({e}). Fix: {_FIX}") from None
        if r.returncode == 0 and r.stdout.strip():
            return f"{shlex.join(cmd)} {r.stdout.strip()}"
    return f"{shlex.join(cmd)} (version unknown)"


def cache_key(sources: dict[str, bytes], compiler: str) -> str:
    """A 16-hex-digit hash of what the library depends on: `compiler` (`compiler_id`), the machine,
    the flags, and the name and bytes of every source. Not where the sources were read from, so a
    checkout and a wheel of the same version share one cache entry."""
    h = hashlib.sha256()
    for part in (compiler, platform.machine(), " ".join(CFLAGS), " ".join(LDFLAGS)):
        h.update(part.encode() + b"\0")
    for name in sorted(sources):
        h.update(name.encode() + b"\0" + hashlib.sha256(sources[name]).digest())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Compile
# ---------------------------------------------------------------------------------------------

def _failure(argv: list[str], log_file: Path, what: str) -> RuntimeError:
    """The error for a failed compiler run: the command, the end of its output, the fix."""
    lines = log_file.read_text(errors="replace").splitlines()[-_ERROR_LINES:] if log_file.is_file() else []
    output = "\n".join(lines) or "(no output)"
    return RuntimeError(f"compiling the generation engine failed: `{shlex.join(argv)}` {what}; "
                        f"its last output lines (all of it in {log_file}):\n{output}\nFix: {_FIX}")


def _run_parallel(jobs: list[tuple[list[str], Path]], width: int) -> None:
    """Run the (argv, log file) `jobs`, `width` at a time, in list order. On the first failure the
    others are killed and RuntimeError raised; an interrupt kills them too."""
    pending, running = list(jobs), []
    try:
        while pending or running:
            while pending and len(running) < width:
                argv, log_file = pending.pop(0)
                with open(log_file, "wb") as out:
                    try:
                        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
                    except OSError as e:
                        raise RuntimeError(f"cannot run the C++ compiler `{shlex.join(argv)}` ({e}). Fix: {_FIX}") \
                            from None
                running.append((proc, argv, log_file))
            time.sleep(0.05)
            for job in [j for j in running if j[0].poll() is not None]:
                running.remove(job)
                proc, argv, log_file = job
                if proc.returncode != 0:
                    raise _failure(argv, log_file, f"exited with status {proc.returncode}")
    finally:
        for proc, _, _ in running:
            proc.kill()
            proc.wait()


def _jobs() -> int:
    """How many compiles run at once: the cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _compile(sources: dict[str, bytes], cmd: list[str], compiler: str, directory: Path) -> None:
    """Compile `sources` into ``directory/LIB_NAME`` (the directory emptied first), then mark it complete."""
    shutil.rmtree(directory, ignore_errors=True)   # what a killed compile left
    # Objects go to a directory of this process: the compilers of a killed process outlive it, and must
    # not write into the objects of the process that redoes its work.
    src, obj = directory / "src", directory / f"obj-{os.getpid()}"
    # Compile copies of the hashed bytes, so the key always describes what was compiled, even if the
    # checkout is edited meanwhile. The csrc/ layout is kept: engine.cpp includes "../cpu/block.h".
    for name, data in sources.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    obj.mkdir()

    t0 = time.perf_counter()
    objects = {name: obj / (name.replace("/", "_").removesuffix(".cpp") + ".o") for name in ENGINE_SOURCES}
    # Largest first: kernels_avx512.cpp takes most of the minute, so it should not start last.
    jobs = [([*cmd, *CFLAGS, "-c", str(src / name), "-o", str(objects[name])], objects[name].with_suffix(".log"))
            for name in sorted(ENGINE_SOURCES, key=lambda n: -len(sources[n]))]
    _run_parallel(jobs, max(1, min(len(jobs), _jobs())))

    tmp = obj / LIB_NAME                  # renamed once linked: a half-written library is never loaded
    _run_parallel([([*cmd, *LDFLAGS, "-o", str(tmp), *map(str, objects.values())], obj / "link.log")], 1)
    os.replace(tmp, directory / LIB_NAME)
    shutil.rmtree(obj)                    # megabytes nothing needs once linked
    seconds = time.perf_counter() - t0
    buildcache.mark_complete(directory, {
        "compiler": compiler, "machine": platform.machine(), "cflags": list(CFLAGS),
        "ldflags": list(LDFLAGS), "sources": sorted(sources), "seconds": round(seconds, 1)})
    log.info("compiled the generation engine in %.0f s into %s", seconds, directory)


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------

def _open(path: Path, origin: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        raise RuntimeError(f"cannot load the generation engine {path} ({origin}): {e}") from None


def _load() -> ctypes.CDLL:
    override = os.environ.get("COMPRESSOR_ENGINE_LIB")
    if override:
        if not Path(override).is_file():
            raise RuntimeError(f"COMPRESSOR_ENGINE_LIB={override!r} is not a file. Fix: point it at a built "
                               f"{LIB_NAME}, or unset it to compile the engine into the cache on first use")
        return _open(Path(override), "from COMPRESSOR_ENGINE_LIB")

    root = source_root()
    if root is None:
        raise RuntimeError(
            f"the generation engine's sources are not installed (looked for {', '.join(ENGINE_SOURCES)} "
            f"in {' and '.join(str(r) for r in _SOURCE_ROOTS)}). Fix: reinstall compressor from a source "
            f"checkout or sdist (`pip install <checkout>`), or set COMPRESSOR_ENGINE_LIB to a prebuilt {LIB_NAME}")
    sources = read_sources(root)
    cmd = find_compiler()
    compiler = compiler_id(cmd)
    directory = buildcache.cache_root() / "engine" / cache_key(sources, compiler)
    lib = directory / LIB_NAME

    if buildcache.is_complete(directory):
        try:
            return ctypes.CDLL(str(lib))
        except OSError as e:   # a damaged cache entry: compile it again below
            log.warning("the cached generation engine %s does not load (%s); compiling it again", lib, e)
            buildcache.unmark(directory)
    try:
        lock = buildcache.lock_file(directory)
    except OSError as e:
        raise RuntimeError(f"cannot write the engine cache {directory.parent} ({e}). "
                           "Fix: set COMPRESSOR_CACHE to a writable directory, then rerun") from None
    with buildcache.exclusive(lock, f"compressor: waiting for another process compiling the generation engine "
                                    f"into {directory}"):
        if not buildcache.is_complete(directory):   # else another process compiled it while we waited
            log.info("compiling the generation engine (once)... into %s", directory)
            print(f"compressor: compiling the generation engine with {shlex.join(cmd)} (once); "
                  f"cached in {directory}", file=sys.stderr, flush=True)
            _compile(sources, cmd, compiler, directory)
    return _open(lib, f"compiled into {directory}")


def load_engine() -> ctypes.CDLL:
    """The generation engine, loaded once per process (see the module docstring for where from).

    Raises RuntimeError naming what failed and the fix: no compiler, a compile error (with the
    compiler's command and the end of its output), an unwritable cache, missing sources.
    """
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = _load()
        return _engine
