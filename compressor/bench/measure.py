"""The measuring side of `compress-bench`: one model per process, driven one run at a time.

Why a process per model
-----------------------
Resident memory is a property of a process, not of a model. If BASE and a candidate shared one
interpreter, the candidate's "RSS after load" would include BASE's weights, and freed memory that
the allocator keeps would blur every later number. So each model lives in its own worker process
(`ProcessWorker`: a `Measurer` behind `compressor.worker`) that imports the same libraries, then
loads exactly one model. Its numbers are therefore comparable row to row:

  * ``rss_base``: RSS after importing torch, transformers and compressor, before the load: the same
    runtime overhead for every row (shown in the header, kept in the JSON);
  * ``rss_load``: RSS right after the load (and the kernel repack, `compressor.nn.prepare_`);
    this is what a server holding the model pays before its first request. It can be below the
    size of the weights when the loader maps the file and pages it in lazily (transformers does
    this for safetensors); the first run then faults the rest in;
  * ``peak_rss``: the high-water mark of RSS during one generation run. Linux lets a process reset
    its own high-water mark (``echo 5 > /proc/self/clear_refs``, then ``VmHWM`` in
    ``/proc/self/status``), so the peak is exact and excludes the load and perplexity peaks, and
    includes every page of weights the run touched. Where that file is unavailable a 1 ms psutil
    sampler thread stands in (``peak_rss_method`` says which).

All workers stay alive for the whole benchmark but only one runs at a time: the driver sends a
command to one, waits for its answer, then sends the next to another. That is what lets the runs
alternate A B A B ... (see `compressor.bench.run`) without the models competing for the cores.
Each public method of `Measurer` is one command (`compressor.worker` has the JSON-lines protocol);
`LocalWorker` runs the same `Measurer` in the calling process, for tests.

Generation is greedy with a KV cache, written out by hand rather than with ``model.generate`` so
the prefill and the decode steps are timed apart: one forward over the ``(batch, prompt_len)``
prompt gives the first token (its time is the time to first token, TTFT), then ``gen_len - 1``
single-token steps reuse the cache. No token is compared to EOS, so every run makes exactly
``gen_len`` tokens per sequence (the ``min_new_tokens == max_new_tokens`` of ``generate``).
Prompts are random token ids from a seeded generator, identical for every model with the same vocabulary.
"""
from __future__ import annotations

import gc
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from compressor import worker
from compressor.worker import WorkerError

__all__ = ["RunSample", "PeakRSS", "greedy", "Measurer", "LocalWorker", "ProcessWorker", "WorkerError", "rss_bytes"]

MEASURER = "compressor.bench.measure:Measurer"


@dataclass(frozen=True)
class RunSample:
    """One timed generation run of one model at one batch size (seconds and bytes)."""
    batch: int
    prefill_s: float      # forward over the prompt plus the argmax of the first token (= TTFT)
    decode_s: float       # the gen_len - 1 single-token steps that follow
    peak_rss: int         # high-water mark of RSS during this run

    def prefill_tok_s(self, prompt_len: int) -> float:
        return self.batch * prompt_len / self.prefill_s

    def decode_tok_s(self, gen_len: int) -> float:
        return self.batch * (gen_len - 1) / self.decode_s


# ---------------------------------------------------------------------------------------------
# resident memory
# ---------------------------------------------------------------------------------------------

def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def _reset_peak() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


class PeakRSS:
    """Context manager: ``.peak`` is the highest RSS (bytes) while the block ran."""

    def __enter__(self):
        self.exact = _reset_peak()
        self.peak = rss_bytes()
        if not self.exact:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        if self.exact:
            self.peak = max(self.peak, _status_kib("VmHWM") * 1024)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())
        return False


# ---------------------------------------------------------------------------------------------
# greedy generation, timed in two parts
# ---------------------------------------------------------------------------------------------

def greedy(model, ids, gen_len: int, prefill_reps: int = 1):
    """Greedy decoding with a KV cache: (tokens, prefill seconds, decode seconds).

    ids: (batch, prompt_len) int64. Returns tokens (batch, gen_len) int64. The prefill is one
    forward over the prompt plus the argmax of the first token; the decode is the ``gen_len - 1``
    single-token steps after it. Same tokens as ``model.generate(ids, do_sample=False,
    min_new_tokens=gen_len, max_new_tokens=gen_len)`` (tested), without its per-step overhead
    of logits processors and stopping criteria. With `prefill_reps` > 1 the prompt forward is
    timed that many times (the prefill is short and a noisy machine shows in it most) and the
    median is returned; the last one's cache feeds the decode.
    """
    import statistics

    import torch
    fast = getattr(getattr(model, "generate", None), "fast", None)
    if fast is not None:                  # what `compressor.load` gives: the fast path (compressor.nn.decoder)
        return _greedy_fast(fast, ids, gen_len, prefill_reps)
    out_tokens, pre = [], []
    with torch.inference_mode():
        for _ in range(prefill_reps):
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)             # (batch, 1)
            pre.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        cache = out.past_key_values
        del out
        out_tokens.append(tok)
        for _ in range(gen_len - 1):
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            cache = out.past_key_values
            out_tokens.append(tok)
        t2 = time.perf_counter()
    return torch.cat(out_tokens, dim=1), statistics.median(pre), t2 - t1


def _greedy_fast(fast, ids, gen_len: int, prefill_reps: int):
    """`greedy` on `compressor.nn.decoder.FastDecoder`, on the path its ``generate`` takes (`FastDecoder.stepper`:
    the engine where it runs, else the op path). The same tokens as ``generate`` (tested)."""
    import statistics

    import torch
    fast_step = fast.stepper(ids.shape[0], ids.shape[1] + gen_len)

    def step(tokens, pos):
        return torch.from_numpy(fast_step(tokens.long().numpy(), pos))
    out_tokens, pre = [], []
    with torch.inference_mode():
        for _ in range(prefill_reps):
            t0 = time.perf_counter()
            tok = step(ids, 0).argmax(-1, keepdim=True)
            pre.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        out_tokens.append(tok)
        for i in range(gen_len - 1):
            tok = step(tok, ids.shape[1] + i).argmax(-1, keepdim=True)
            out_tokens.append(tok)
        t2 = time.perf_counter()
    return torch.cat(out_tokens, dim=1), statistics.median(pre), t2 - t1


# ---------------------------------------------------------------------------------------------
# the measurer: holds one model, answers commands
# ---------------------------------------------------------------------------------------------

def load_model(path: str | Path):
    """(model, tokenizer, kind) for a resolved directory: a compressed checkpoint or an HF model."""
    from compressor.checkpoint import is_checkpoint
    if is_checkpoint(path):
        import compressor
        from compressor.nn import prepare_
        model, tok = compressor.load(path, with_tokenizer=True)      # prepared for inference (the fast path)
        return prepare_(model), tok, "checkpoint"
    from compressor.models import load_hf
    model, tok = load_hf(path)
    return model, tok, "hf"


def kernels_used(model) -> str:
    """`compressor.kernels.backend()` if any module of `model` runs on compressor's ops, else "".

    An HF model (and a checkpoint of bitsandbytes layers) runs on torch's or its library's own
    Linear, so naming compressor's kernels for it would be wrong.
    """
    from compressor import kernels
    from compressor.nn import HalfLinear, QuantLinear
    uses = any(isinstance(m, (QuantLinear, HalfLinear)) for m in model.modules())
    return kernels.backend() if uses else ""


class Measurer:
    """One model in this process. Each public method is one worker command and answers a JSON-able dict."""

    def __init__(self, threads: int):
        import torch

        import compressor.eval  # noqa: F401  (import everything before the baseline RSS is read)
        import transformers  # noqa: F401
        torch.set_num_threads(threads)
        self.model = self.tokenizer = self.engine = None
        self.threads = threads
        gc.collect()
        self.rss_base = rss_bytes()

    def load(self, path: str, engine: str = "torch", context: int = 2048) -> dict:
        """Load the model at `path`: in torch, or in another engine (`compressor.export.engines.EngineRunner`):
        ``"llama.cpp"`` (a gguf export, with a context of `context` tokens) or ``"ort"`` (an onnx export)."""
        t0 = time.perf_counter()
        note = ""
        if engine in ("llama.cpp", "ort"):
            from compressor.export.engines import EngineRunner
            self.engine = EngineRunner(engine, threads=self.threads, context=context)
            info = self.engine.load(path)
            if engine == "ort":
                from compressor.export import export_meta
                level = (export_meta(path) or {}).get("accuracy_level", "?")
                note = f"accuracy_level {level}, {info['mode']}"
                kind, kernels = "onnx", f"onnxruntime {info['version']} ({note})"
            else:
                kind, kernels = "gguf", f"llama.cpp (llama-cpp-python {info['version']})"
        else:
            self.model, self.tokenizer, kind = load_model(path)
            kernels = kernels_used(self.model)
        load_s = time.perf_counter() - t0
        gc.collect()
        return {"kind": kind, "load_s": load_s, "rss_base": self.rss_base, "rss_load": rss_bytes(),
                "peak_rss_method": "VmHWM" if _reset_peak() else "psutil-sampler", "kernels": kernels,
                "engine_note": note}

    def generate(self, batch: int, prompt_len: int, gen_len: int, seed: int, prefill_reps: int = 1) -> dict:
        """One greedy run on seeded random prompts: time the prefill (TTFT) and the decode steps apart."""
        import torch
        g = torch.Generator().manual_seed(seed)
        ort = self.engine.ort if self.engine is not None else None
        if ort is not None:
            vocab = ort.vocab
        else:
            vocab = self.engine.llm.n_vocab() if self.engine is not None else self.model.config.vocab_size
        ids = torch.randint(0, vocab, (batch, prompt_len), generator=g)  # (batch, prompt_len)
        with PeakRSS() as mem:
            if ort is not None:                # ONNX Runtime: any batch, one prefill
                _, prefill_s, decode_s = ort.greedy(ids.numpy(), gen_len, prefill_reps)
            elif self.engine is not None:      # llama.cpp: one sequence, one prefill (`check_engines`)
                if batch != 1:
                    raise ValueError(f"llama.cpp rows run batch 1 only, asked for {batch}")
                r = self.engine.greedy(ids[0].tolist(), gen_len)
                prefill_s, decode_s = r["prefill_s"], r["decode_s"]
            else:
                _, prefill_s, decode_s = greedy(self.model, ids, gen_len, prefill_reps)
        return asdict(RunSample(batch=batch, prefill_s=prefill_s, decode_s=decode_s, peak_rss=mem.peak))

    def tasks(self, tasks: list[str], data: str | None, limit: int | None, precision: str) -> dict:
        """acc / acc_norm and the per-item scores of each task (`compressor.tasks`), as dicts."""
        from compressor.tasks import evaluate
        res = evaluate(self.model, self.tokenizer, tasks, data, limit, precision=precision, progress=False)
        return {t: asdict(r) for t, r in res.items()}

    def perplexity(self, ids: list[int], seqlen: int) -> dict:
        import torch

        from compressor.eval import perplexity
        t0 = time.perf_counter()
        if self.engine is not None:            # the same windows and sum as compressor.eval.perplexity
            ppl = self.engine.perplexity(ids, seqlen)
        else:
            ppl = perplexity(self.model, None, torch.tensor(ids, dtype=torch.int64), seqlen=seqlen, progress=False)
        return {"ppl": ppl, "seconds": time.perf_counter() - t0, "windows": len(ids) // seqlen}


class LocalWorker(worker.LocalWorker):
    """The `Measurer` in this process (tests, debugging). Memory numbers then include whatever else
    the process holds, so `compressor.bench.run` uses `ProcessWorker` unless told otherwise."""

    def __init__(self, threads: int, label: str = "model"):
        super().__init__(MEASURER, init={"threads": threads}, label=label)


class ProcessWorker(worker.ProcessWorker):
    """A `Measurer` in a child process of its own, its OpenMP and MKL pools sized to `threads`."""

    def __init__(self, threads: int, label: str = "model"):
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
        super().__init__(MEASURER, init={"threads": threads}, env=env, label=label)
