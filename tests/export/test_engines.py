"""The exports in the engines that read them (`compressor.export.engines`): GPTQModel and transformers
(through GPTQModel) for gptq (sym) and gptq-v2, each against compressor.load of the same checkpoint.

GPTQModel runs under $COMPRESSOR_GPTQMODEL_PYTHON (``scripts/install-gptqmodel.sh VENV``), or this
interpreter if it has gptqmodel; the tests skip with the install command otherwise. llama.cpp and
compressed-tensors have theirs in test_to_gguf.py and test_to_compressed_tensors.py."""
from __future__ import annotations

import os

import pytest
import torch

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


@pytest.fixture(scope="module")
def gptqmodel_worker():
    """engine -> one worker process under GPTQModel's interpreter (it imports slowly: one per engine)."""
    workers = {}

    def get(engine: str) -> ProcessWorker:
        if engine not in workers:
            workers[engine] = ProcessWorker(RUNNER, init={"engine": engine, "threads": 1, "context": 64},
                                            label=engine, python=_gptqmodel_python())
        return workers[engine]
    yield get
    for w in workers.values():
        w.close()


@pytest.mark.parametrize("engine", ["gptqmodel", "transformers"])
@pytest.mark.parametrize("setting,fmt", [("sym4g32", "gptq"), ("asym4g64", "gptq-v2")])
def test_gptq_exports_load_in_gptqmodel_and_transformers(quantized, tmp_path, setting, fmt, engine,
                                                        gptqmodel_worker):
    _gptqmodel_python()
    _logits_match(quantized(setting), fmt, engine, tmp_path, gptqmodel_worker)


@pytest.mark.parametrize("setting,fmt", [("head8", "gptq"), ("head4", "gptq-v2")])
def test_quantized_head_exports_load_in_gptqmodel(quantized, tmp_path, setting, fmt, gptqmodel_worker):
    """``lm_head: true`` gives the head GPTQModel's quantized Linear; the tied embedding is a float tensor.
    (Not transformers: optimum's GPTQ conversion, which it loads through, replaces only the Linears inside
    the decoder blocks, so lm_head would stay an unloaded float Linear; the export warns so.)"""
    _gptqmodel_python()
    _logits_match(quantized(setting), fmt, "gptqmodel", tmp_path, gptqmodel_worker)


def _logits_match(ck, fmt, engine, tmp_path, gptqmodel_worker):
    out = export(ck, fmt, tmp_path / fmt)
    ids = list(range(3, 3 + 48))
    ref = EngineRunner("compressor", threads=1)
    ref.load(str(ck))
    want = torch.tensor(ref.logits(ids))
    w = gptqmodel_worker(engine)
    info = w.call("load", path=str(out))
    got = torch.tensor(w.call("logits", ids=ids))
    assert info["dense_linears"] == 0, info                            # its quantized Linear, not a float copy
    # A random model's NLL hardly depends on its weights: compare the logits. GPTQModel runs bf16 here
    # (`EngineRunner`); its auto choice, which drops the zero points, is 10x further off than this bound.
    tol = 2e-2 if engine == "gptqmodel" else 1e-4
    assert float((got - want).abs().max()) <= tol * float(want.abs().max()), (got - want).abs().max()


def test_engine_table_names_an_install_for_every_engine():
    for name, e in ENGINES.items():
        assert e.install and e.module
    assert missing("llama.cpp", "/nonexistent/python") is not None
    with pytest.raises(ValueError, match="unknown engine 'vllm'"):
        EngineRunner("vllm")
