"""compressor: make language models smaller, faster and cheaper to run, and prove it.

Python API:
    compress_(model, recipe, ctx)  apply a recipe's passes to a model in place
    compress(spec, recipe, out)    resolve, compress and save a checkpoint atomically
    load(path)                     reload a compressed checkpoint (no auto-gptq needed)
    Runtime(path)                  greedy generation from a checkpoint in a process without torch (a quarter of the memory)
    export.export(ckpt, fmt, out)  repack a checkpoint for another engine (gptq-v2, compressed-tensors, gguf, onnx)
    export_onnx(ckpt, out)         the same, to ONNX Runtime's MatMulNBits
"""
__version__ = "0.1.0"
__all__ = ["compress", "compress_", "load", "Runtime", "export_onnx", "Context", "__version__"]

# Imported on first use (PEP 562): `import compressor.worker` (a benchmark's child process running
# another engine) does not pay for torch and transformers, and its memory is its own.
_LAZY = {"compress": ".api", "compress_": ".api", "load": ".checkpoint", "Runtime": ".runtime",
         "export_onnx": ".export", "Context": ".passes"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'compressor' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
