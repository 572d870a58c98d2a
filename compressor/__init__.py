"""compressor: make language models smaller, faster and cheaper to run, and prove it.

Python API:
    compress_(model, recipe, ctx)  apply a recipe's passes to a model in place
    compress(spec, recipe, out)    resolve, compress and save a checkpoint atomically
    load(path)                     reload a compressed checkpoint (no auto-gptq needed)
"""
from .api import compress, compress_
from .checkpoint import load
from .passes import Context

__version__ = "0.1.0"
__all__ = ["compress", "compress_", "load", "Context", "__version__"]
