"""The checks `compress-bench` makes before it loads any model: labels and paths, positions, eval text.

Each raises `BenchInputError` with a sentence naming the model or file at fault and what to change.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .config import BenchConfig, BenchInputError
from .rows import ModelResult

__all__ = ["parse_model_arg", "resolve_models", "check_positions", "check_engines", "eval_ids", "engine_of",
           "make_exports"]


def parse_model_arg(arg: str) -> tuple[str, str]:
    """``"name=path"`` -> (name, path); a bare spec is labelled by its name or its directory's name.

    A string that exists as a path is never split, so a directory with '=' in its name still works.
    """
    if "=" in arg and not Path(arg).exists():
        label, spec = arg.split("=", 1)
        if not label or not spec:
            raise BenchInputError(f"{arg!r}: expected NAME=PATH with both parts non-empty")
        return label, spec
    return (Path(arg).name or arg), arg


def resolve_models(args: Sequence[str], engines: Sequence[str] = ("torch",)) -> list[ModelResult]:
    """One `ModelResult` per argument and engine, its path resolved and its size on disk read; labels are unique.

    An export directory runs on its own engine (gguf: llama.cpp, onnx: ort), once. Any other model gets a
    row per engine in `engines`: "torch", and "ort" / "ort:LEVEL", an onnx export of it made by
    `make_exports` (accuracy_level LEVEL, default 0) and labelled ``NAME [ort]`` / ``NAME [ort:LEVEL]``."""
    from compressor.api import dir_bytes
    from compressor.models import ModelError, resolve

    models, seen = [], set()

    def add(m: ModelResult) -> None:
        if m.label in seen:
            raise BenchInputError(f"two models are labelled {m.label!r}; name them with NAME=PATH")
        seen.add(m.label)
        models.append(m)

    for arg in args:
        label, spec = parse_model_arg(str(arg))
        engine = engine_of(spec)
        if engine != "torch":
            _check_installed(engine, label, spec)
            add(ModelResult(label=label, spec=spec, path=str(spec), disk_bytes=dir_bytes(spec), engine=engine))
            continue
        try:
            path = resolve(spec)
        except ModelError as e:
            raise BenchInputError(f"{label}: {e}") from None
        for e in engines:
            if e == "torch":
                add(ModelResult(label=label, spec=spec, path=str(path), disk_bytes=dir_bytes(path)))
                continue
            _check_installed("ort", label, spec)
            level = int(e.partition(":")[2] or 0)
            add(ModelResult(label=f"{label} [{e}]", spec=spec, path=str(path), engine="ort", export_from=str(path),
                            ort_level=level))
    return models


def _check_installed(engine: str, label: str, spec: str) -> None:
    from compressor.export.engines import missing
    if (why := missing(engine)):
        raise BenchInputError(f"{label}: {spec} runs on {engine}; {why}")


def engine_of(spec: str) -> str:
    """"llama.cpp" for a directory `compress export gguf` wrote, "ort" for one `compress export onnx` wrote
    (its compression.json says ``artifact: onnx-export``), else "torch".

    A bare ``.gguf`` file stays a source model (`compressor.models.resolve` dequantizes it for torch)."""
    from compressor.export import export_meta
    meta = export_meta(spec) if Path(spec).is_dir() else None
    return {"gguf": "llama.cpp", "onnx": "ort"}.get((meta or {}).get("format"), "torch")


def make_exports(models: list[ModelResult], workdir: str, progress=None) -> None:
    """Write the onnx export of every pending ort row (`resolve_models`) under `workdir`, and point the row at it.
    A checkpoint goes through `compressor.export_onnx`, an HF model through `to_onnx.export_float`."""
    from compressor.api import dir_bytes
    from compressor.checkpoint import is_checkpoint
    from compressor.export import ExportError, export_onnx
    from compressor.export.to_onnx import export_float
    for i, m in enumerate(models):
        if m.engine != "ort" or not m.export_from:
            continue
        if progress is not None:
            progress(f"exporting {m.label} to onnx")
        level = m.ort_level or 0
        out = Path(workdir) / f"{i}"
        try:
            if is_checkpoint(m.export_from):
                export_onnx(m.export_from, out, accuracy_level=level)
            else:
                export_float(m.export_from, out, accuracy_level=level)
        except (ExportError, OSError) as e:
            raise BenchInputError(f"{m.label}: cannot run on ONNX Runtime: {e}") from None
        m.path, m.disk_bytes = str(out), dir_bytes(out)


def check_engines(models: list[ModelResult], cfg: BenchConfig) -> None:
    """llama.cpp rows decode one sequence (llama-cpp-python's API); llama.cpp and ort rows score no tasks."""
    for i, m in enumerate(models):
        if m.engine == "ort" and cfg.tasks:
            raise BenchInputError(f"{m.label}: task accuracy is not measured for ONNX Runtime rows; drop --tasks or "
                                  f"the ort engine")
        if m.engine != "llama.cpp":
            continue
        if i == 0 and cfg.batches != (1,):
            raise BenchInputError(f"{m.label}: BASE is a gguf export, which llama.cpp runs at batch 1 only; pass "
                                  f"--batch 1, or make a torch model BASE")
        if cfg.tasks:
            raise BenchInputError(f"{m.label}: task accuracy is not measured for llama.cpp rows; drop --tasks or "
                                  f"the gguf export")


def check_positions(models: list[ModelResult], cfg: BenchConfig, with_eval: bool) -> None:
    """Every model must hold a prompt plus its generated tokens, and a perplexity window if measured."""
    from transformers import AutoConfig
    need = max(cfg.prompt_len + cfg.gen_len, cfg.seqlen if with_eval else 0)
    for m in models:
        if m.engine == "llama.cpp":    # llama.cpp's context is sized to `need` when it loads
            continue
        n = getattr(AutoConfig.from_pretrained(m.path), "max_position_embeddings", None)
        if n is not None and need > n:
            raise BenchInputError(f"{m.label}: needs {need} positions (prompt-len {cfg.prompt_len} + gen-len "
                                  f"{cfg.gen_len}, seqlen {cfg.seqlen}) but max_position_embeddings is {n}")


def eval_ids(models: list[ModelResult], eval_data: str, cfg: BenchConfig) -> list[int]:
    """Eval token ids (a whole number of windows), tokenized with BASE's tokenizer, after checking
    that the file is long enough and that every candidate tokenizes exactly as BASE does."""
    from transformers import AutoTokenizer

    from compressor.calib import tokenize_file
    from compressor.eval import count_windows

    p = Path(eval_data)
    if not p.is_file():
        raise BenchInputError(f"eval data {str(p)!r} does not exist")
    base_tok = AutoTokenizer.from_pretrained(models[0].path)
    text = p.read_text(encoding="utf-8", errors="replace")[:20000]
    probe = base_tok(text, add_special_tokens=False).input_ids
    for m in models[1:]:
        tok = AutoTokenizer.from_pretrained(m.path)
        if tok.get_vocab() != base_tok.get_vocab() or tok(text, add_special_tokens=False).input_ids != probe:
            raise BenchInputError(f"{m.label}: its tokenizer differs from {models[0].label}'s, so their perplexities "
                                  f"are not comparable; benchmark without --eval-data or use matching models")
    ids = tokenize_file(p, base_tok)
    n = count_windows(ids.numel(), cfg.seqlen, cfg.eval_windows)
    if n < 1:
        raise BenchInputError(f"eval data {str(p)!r} has {ids.numel()} tokens, fewer than one window of "
                              f"{cfg.seqlen} (--seqlen)")
    return ids[:n * cfg.seqlen].tolist()
