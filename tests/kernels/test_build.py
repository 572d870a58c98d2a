"""`compressor.kernels.build`: the cache key, the reasons and fixes of a fallback, the one warning.

The default tests compile nothing. They block `compressor._C` in a subprocess (``None`` in
``sys.modules``) and point CXX at a missing compiler, so the real first-use path runs up to the
compile. `test_first_use_compile_and_cache` is the real compile (about 40 s on 2 cores), marked slow.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from compressor.kernels import build

# Runs `body` in a fresh interpreter where `import compressor._C` fails as after a plain `pip install .`.
_WITHOUT_SETUP_PY_BUILD = "import sys; sys.modules['compressor._C'] = None\n"


def _run(body: str, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "COMPRESSOR_NO_EXT"}   # not inherited
    full.update(env)
    return subprocess.run([sys.executable, "-c", body], env=full, capture_output=True, text=True, timeout=600)


def test_sources_found():
    d = build.source_dir()
    assert d is not None and d.name == "cpu"
    names = set(build.read_sources(d))
    assert {"ops.cpp", "kernels.h", "kernels_avx2.cpp", "kernels_avx512.cpp", "kernels_scalar.cpp"} <= names


def test_cache_key_changes_with_any_source_byte_and_nothing_else(tmp_path):
    sources = build.read_sources(build.source_dir())
    key = build.cache_key(sources)
    assert len(key) == 16 and int(key, 16) >= 0
    assert build.cache_key(dict(sources)) == key                       # same bytes, same key
    assert build.cache_key(dict(reversed(list(sources.items())))) == key  # order of reading is irrelevant
    copy = tmp_path / "elsewhere"
    shutil.copytree(build.source_dir(), copy)
    assert build.cache_key(build.read_sources(copy)) == key            # location is irrelevant

    keys = {key}
    for name, data in sources.items():
        for pos in (0, len(data) // 2, len(data) - 1):
            flipped = bytearray(data)
            flipped[pos] ^= 1
            keys.add(build.cache_key({**sources, name: bytes(flipped)}))
    assert len(keys) == 1 + 3 * len(sources)                           # every one-byte change is a new key

    renamed = dict(sources)
    renamed["ops2.cpp"] = renamed.pop("ops.cpp")
    assert build.cache_key(renamed) != key


def test_cache_key_changes_with_torch_version(monkeypatch):
    sources = build.read_sources(build.source_dir())
    key = build.cache_key(sources)
    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")
    assert build.cache_key(sources) != key


def test_fallback_message_names_reason_cost_and_fix():
    msg = build.fallback_message("no C++ compiler: 'c++' is not on PATH", "`apt-get install g++`, then rerun")
    assert "no C++ compiler: 'c++' is not on PATH" in msg
    assert "`apt-get install g++`" in msg
    assert "10x slower" in msg and "0.3x HF fp32" in msg
    assert "COMPRESSOR_NO_EXT=1" in msg


def test_warn_fallback_once_per_process(monkeypatch):
    monkeypatch.setattr(build, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert build.warn_fallback("reason A", "fix A") is True
        assert build.warn_fallback("reason B", "fix B") is False
    assert len(caught) == 1
    assert issubclass(caught[0].category, build.ReferenceKernelWarning)
    assert str(caught[0].message) == build.fallback_message("reason A", "fix A")


def test_no_compiler_is_a_reason_with_a_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    with pytest.raises(build._Unavailable) as e:
        build._load_cached_or_compile()
    assert e.value.reason == "no C++ compiler: 'no-such-c++-compiler' is not on PATH"
    assert "apt-get install g++" in e.value.fix


def test_unwritable_cache_is_a_reason_with_a_fix(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("COMPRESSOR_CACHE", str(blocker))       # kernels/ cannot be made under a file
    monkeypatch.setenv("CXX", sys.executable)                   # passes the compiler-on-PATH check first
    with pytest.raises(build._Unavailable) as e:
        build._load_cached_or_compile()
    assert str(blocker) in e.value.reason and "COMPRESSOR_CACHE" in e.value.fix


def test_compile_failure_is_a_reason_with_the_log_and_a_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")                  # on PATH, fails at once: no compile needed
    with pytest.raises(build._Unavailable) as e:
        build._load_cached_or_compile()
    (log,) = tmp_path.glob("kernels/*/build-error.log")
    assert e.value.reason.startswith("compiling the C++ kernels failed: ") and str(log) in e.value.reason
    assert "apt-get install g++ python3-dev" in e.value.fix and "--no-build-isolation" in e.value.fix
    assert not list(tmp_path.glob("kernels/*/build.json"))   # not marked complete: the next run retries


def test_missing_ninja_is_a_reason_with_a_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))           # no ninja binary
    monkeypatch.setitem(sys.modules, "ninja", None)     # and no ninja package
    with pytest.raises(build._Unavailable) as e:
        with build._ninja_on_path():
            pass
    assert "ninja is not installed" in e.value.reason and "pip install ninja" in e.value.fix


def test_ninja_package_is_put_on_path_for_the_build(tmp_path, monkeypatch):
    """A venv's python run without activating the venv: the ninja wheel's binary is off PATH."""
    ninja = pytest.importorskip("ninja")
    monkeypatch.setenv("PATH", str(tmp_path))
    with build._ninja_on_path():
        assert shutil.which("ninja") == str(Path(ninja.BIN_DIR) / "ninja")
    assert os.environ["PATH"] == str(tmp_path)


def test_no_ext_reports_the_reference_with_the_reason():
    r = _run("import compressor.kernels as k; print(k.backend())", COMPRESSOR_NO_EXT="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "pytorch reference (disabled by COMPRESSOR_NO_EXT=1)"
    assert "ReferenceKernelWarning" not in r.stderr              # asked for: no warning


def test_fallback_warns_once_with_reason_and_fix(tmp_path):
    """No setup.py build and no compiler: the reference, one warning naming both, and the ops work."""
    r = _run(_WITHOUT_SETUP_PY_BUILD +
             "import compressor.kernels as k\n"
             "print(k.backend())\n",
             COMPRESSOR_CACHE=str(tmp_path), CXX="no-such-c++-compiler")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "pytorch reference (no C++ compiler: 'no-such-c++-compiler' is not on PATH)"
    assert r.stderr.count("ReferenceKernelWarning") == 1
    assert "apt-get install g++" in r.stderr and "10x slower" in r.stderr


@pytest.mark.slow
def test_first_use_compile_and_cache(tmp_path):
    """The real compile into an empty cache, then a second process that only imports the .so."""
    check = (_WITHOUT_SETUP_PY_BUILD +
             "import torch, compressor.kernels as k\n"
             "from compressor.quant.primitives import choose_qparams, quantize\n"
             "w = torch.randn(70, 256, generator=torch.Generator().manual_seed(0))\n"
             "s, z = choose_qparams(w, 4, 64, False)\n"
             "p = k.pack(quantize(w, s, z, 4, 64), s, z, 4, 64)\n"
             "x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))\n"
             "y, ref = p(x), k.reference(x, *p.args(), bits=4)\n"
             "print(k.backend()); print(float((y - ref).norm() / ref.norm()))\n")
    first = _run(check, COMPRESSOR_CACHE=str(tmp_path))
    assert first.returncode == 0, first.stderr
    backend, err = first.stdout.splitlines()
    key = build.cache_key(build.read_sources(build.source_dir()))
    assert backend.endswith(f"(compiled on first use, cached in {tmp_path / 'kernels' / key})")
    assert float(err) <= 1e-5
    assert first.stderr.count("compressor: compiling the C++ CPU kernels") == 1

    second = _run(check, COMPRESSOR_CACHE=str(tmp_path))
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert "compiling" not in second.stderr
