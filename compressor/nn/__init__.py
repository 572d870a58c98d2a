"""Modules that hold compressed weights."""
from .qlinear import QuantLinear

__all__ = ["QuantLinear"]
