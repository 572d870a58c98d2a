"""Modules that hold compressed weights, each owning its checkpoint format (`formats`)."""
from .formats import MODULE_TYPES, build_module, module_spec, register_format, register_module
from .half import HalfLinear
from .lowrank import LowRankLinear
from .prepare import prepare_
from .qembedding import TiedQuantEmbedding
from .qlinear import QuantLinear
from .sparse import SparseLinear

__all__ = ["HalfLinear", "LowRankLinear", "QuantLinear", "TiedQuantEmbedding", "SparseLinear", "prepare_", "MODULE_TYPES", "register_module", "register_format",
           "module_spec", "build_module"]
