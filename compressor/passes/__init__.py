"""Compression passes, registered by name. Each pass is imported here explicitly."""
from .base import FLOATS, PASSES, Context, PassConfig, State, register_pass, select_linears
from . import (awq, distill, gptq, head, lora, lowrank, magnitude, nf4, peqa, prune_structured, rtn, sparsegpt,  # noqa: F401
               wanda)  # each registers its pass

__all__ = ["PASSES", "Context", "PassConfig", "State", "FLOATS", "register_pass", "select_linears"]
