"""`compressor.runtime.build`: the torch-free engine library, compiled on first use and cached.

The real compile runs once per session, into a temporary cache (`engine_cache`, a few seconds to a
minute); every other test either reuses that entry or fails before compiling anything.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compressor import buildcache
from compressor.runtime import build as rb

_ISAS = {b"avx512", b"avx2", b"scalar"}   # the `name` of each KernelSet in csrc/cpu/kernels_*.cpp
_PRINT_ISA = ("import ctypes, sys\n"
              "from compressor.runtime import build as rb\n"
              "lib = rb.load_engine()\n"
              "lib.cmp_isa.restype, lib.cmp_isa.argtypes = ctypes.c_char_p, []\n"
              "print(lib.cmp_isa().decode(), 'torch' in sys.modules)\n")


def _run(body: str, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("COMPRESSOR_ENGINE_LIB", "CXX")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", body], env=full, capture_output=True, text=True, timeout=timeout)


def _entry(cache: Path) -> Path:
    (directory,) = [d for d in (cache / "engine").iterdir() if d.is_dir()]
    return directory


def _kill_mid_compile(cache: Path) -> None:
    """Start a first use in `cache` and SIGKILL it (with its compilers) once the compile has started."""
    full = {k: v for k, v in os.environ.items() if k not in ("COMPRESSOR_ENGINE_LIB", "CXX")}
    proc = subprocess.Popen([sys.executable, "-c", _PRINT_ISA], env=dict(full, COMPRESSOR_CACHE=str(cache)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert "compiling the generation engine" in proc.stderr.readline()
        deadline = time.monotonic() + 60
        while not list(cache.glob("engine/*/obj-*/*.log")) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()


@pytest.fixture(scope="session")
def engine_cache(tmp_path_factory) -> Path:
    """A cache where a first use was killed half-way, then a fresh process compiled the engine."""
    cache = tmp_path_factory.mktemp("engine-cache")
    _kill_mid_compile(cache)
    assert not list(cache.glob(f"engine/*/{buildcache.MARKER}")), "a killed compile must leave no marker"
    assert not list(cache.glob(f"engine/*/{rb.LIB_NAME}"))
    first = _run(_PRINT_ISA, COMPRESSOR_CACHE=str(cache))
    assert first.returncode == 0, first.stderr
    assert first.stderr.count("compressor: compiling the generation engine") == 1, first.stderr
    assert buildcache.is_complete(_entry(cache))
    return cache


def test_load_engine_returns_one_cdll_with_a_kernel_set(engine_cache, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(engine_cache))
    monkeypatch.delenv("COMPRESSOR_ENGINE_LIB", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(rb, "_engine", None)        # this test's load, undone afterwards
    lib = rb.load_engine()
    assert isinstance(lib, ctypes.CDLL) and rb.load_engine() is lib   # one per process
    lib.cmp_isa.restype, lib.cmp_isa.argtypes = ctypes.c_char_p, []
    assert lib.cmp_isa() in _ISAS
    assert Path(lib._name) == _entry(engine_cache) / rb.LIB_NAME


def test_kernel_set_names_are_the_ones_tested():
    root = rb.source_root()
    names = {m.encode() for f in (root / "cpu").glob("kernels_*.cpp")
             for m in re.findall(r'KernelSet\s+\w+\{"(\w+)"', f.read_text())}
    assert names == _ISAS


def test_sources_cover_every_include():
    """Every quoted #include of the engine's files is an engine file, so it is hashed and copied."""
    root = rb.source_root()
    assert root is not None and (root / "engine" / "engine.cpp").is_file()
    listed = set(rb.ENGINE_SOURCES + rb.ENGINE_HEADERS)
    for name in listed:
        for inc in re.findall(r'#include\s+"([^"]+)"', (root / name).read_text()):
            target = (root / name).parent.joinpath(inc).resolve().relative_to(root.resolve()).as_posix()
            assert target in listed, f"{name} includes {inc}, not in ENGINE_HEADERS"
    assert not {"cpu/ops.h", "cpu/ops.cpp", "cpu/layer.cpp"} & listed   # the torch extension's files


def test_cache_key_changes_with_any_source_byte_and_the_compiler(tmp_path):
    sources = rb.read_sources(rb.source_root())
    assert set(sources) == set(rb.ENGINE_SOURCES + rb.ENGINE_HEADERS)
    compiler = "/usr/bin/g++ 12.2.0"
    key = rb.cache_key(sources, compiler)
    assert len(key) == 16 and int(key, 16) >= 0
    assert rb.cache_key(dict(reversed(list(sources.items()))), compiler) == key   # order of reading is irrelevant
    copy = tmp_path / "csrc"
    for name, data in sources.items():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(data)
    assert rb.cache_key(rb.read_sources(copy), compiler) == key                   # location is irrelevant

    keys = {key}
    for name, data in sources.items():
        for pos in (0, len(data) // 2, len(data) - 1):
            flipped = bytearray(data)
            flipped[pos] ^= 1
            keys.add(rb.cache_key({**sources, name: bytes(flipped)}, compiler))
    assert len(keys) == 1 + 3 * len(sources)                                      # every one-byte change
    assert rb.cache_key(sources, "/usr/bin/g++ 13.1.0") != key
    assert rb.cache_key(sources, "/usr/local/bin/g++ 12.2.0") != key


def test_second_process_reuses_the_cache(engine_cache):
    lib = _entry(engine_cache) / rb.LIB_NAME
    before = lib.stat().st_mtime_ns
    r = _run(_PRINT_ISA, COMPRESSOR_CACHE=str(engine_cache))
    assert r.returncode == 0, r.stderr
    assert "compiling" not in r.stderr
    assert lib.stat().st_mtime_ns == before
    assert len([d for d in (engine_cache / "engine").iterdir() if d.is_dir()]) == 1


def test_loading_the_engine_imports_no_torch(engine_cache):
    r = _run(_PRINT_ISA, COMPRESSOR_CACHE=str(engine_cache))
    assert r.returncode == 0, r.stderr
    isa, torch_loaded = r.stdout.split()
    assert isa.encode() in _ISAS and torch_loaded == "False"


def test_engine_lib_override_needs_no_compiler(engine_cache, tmp_path):
    lib = _entry(engine_cache) / rb.LIB_NAME
    r = _run(_PRINT_ISA, COMPRESSOR_ENGINE_LIB=str(lib), COMPRESSOR_CACHE=str(tmp_path), CXX="/nonexistent")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "engine").exists()


def test_engine_lib_override_that_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_ENGINE_LIB", str(tmp_path / "nope.so"))
    with pytest.raises(RuntimeError, match=r"COMPRESSOR_ENGINE_LIB=.*nope\.so' is not a file.*unset it"):
        rb._load()


def test_missing_compiler_is_a_clear_error(tmp_path):
    r = _run(_PRINT_ISA, COMPRESSOR_CACHE=str(tmp_path), CXX="/nonexistent")
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: ") and "'/nonexistent' is not found" in last
    assert "apt-get install g++" in last and "build-essential" in last and "COMPRESSOR_ENGINE_LIB" in last
    assert not list(tmp_path.glob(f"engine/*/{buildcache.MARKER}"))


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_compile_error_names_the_command_its_output_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "g++ -fno-such-option")   # fails at once, with a message
    monkeypatch.delenv("COMPRESSOR_ENGINE_LIB", raising=False)
    with pytest.raises(RuntimeError) as e:
        rb._load()
    msg = str(e.value)
    assert msg.startswith("compiling the generation engine failed: `") and "g++ -fno-such-option" in msg
    assert "-fno-such-option" in msg.split("\n", 1)[1]                 # the compiler's own complaint
    assert "apt-get install g++" in msg and "build-essential" in msg
    assert any(str(log) in msg for log in tmp_path.glob("engine/*/obj-*/*.log"))   # where the whole output is
    assert not list(tmp_path.glob(f"engine/*/{buildcache.MARKER}"))   # not complete: the next run retries
    assert not list(tmp_path.glob(f"engine/*/{rb.LIB_NAME}"))


def test_unwritable_cache_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("COMPRESSOR_CACHE", str(blocker))    # engine/ cannot be made under a file
    monkeypatch.delenv("COMPRESSOR_ENGINE_LIB", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(RuntimeError, match=rf"cannot write the engine cache {re.escape(str(blocker))}.*COMPRESSOR_CACHE"):
        rb._load()


def test_runtime_build_imports_no_torch():
    r = _run("import sys\n"
             "import compressor.runtime.build, compressor.buildcache\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith('compressor.kernels')))\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
