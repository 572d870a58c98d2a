"""Packaging: a wheel carries the shipped recipes and the kernel and engine sources it compiles on first use.

The wheel is built the way pip builds one, with ``COMPRESSOR_NO_BUILD_EXT=1`` so nothing compiles
(a few seconds). It is built from a copy of the source tree, because setuptools keeps ``build/``
between builds and a file deleted from the tree would otherwise still reach the wheel.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from compressor.runtime import build as runtime_build
from compressor.kernels import build

ROOT = Path(__file__).resolve().parents[1]
_NOT_COPIED = shutil.ignore_patterns(".git", "build", "dist", "out", "*.egg-info", "__pycache__", ".pytest_cache",
                                     "_sources")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_COPIED)
    env = dict(os.environ, COMPRESSOR_NO_BUILD_EXT="1")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        str(src), "-w", str(tmp / "wheel")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (path,) = (tmp / "wheel").glob("compressor-*.whl")
    with zipfile.ZipFile(path) as z:
        yield z


def test_wheel_has_every_recipe(wheel):
    recipes = sorted(p.name for p in (ROOT / "compressor" / "recipes").glob("*.yaml"))
    assert recipes, "no recipes in the source tree"
    for name in recipes:
        assert wheel.read(f"compressor/recipes/{name}") == (ROOT / "compressor" / "recipes" / name).read_bytes()


def test_wheel_has_the_kernel_sources_where_build_looks(wheel):
    # The first place `compressor.kernels.build` looks, as a path inside the wheel.
    inside = build._SOURCE_DIRS[0].relative_to(build._PACKAGE.parent).as_posix()
    assert inside == "compressor/_sources/csrc/cpu"
    sources = sorted(p for p in (ROOT / "csrc" / "cpu").iterdir() if p.suffix in (".cpp", ".h"))
    assert {p.name for p in sources} >= {"ops.cpp", "kernels.h"}
    assert sorted(n for n in wheel.namelist() if n.startswith(inside + "/")) == [f"{inside}/{p.name}" for p in sources]
    for p in sources:
        assert wheel.read(f"{inside}/{p.name}") == p.read_bytes()
    assert "compressor/_sources/cuda/README.md" in wheel.namelist()


def test_wheel_has_the_engine_sources_where_runtime_build_looks(wheel):
    """The torch-free engine (`compressor.runtime.build`) compiles csrc/engine and part of csrc/cpu."""
    inside = runtime_build._SOURCE_ROOTS[0].relative_to(runtime_build._PACKAGE.parent).as_posix()
    assert inside == "compressor/_sources/csrc"
    for name in runtime_build.ENGINE_SOURCES + runtime_build.ENGINE_HEADERS:
        assert wheel.read(f"{inside}/{name}") == (ROOT / "csrc" / name).read_bytes()
    assert "compressor/runtime/build.py" in wheel.namelist() and "compressor/buildcache.py" in wheel.namelist()


def test_wheel_without_extension_ships_no_binary_and_requires_ninja(wheel):
    names = wheel.namelist()
    assert not [n for n in names if n.endswith((".so", ".o", ".pyd"))], names
    (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    requires = [line.split(":", 1)[1].strip() for line in wheel.read(meta).decode().splitlines()
                if line.startswith("Requires-Dist:")]
    assert "ninja" in requires                      # torch.utils.cpp_extension.load needs it
