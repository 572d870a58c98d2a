"""The exports in the engines that read them (`compressor.export.engines`): GPTQModel and transformers
(through GPTQModel) for gptq (sym) and gptq-v2, each against compressor.load of the same checkpoint.

GPTQModel runs under $COMPRESSOR_GPTQMODEL_PYTHON (``scripts/install-gptqmodel.sh VENV``), or this
interpreter if it has gptqmodel; the tests skip with the install command otherwise. llama.cpp and
compressed-tensors have theirs in test_to_gguf.py and test_to_compressed_tensors.py."""
from __future__ import annotations

import os

import pytest

from compressor.export import export
from compressor.export.engines import ENGINES, EngineRunner, missing
from compressor.worker import ProcessWorker

RUNNER = "compressor.export.engines:EngineRunner"
GPTQMODEL_PYTHON = os.environ.get("COMPRESSOR_GPTQMODEL_PYTHON")


def _gptqmodel_python() -> str | None:
    why = missing("gptqmodel", GPTQMODEL_PYTHON)
    if why:
        pytest.skip(why)
    return GPTQMODEL_PYTHON


def _ask(engine: str, path, ids, python=None):
    with ProcessWorker(RUNNER, init={"engine": engine, "threads": 1, "context": 64}, label=engine,
                       python=python) as w:
        info = w.call("load", path=str(path))
        return info, w.call("nll", ids=ids), w.call("greedy", prompt=ids[:8], n=8)["tokens"]


@pytest.mark.parametrize("setting,fmt", [("sym4g32", "gptq"), ("asym4g64", "gptq-v2"), ("asym4g32", "gptq-v2")])
@pytest.mark.parametrize("engine", ["gptqmodel", "transformers"])
def test_gptq_exports_load_in_gptqmodel_and_transformers(quantized, tmp_path, setting, fmt, engine):
    python = _gptqmodel_python()
    ck = quantized(setting)
    out = export(ck, fmt, tmp_path / fmt)
    ids = list(range(3, 3 + 48))
    ref = EngineRunner("compressor", threads=1)
    ref.load(str(ck))
    nll_ref, tok_ref = ref.nll(ids), ref.greedy(ids[:8], 8)["tokens"]
    info, nll, tok = _ask(engine, out, ids, python)
    assert any("Quant" in t or "Linear" in t and t != "Linear" for t in info["linear_types"]), info
    assert abs(nll / nll_ref - 1) < 0.01, (nll, nll_ref)                # fp16 activations in GPTQModel's kernel
    assert tok == tok_ref


def test_engine_table_names_an_install_for_every_engine():
    for name, e in ENGINES.items():
        assert e.install and e.module
    assert missing("llama.cpp", "/nonexistent/python") is not None
    with pytest.raises(ValueError, match="unknown engine 'vllm'"):
        EngineRunner("vllm")
