"""The engines that read each export format, behind one interface: the smoke tests, `benchmarks/engines.py`
and `compress-bench` ask every engine the same questions.

    r = EngineRunner("llama.cpp", threads=2)
    r.load("out/gptq-gguf")            # a directory written by compressor.export, or a checkpoint
    r.nll(ids)                         # summed NLL of ids[1:] given their prefixes: one perplexity window
    r.greedy(prompt, 32)               # {"tokens": [...], "prefill_s": ..., "decode_s": ...}

One engine per process: `EngineRunner` is a `compressor.worker` factory, so a benchmark holds each
engine in a child of its own (``ProcessWorker("compressor.export.engines:EngineRunner", ...)``),
and GPTQModel, whose wheel pins a torch this project does not install, runs under another
interpreter (``python=``, see ``scripts/install-gptqmodel.sh``).

| engine         | loads                                     | install                                        |
|----------------|-------------------------------------------|------------------------------------------------|
| `compressor`   | our checkpoint, `compressor.load`         | (this package)                                 |
| `transformers` | gptq (with GPTQModel), compressed-tensors | ``pip install '.[engines]'``                   |
| `gptqmodel`    | gptq (sym), gptq-v2                       | ``scripts/install-gptqmodel.sh VENV``          |
| `llama.cpp`    | gguf                                      | ``scripts/install-llama-cpp.sh`` (or ``.[llama]``) |
| `ort`          | onnx (`compressor.export.ort.OrtDecoder`) | ``pip install '.[onnx]'`` (``.[onnx-gpu]``: CUDA) |

Greedy decoding is the same loop for every engine: one forward over the prompt, then one token at a
time from the cache, no EOS check, timed in two parts like `compressor.bench.measure.greedy`.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ENGINES", "EngineRunner", "missing", "gguf_file"]


@dataclass(frozen=True)
class Engine:
    module: str          # what must import for the engine to run
    install: str         # how to get it, for the skip reason and the error
    dtype: str           # what the engine computes in (the tolerance a check allows depends on it)


ENGINES = {
    "compressor": Engine("compressor", "pip install -e .", "fp32"),
    "transformers": Engine("transformers", "pip install '.[engines]' (compressed-tensors; GPTQ needs gptqmodel)",
                           "fp32"),
    "gptqmodel": Engine("gptqmodel", "scripts/install-gptqmodel.sh VENV, then pass VENV/bin/python", "bf16"),
    "llama.cpp": Engine("llama_cpp", "scripts/install-llama-cpp.sh (pip install '.[llama]' on CPUs without AMX)",
                        "fp32 (int8 dot products)"),
    "ort": Engine("onnxruntime", "pip install '.[onnx]'", "fp32 (accuracy_level 4: int8 activations)"),
}


def missing(engine: str, python: str | None = None) -> str | None:
    """Why `engine` cannot run under `python` (default this interpreter), or None if it can."""
    e = ENGINES[engine]
    # a venv's python is a symlink to its base interpreter: compare the paths as given, not resolved
    if python is None or os.path.abspath(python) == os.path.abspath(sys.executable):
        ok = importlib.util.find_spec(e.module) is not None
    elif not Path(python).is_file():
        return f"{engine}: the interpreter {python!r} does not exist ({e.install})"
    else:
        ok = subprocess.run([python, "-c", f"import {e.module}"], capture_output=True).returncode == 0
    return None if ok else f"{engine} needs the {e.module!r} module ({e.install})"


def gguf_file(path: str | Path) -> Path:
    """The .gguf file of an export directory (or the file itself)."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(p.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"{p}: no .gguf file; export it with compress export gguf CKPT -o DIR")
    return files[0]


def _transformers_options(path: Path) -> dict:
    """from_pretrained options for an export. An asymmetric compressed-tensors model loads only
    decompressed (``dequantize=True``): in transformers 5.25 with compressed-tensors 0.20 the
    compressed modules are built with unpacked (N, G) zero points while the format, as
    compressed-tensors itself writes and reads it, packs them to (N*bits/32, G)
    (vllm-project/llm-compressor#1618). The weights are then those compressed-tensors' own
    decompressor computes from our file."""
    import json
    try:
        qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return {}
    groups = (qc.get("config_groups") or {}).values() if qc.get("quant_method") == "compressed-tensors" else ()
    if any(not (g.get("weights") or {}).get("symmetric", True) for g in groups):
        from transformers.utils.quantization_config import CompressedTensorsConfig
        return {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    return {}


def _dense_linears(model) -> int:
    """Linear layers of the decoder (not the head) holding a float weight matrix: 0 when the engine runs
    every quantized layer on its own packed weights, all of them when it decompressed at load."""
    import torch
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sum(1 for m in model.modules() if "Linear" in type(m).__name__ and m is not head
               and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.is_floating_point()
               and m.weight.dim() == 2)


class EngineRunner:
    """One engine holding one model. Each public method is one `compressor.worker` command."""

    def __init__(self, engine: str, threads: int = 2, context: int = 2048):
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose one of {sorted(ENGINES)}")
        why = missing(engine)
        if why:
            raise RuntimeError(why)
        import torch
        torch.set_num_threads(threads)
        self.engine, self.threads, self.context = engine, threads, context
        self.model = self.llm = self.ort = None
        self.mode = ""                  # how the engine was asked to load, when not its default

    def load(self, path: str) -> dict:
        t0 = time.perf_counter()
        import torch
        if self.engine == "compressor":
            from compressor.bench.measure import load_model      # compressor.load + prepare_, as compress-bench
            self.model = load_model(path)[0]
        elif self.engine == "transformers":
            from transformers import AutoModelForCausalLM
            kw = _transformers_options(Path(path))
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
            self.mode = "dequantize=True" if kw else ""
        elif self.engine == "gptqmodel":
            from gptqmodel import BACKEND, GPTQModel
            # The backend is named: on CPU in fp32 GPTQModel 7.7 picks TorchFusedLinear, whose CPU transform
            # replaces every zero point by 8 (asymmetric models come out garbage: ppl 1e8 on SmolLM2), and
            # TorchAtenLinear in fp16 is 15x slower than in bf16 on a CPU without fp16 arithmetic.
            self.model = GPTQModel.load(path, device="cpu", dtype=torch.bfloat16, backend=BACKEND.GPTQ_TORCH_ATEN).model
        elif self.engine == "ort":
            from .ort import OrtDecoder
            self.ort = OrtDecoder(path, self.threads)
            self.mode = self.ort.provider
        else:
            from llama_cpp import Llama
            self.llm = Llama(model_path=str(gguf_file(path)), n_ctx=self.context, n_batch=512, n_threads=self.threads,
                             n_threads_batch=self.threads, logits_all=True, verbose=False)
        info = {"engine": self.engine, "load_s": time.perf_counter() - t0, "version": self._version(),
                "mode": self.mode}
        if self.model is not None:
            self.model.eval()
            info["linear_types"] = sorted({type(m).__name__ for m in self.model.modules() if "Linear" in type(m).__name__})
            info["dense_linears"] = _dense_linears(self.model)
        return info

    def _version(self) -> str:
        mod = ENGINES[self.engine].module
        from importlib.metadata import PackageNotFoundError, version
        for dist in (mod, mod.replace("_", "-"), {"llama_cpp": "llama-cpp-python"}.get(mod, mod), f"{mod}-gpu"):
            try:
                return version(dist)
            except PackageNotFoundError:
                continue
        return "?"

    def nll(self, ids: list[int]) -> float:
        """Summed NLL of ids[1:] given their prefixes (one window, `compressor.eval.perplexity`'s unit)."""
        import torch
        import torch.nn.functional as F
        x = torch.tensor(ids, dtype=torch.int64)
        if self.ort is not None:
            return self.ort.nll(ids)
        if self.llm is not None:
            self._eval(ids, all_logits=True)
            logits = torch.from_numpy(self.llm.scores[:len(ids) - 1].copy())
            return F.cross_entropy(logits.float(), x[1:], reduction="sum").item()
        with torch.inference_mode():
            if self.engine == "compressor":
                from compressor.eval import _window_nll     # the head in chunks, as compressor.eval does
                return _window_nll(self.model, x.unsqueeze(0))
            # the whole model's forward: engines hook it (compressed-tensors onloads its weights there)
            logits = self.model(input_ids=x.unsqueeze(0), use_cache=False).logits[0, :-1]
            return F.cross_entropy(logits.float(), x[1:], reduction="sum").item()

    def perplexity(self, ids: list[int], seqlen: int) -> float:
        """exp of the mean NLL over the whole `seqlen` windows of `ids`, as `compressor.eval.perplexity` counts."""
        import math
        n = len(ids) // seqlen
        if n < 1:
            raise ValueError(f"{len(ids)} tokens are fewer than one window of {seqlen}")
        return math.exp(sum(self.nll(ids[i * seqlen:(i + 1) * seqlen]) for i in range(n)) / (n * (seqlen - 1)))

    def logits(self, ids: list[int]) -> list[list[float]]:
        """fp32 logits at every position of `ids` (small inputs: tests)."""
        import torch
        if self.ort is not None:
            return self.ort.logits(ids).tolist()
        if self.llm is not None:
            self._eval(ids, all_logits=True)
            return self.llm.scores[:len(ids)].tolist()
        with torch.inference_mode():
            return self.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().tolist()

    def greedy(self, prompt: list[int], n: int) -> dict:
        """`n` greedy tokens after `prompt`, the prompt's forward and the n - 1 decode steps timed apart."""
        if self.ort is not None:
            import numpy as np
            tokens, pre, dec = self.ort.greedy(np.asarray([prompt], np.int64), n)
            return {"tokens": tokens[0].tolist(), "prefill_s": pre, "decode_s": dec}
        if self.llm is None:
            import torch

            from compressor.bench.measure import greedy
            tokens, pre, dec = greedy(self.model, torch.tensor([prompt], dtype=torch.int64), n)
            return {"tokens": tokens[0].tolist(), "prefill_s": pre, "decode_s": dec}
        t0 = time.perf_counter()
        tok = self._eval(prompt, all_logits=False)
        t1 = time.perf_counter()
        out = [tok]
        for _ in range(n - 1):
            tok = self._eval([tok], all_logits=False, reset=False)
            out.append(tok)
        return {"tokens": out, "prefill_s": t1 - t0, "decode_s": time.perf_counter() - t1}

    def _eval(self, ids: list[int], all_logits: bool, reset: bool = True) -> int:
        """llama.cpp forward over `ids` (after the cache unless `reset`); the argmax of the last logits.

        `all_logits` fills ``llm.scores`` for every position (perplexity); otherwise llama.cpp computes
        the head for the last position only, as the torch rows do (``logits_to_keep=1``). This flips
        llama-cpp-python 0.3.36's ``_logits_all``, which `eval` reads on every call (the extra pins it)."""
        import numpy as np
        llm = self.llm
        if reset:
            llm.reset()
        llm._logits_all = all_logits
        llm.eval(ids)
        if all_logits:
            return int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))
