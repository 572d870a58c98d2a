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


@pytest.fixture(scope="session")
def task_data(tmp_path_factory) -> Path:
    """A HellaSwag and a PIQA file of a few items in the shared-data formats, in words the tiny tokenizer knows."""
    import json
    d = tmp_path_factory.mktemp("taskdata")
    ends = ["jumps over the lazy dog", "is a model", "rounds weights", "the fox"]
    lines = []
    for i in range(6):
        lines += [f"Fox: the quick brown fox {'a' * (i % 3)}", str(i % 4), *ends]
    (d / "hellaswag-val-5000.txt").write_text("\n".join(lines) + "\n")
    rows = [json.dumps({"goal": "make a model smaller", "sol1": "quantization rounds weights", "sol2": "the fox"})] * 5
    (d / "piqa-valid.jsonl").write_text("\n".join(rows) + "\n")
    (d / "piqa-valid-labels.lst").write_text("0\n1\n0\n0\n1\n")
    return d
