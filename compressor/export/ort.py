"""An ``onnx`` export run in ONNX Runtime: the session, one forward with the KV cache, greedy decoding.

    dec = OrtDecoder("out/gptq-w4g64-onnx", threads=2)
    dec.nll(ids)                      # summed NLL of one window
    dec.greedy(prompt, 64)            # (tokens (batch, n), prefill seconds, decode seconds)

The execution provider is CUDA when ``onnxruntime-gpu`` is installed and sees a GPU (the ``onnx-gpu``
extra), else the CPU; nodes a provider lacks run on the CPU. This is what `compress-bench --engine ort`
and `compressor.export.engines.EngineRunner("ort")` drive; optimum's ``ORTModelForCausalLM`` loads
the same directory (tests/export/test_to_onnx.py checks that it generates the same tokens).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

__all__ = ["OrtDecoder", "providers", "MISSING"]

MISSING = "the ONNX Runtime engine needs the onnx extra: pip install 'compressor[onnx]' (onnx, onnxruntime)"


def providers() -> list[str]:
    """CUDA first when this onnxruntime has it (onnxruntime-gpu), then the CPU."""
    import onnxruntime as ort
    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


class OrtDecoder:
    """One export directory in one ``InferenceSession``."""

    def __init__(self, path: str | Path, threads: int = 2):
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeError(MISSING) from None
        path = Path(path)
        model = path / "model.onnx"
        if not model.is_file():
            raise FileNotFoundError(f"{path}: no model.onnx; export a checkpoint with compress export onnx CKPT -o DIR")
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.log_severity_level = 3           # the optional num_logits_to_keep input is an initializer on purpose
        self.sess = ort.InferenceSession(str(model), so, providers=providers())
        self.provider = self.sess.get_providers()[0]
        self.version = ort.__version__
        cfg = json.loads((path / "config.json").read_text())
        self.layers, self.vocab = cfg["num_hidden_layers"], cfg["vocab_size"]
        heads = cfg["num_attention_heads"]
        self.kv = cfg.get("num_key_value_heads") or heads
        self.hd = cfg.get("head_dim") or cfg["hidden_size"] // heads
        self.keep = "num_logits_to_keep" in {i.name for i in self.sess.get_overridable_initializers()}

    def forward(self, ids: np.ndarray, past: list[np.ndarray] | None, keep: int = 0):
        """(logits (batch, seq or keep, vocab), present) for `ids` (batch, seq) after the cache `past`."""
        b, s = ids.shape
        if past is None:
            past = [np.zeros((b, self.kv, 0, self.hd), np.float32)] * (2 * self.layers)
        p = past[0].shape[2]
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((b, p + s), np.int64),
                "position_ids": np.broadcast_to(np.arange(p, p + s, dtype=np.int64), (b, s)).copy()}
        for i in range(self.layers):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
        if keep and self.keep:
            feed["num_logits_to_keep"] = np.array([keep], np.int64)
        out = self.sess.run(None, feed)
        return out[0], out[1:]

    def nll(self, ids: list[int]) -> float:
        """Summed NLL of ids[1:] given their prefixes (one window)."""
        import torch
        import torch.nn.functional as F
        logits, _ = self.forward(np.asarray([ids], np.int64), None)
        x = torch.tensor(ids, dtype=torch.int64)
        return F.cross_entropy(torch.from_numpy(logits[0, :-1]), x[1:], reduction="sum").item()

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.forward(np.asarray([ids], np.int64), None)[0][0]

    def greedy(self, prompt: np.ndarray, n: int, prefill_reps: int = 1):
        """`n` greedy tokens per row of `prompt` (batch, len): the prompt's forward (with the argmax of the
        first token) and the n - 1 cached steps timed apart, as `compressor.bench.measure.greedy` (the
        prefill the median of `prefill_reps` forwards)."""
        pre = []
        for _ in range(prefill_reps):
            t0 = time.perf_counter()
            logits, past = self.forward(prompt, None, keep=1)
            tok = logits[:, -1].argmax(-1)[:, None]
            pre.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        out = [tok]
        for _ in range(n - 1):
            logits, past = self.forward(tok, past, keep=1)
            tok = logits[:, -1].argmax(-1)[:, None]
            out.append(tok)
        return np.concatenate(out, axis=1), float(np.median(pre)), time.perf_counter() - t1
