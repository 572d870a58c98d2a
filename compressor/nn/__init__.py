"""Modules that hold compressed weights."""
from .half import HalfLinear
from .qlinear import QuantLinear

__all__ = ["HalfLinear", "QuantLinear"]
