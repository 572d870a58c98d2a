"""Quantization primitives (`primitives`) and bit packing (`packing`)."""
from .packing import pack_bits, pack_gptq, unpack_bits, unpack_gptq
from .primitives import choose_qparams, dequantize, fake_quantize, quantize, sqnr_db

__all__ = ["pack_bits", "pack_gptq", "unpack_bits", "unpack_gptq",
           "choose_qparams", "dequantize", "fake_quantize", "quantize", "sqnr_db"]
