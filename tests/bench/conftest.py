"""Fixtures for compress-bench: the tiny llama of tests/conftest.py and its rtn-w8 checkpoint."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every compress-bench test runs on one thread (tests/conftest.py)."""


@pytest.fixture(scope="session")
def tiny_w8(tiny_llama, tmp_path_factory) -> Path:
    """The tiny llama compressed with rtn-w8: a real compressed checkpoint with the same tokenizer."""
    import compressor
    out = tmp_path_factory.mktemp("bench") / "w8"
    compressor.compress(str(tiny_llama), "rtn-w8", out, progress=False)
    return out


@pytest.fixture(scope="session")
def eval_text(tmp_path_factory) -> Path:
    """A few thousand tokens of text the tiny tokenizer knows."""
    p = tmp_path_factory.mktemp("evaltext") / "eval.txt"
    p.write_text(" ".join(["the quick brown fox jumps over the lazy dog.",
                           "a model that is smaller and faster.", "quantization rounds weights to a grid."] * 100))
    return p
