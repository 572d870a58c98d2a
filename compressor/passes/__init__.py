"""Compression passes, registered by name. Each pass is imported here explicitly."""
from .base import FLOATS, PASSES, Context, PassConfig, State, register_pass, select_linears
from . import awq, gptq, lora, nf4, peqa, rtn  # noqa: F401  (each registers its pass)

__all__ = ["PASSES", "Context", "PassConfig", "State", "FLOATS", "register_pass", "select_linears"]
