"""Shared fixtures: a tiny llama built here (no hub), data paths, markers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from compressor.testing import make_tiny_llama, make_tokenizer  # noqa: F401  (tests import them from here)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer llama (hidden 64, intermediate 128) with a real tokenizer, as an HF directory."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def tiny_bpe_llama(tmp_path_factory) -> Path:
    """The tiny llama with a tokenizer that has BPE merges (vocab 320 > its 259 bytes and specials), as
    every real GPT-2-style tokenizer has and llama.cpp requires."""
    return make_tiny_llama(tmp_path_factory.mktemp("tinybpe") / "llama", vocab=320)


@pytest.fixture(scope="session")
def tiny_llama_96(tmp_path_factory) -> Path:
    """Hidden 96: group size 64 does not divide it (the SmolLM2 g128 situation in miniature)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny96") / "llama", hidden=96, inter=192)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


@pytest.fixture
def one_thread():
    """Run a test on one thread. Tiny models run fastest that way, and on a shared 2-core machine a
    2-thread OpenMP region can wait a whole scheduler tick for a preempted thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def shrink_mlp_(model, widths: dict[int, int]) -> None:
    """Keep the first `w` intermediate channels of layer i's MLP (rows of gate/up, columns of down)."""
    for i, w in widths.items():
        mlp = model.model.layers[i].mlp
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = torch.nn.Linear(old.in_features, w, bias=old.bias is not None)
            new.weight.data = old.weight.data[:w].clone()
            setattr(mlp, name, new)
        old = mlp.down_proj
        new = torch.nn.Linear(w, old.out_features, bias=old.bias is not None)
        new.weight.data = old.weight.data[:, :w].clone()
        mlp.down_proj = new


@pytest.fixture
def shrink_mlp():
    """`shrink_mlp_(model, {layer: width})`: prune MLP channels by hand (tests of shape changes)."""
    return shrink_mlp_


@pytest.fixture
def calib_file(tmp_path):
    """A small calibration text for tiny-model passes."""
    f = tmp_path / "calib.txt"
    f.write_text(" ".join(["the quick brown fox jumps over the lazy dog; a model is smaller and faster"] * 300))
    return f


@pytest.fixture
def interrupt_training(monkeypatch):
    """``interrupt_training(n)``: the n-th training step (`compressor.train.step_loss`) raises
    KeyboardInterrupt, as a Ctrl-C would; ``.undo()`` puts the real step back."""
    import compressor.train as train_mod
    real = train_mod.step_loss

    class Interrupt:
        def __call__(self, n: int) -> None:
            calls = []

            def step(*a, **k):
                calls.append(1)
                if len(calls) == n:
                    raise KeyboardInterrupt
                return real(*a, **k)
            monkeypatch.setattr(train_mod, "step_loss", step)

        def undo(self) -> None:
            monkeypatch.setattr(train_mod, "step_loss", real)
    return Interrupt()


@pytest.fixture(scope="session")
def train_file(tmp_path_factory):
    """A small training text for the passes that train (lora, peqa, distill)."""
    f = tmp_path_factory.mktemp("text") / "train.txt"
    f.write_text(" ".join(["the quick brown fox jumps over the lazy dog; a model that is smaller and faster",
                           "perplexity of the compressed model", "quantization rounds weights to a grid"] * 120))
    return f
