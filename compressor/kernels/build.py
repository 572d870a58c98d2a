"""Where the C++ CPU kernels come from: the extension setup.py built, or a compile on first use.

`load_extension()` is what `compressor.kernels.ops` calls at import. It tries, in order:

1. ``COMPRESSOR_NO_EXT=1``: no extension; the ops keep their pure-PyTorch references.
2. ``import compressor._C``: built by setup.py when torch was importable at build time
   (``pip install --no-build-isolation``).
3. Compile the sources with `torch.utils.cpp_extension.load` (a C++ compiler and ninja) into
   ``$COMPRESSOR_CACHE/kernels/<key>`` (default ``~/.cache/compressor``). This runs once, and later
   processes import the cached ``.so``. It is the path of a plain ``pip install .``, whose isolated
   build environment has no torch, and of a `_C` built against another torch, whose import fails
   with undefined symbols. The sources ship in the package as ``compressor/_sources/csrc/cpu`` (a
   wheel); a source checkout or editable install uses ``<repo>/csrc/cpu``.

The cache key (`cache_key`) hashes everything the binary depends on: the torch version, the
Python ABI tag, the machine architecture, the compiler flags and the bytes of every source file.
CPU features are left out on purpose. The one ``.so`` holds AVX-512, AVX2 and scalar kernels (each
file enables its ISA with ``#pragma GCC target``) and picks one at run time with cpuid, so one
cache entry serves every CPU of the architecture. The compile runs under an exclusive `fcntl.flock` on
``kernels/<key>.lock`` and is marked complete only at the end, so two processes starting at once
compile once. A compile killed half-way leaves no marker, and the next process compiles again. That
protocol is `compressor.buildcache`, shared with the torch-free engine (`compressor.runtime.build`).

Without kernels every 4/8-bit layer runs the reference, roughly 10x slower. `warn_fallback` says so
once per process, with the reason and the command that fixes it.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import sysconfig
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

from .. import buildcache

__all__ = ["load_extension", "cache_key", "source_dir", "read_sources", "fallback_message", "warn_fallback",
           "ReferenceKernelWarning", "CFLAGS", "LDFLAGS"]

log = logging.getLogger(__name__)

# The same flags as setup.py's CppExtension. -fopenmp makes at::parallel_for parallel; the libgomp
# torch ships satisfies the link.
CFLAGS = ("-O3", "-fopenmp", "-std=c++20")
LDFLAGS = ("-fopenmp",)
_NAME = "compressor_C"        # module (and PyInit_) name of the compiled-on-first-use extension
_PACKAGE = Path(__file__).resolve().parents[1]
_SOURCE_DIRS = (_PACKAGE / "_sources" / "csrc" / "cpu",   # a wheel (setup.py's build_py copies them)
                _PACKAGE.parent / "csrc" / "cpu")         # a source checkout or editable install
_REBUILD = ("pip install --no-build-isolation --no-deps --force-reinstall <source checkout>")


class ReferenceKernelWarning(RuntimeWarning):
    """The compiled kernels are unavailable and the ops run their slow PyTorch references."""


class _Unavailable(Exception):
    """No compiled kernels: `reason` says why and `fix` what command fixes it."""

    def __init__(self, reason: str, fix: str):
        super().__init__(reason)
        self.reason, self.fix = reason, fix


# ---------------------------------------------------------------------------------------------
# Sources and the cache key
# ---------------------------------------------------------------------------------------------

def source_dir() -> Path | None:
    """The directory holding the CPU kernel sources (``ops.cpp`` and the rest), or None."""
    for d in _SOURCE_DIRS:
        if (d / "ops.cpp").is_file():
            return d
    return None


def read_sources(directory: Path) -> dict[str, bytes]:
    """File name -> bytes of every ``.cpp`` and ``.h`` in `directory`."""
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())
            if p.suffix in (".cpp", ".h") and p.is_file()}


def cache_key(sources: dict[str, bytes]) -> str:
    """A 16-hex-digit hash of what the compiled extension depends on (see the module docstring).

    The directory the sources were read from is not part of it, so a checkout and a wheel of the
    same version share one cache entry.
    """
    h = hashlib.sha256()
    for part in (torch.__version__, str(torch.version.git_version), sys.implementation.cache_tag,
                 str(sysconfig.get_config_var("EXT_SUFFIX")), platform.machine(), _NAME,
                 " ".join(CFLAGS), " ".join(LDFLAGS)):
        h.update(part.encode() + b"\0")
    for name in sorted(sources):
        h.update(name.encode() + b"\0" + hashlib.sha256(sources[name]).digest())
    return h.hexdigest()[:16]


def _cache_root() -> Path:
    return buildcache.cache_root() / "kernels"


# ---------------------------------------------------------------------------------------------
# Compile on first use
# ---------------------------------------------------------------------------------------------

def _import_so(directory: Path) -> ModuleType:
    """Import ``<directory>/compressor_C.so``: its static initialisers register the CPU kernels."""
    path = directory / f"{_NAME}.so"
    spec = importlib.util.spec_from_file_location(_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _ninja_on_path():
    """Make `ninja` findable for torch's build: the ninja wheel's binary sits in the venv's ``bin``,
    which is not on PATH when the venv's python runs without the venv being activated."""
    if shutil.which("ninja"):
        yield
        return
    try:
        import ninja
    except ImportError:
        raise _Unavailable("ninja is not installed (torch.utils.cpp_extension needs it to compile)",
                           "`pip install ninja`, then rerun") from None
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _compile(sources: dict[str, bytes], directory: Path) -> ModuleType:
    """Compile `sources` into `directory` (emptied first) and import the result."""
    from torch.utils import cpp_extension

    shutil.rmtree(directory, ignore_errors=True)
    src = directory / "src"
    src.mkdir(parents=True)
    # Compile copies of the hashed bytes, so the key always describes what was compiled, even if
    # the checkout is edited meanwhile.
    for name, data in sources.items():
        (src / name).write_bytes(data)
    with _ninja_on_path():   # a missing ninja is reported before anything is printed
        print(f"compressor: compiling the C++ CPU kernels for torch {torch.__version__} once (about a minute); "
              f"cached in {directory}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            module = cpp_extension.load(
                name=_NAME, sources=[str(src / n) for n in sorted(sources) if n.endswith(".cpp")],
                extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS), build_directory=str(directory),
                verbose=False)
        except Exception as e:  # compiler or link error: torch raises RuntimeError with the output
            output = directory / "build-error.log"
            output.write_text(f"{e.__class__.__name__}: {e}\n")
            first = next((line for line in str(e).splitlines() if line.strip()), e.__class__.__name__)
            raise _Unavailable(
                f"compiling the C++ kernels failed: {first[:200]}; compiler output in {output}",
                f"install g++ and the Python headers (`apt-get install g++ python3-dev`) and rerun, or build "
                f"the kernels at install time: `{_REBUILD}`") from None
    seconds = time.perf_counter() - t0
    info = {"torch": torch.__version__, "python": sys.implementation.cache_tag, "machine": platform.machine(),
            "cflags": list(CFLAGS), "ldflags": list(LDFLAGS), "sources": sorted(sources), "seconds": round(seconds, 1)}
    buildcache.mark_complete(directory, info)   # last: a killed compile leaves no marker
    log.info("compiled the C++ CPU kernels in %.0f s into %s", seconds, directory)
    return module


def _load_cached_or_compile() -> tuple[ModuleType, str]:
    """The first-use extension from the cache, compiling it if needed; raises `_Unavailable`."""
    where = source_dir()
    if where is None:
        raise _Unavailable(
            f"the kernel sources are not installed (looked in {', '.join(str(d) for d in _SOURCE_DIRS)})",
            f"reinstall compressor from a source checkout or sdist: `{_REBUILD}`")
    sources = read_sources(where)
    directory = _cache_root() / cache_key(sources)
    source = f"compiled on first use, cached in {directory}"
    if buildcache.is_complete(directory):
        try:
            return _import_so(directory), source
        except (ImportError, OSError) as e:   # a damaged cache entry: compile it again below
            log.warning("the cached C++ kernels in %s do not import (%s); compiling them again", directory, e)
            buildcache.unmark(directory)
    cxx = os.environ.get("CXX", "c++")   # the compiler torch.utils.cpp_extension runs
    if shutil.which(cxx) is None:
        raise _Unavailable(f"no C++ compiler: {cxx!r} is not on PATH",
                           "install a C++ compiler (`apt-get install g++`, or set CXX to one) and rerun; "
                           "the kernels compile once and are cached")
    try:
        lock = buildcache.lock_file(directory)
    except OSError as e:
        raise _Unavailable(f"cannot write the kernel cache {directory.parent} ({e})",
                           "set COMPRESSOR_CACHE to a writable directory, then rerun") from None
    waiting = f"compressor: waiting for another process compiling the C++ CPU kernels into {directory}"
    with buildcache.exclusive(lock, waiting):
        if buildcache.is_complete(directory):    # another process compiled it while we waited
            return _import_so(directory), source
        return _compile(sources, directory), source


# ---------------------------------------------------------------------------------------------
# The fallback, said once
# ---------------------------------------------------------------------------------------------

_warned = False


def fallback_message(reason: str, fix: str) -> str:
    """The warning text for running on the reference: why, what it costs, and the fix."""
    return (f"compressor: the C++ CPU kernels are unavailable ({reason}), so every 4/8-bit layer runs "
            f"the pure-PyTorch reference, roughly 10x slower: 4-bit decode ~0.3x HF fp32 tokens/s "
            f"instead of 2-3x. Fix: {fix}. Set COMPRESSOR_NO_EXT=1 to choose the reference "
            f"without this warning.")


def warn_fallback(reason: str, fix: str) -> bool:
    """Emit `fallback_message` as a `ReferenceKernelWarning`, once per process; True if emitted now."""
    global _warned
    if _warned:
        return False
    _warned = True
    warnings.warn(fallback_message(reason, fix), ReferenceKernelWarning, stacklevel=2)
    return True


def load_extension() -> tuple[ModuleType | None, str]:
    """(extension, where it came from) or (None, why not); see the module docstring for the order.

    Never raises: whatever fails, the ops still work on their references, and a fallback the user
    did not ask for is warned about once (`warn_fallback`).
    """
    if os.environ.get("COMPRESSOR_NO_EXT") == "1":
        reason = "disabled by COMPRESSOR_NO_EXT=1"
        log.info("C++ CPU kernels %s; the ops use their PyTorch references", reason)
        return None, reason
    try:
        return importlib.import_module("compressor._C"), "compiled, setup.py build"
    except ModuleNotFoundError:
        pass       # the usual case after a plain `pip install .`
    except (ImportError, OSError) as e:   # built against another torch: undefined symbols
        log.info("compressor._C does not import (%s); using kernels compiled on first use instead", e)
    try:
        return _load_cached_or_compile()
    except _Unavailable as e:
        reason, fix = e.reason, e.fix
    except Exception as e:  # anything else must not make `import compressor` fail
        reason = f"{e.__class__.__name__}: {e}"
        fix = f"build the kernels at install time instead: `{_REBUILD}`"
    warn_fallback(reason, fix)
    return None, reason
