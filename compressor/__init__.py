"""compressor: make language models smaller, faster and cheaper to run, and prove it.

Python API:
    compress_(model, recipe, ctx)  apply a recipe's passes to a model in place
    compress(spec, recipe, out)    resolve, compress and save a checkpoint atomically
    load(path)                     reload a compressed checkpoint (no auto-gptq needed)
    export.export(ckpt, fmt, out)  repack a checkpoint for another engine (gptq-v2, compressed-tensors, gguf, onnx)
    export_onnx(ckpt, out)         the same, to ONNX Runtime's MatMulNBits
"""
from .api import compress, compress_
from .checkpoint import load
from .export import export_onnx
from .passes import Context

__version__ = "0.1.0"
__all__ = ["compress", "compress_", "load", "export_onnx", "Context", "__version__"]
