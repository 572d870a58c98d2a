"""Checkpoints of the tiny llama for the export tests, one per quantization setting (session-scoped)."""
from __future__ import annotations

import pytest

from compressor import compress
from compressor.recipe import parse_recipe
from compressor.testing import make_tiny_llama

SETTINGS = {
    "asym4g32": {"rtn": {"bits": 4, "group_size": 32, "sym": False}},
    "sym4g32": {"rtn": {"bits": 4, "group_size": 32, "sym": True}},
    "sym8": {"rtn": {"bits": 8, "group_size": -1, "sym": True}},
    "asym4g64": {"rtn": {"bits": 4, "group_size": 64, "sym": False}},
    # a quantized head (the head pass) read by the tied embedding: int8 per channel, and 4-bit g64 asymmetric
    "head8": [{"rtn": {"bits": 4, "group_size": 32, "sym": True}}, {"head": {"bits": 8}}],
    "head4": [{"rtn": {"bits": 4, "group_size": 32, "sym": True}},
              {"head": {"bits": 4, "group_size": 64, "sym": False}}],
    "head8-only": [{"head": {"bits": 8}}],
}


@pytest.fixture(scope="session")
def quantized(tiny_bpe_llama, tmp_path_factory):
    """name -> checkpoint directory of the tiny llama quantized with SETTINGS[name] (built on demand);
    ``NAME-untied``: the same recipe on the tiny llama with an untied head."""
    made = {}

    def get(name: str):
        if name not in made:
            src = tiny_bpe_llama
            if name.endswith("-untied"):
                src = make_tiny_llama(tmp_path_factory.mktemp("untied") / "llama", vocab=320, tie=False)
            passes = SETTINGS[name.removesuffix("-untied")]
            out = tmp_path_factory.mktemp("q") / name
            compress(str(src), parse_recipe({"passes": passes if isinstance(passes, list) else [passes]}), out,
                     progress=False)
            made[name] = out
        return made[name]
    return get


@pytest.fixture(scope="session")
def act_order(tiny_bpe_llama, tmp_path_factory, calib_text):
    out = tmp_path_factory.mktemp("q") / "act"
    compress(str(tiny_bpe_llama), parse_recipe({"calibration": {"samples": 4, "seqlen": 32}, "passes": [
        {"gptq": {"bits": 4, "group_size": 32, "sym": False, "act_order": True}}]}), out,
        calib_data=str(calib_text), progress=False)
    return out


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text("the quick brown fox jumps over the lazy dog. a model that is smaller and faster.\n" * 200)
    return p
