"""Checkpoint formats of modules, registered by type name: each module type writes and rebuilds itself.

A compressed module class registers itself with a type name and two methods::

    @register_module("gptq")
    class QuantLinear(nn.Module):
        def spec(self) -> dict: ...                      # JSON-able: everything __init__ needs
        @classmethod
        def from_spec(cls, spec: dict) -> "QuantLinear": ...   # empty buffers, filled by load_state_dict

`compressor.checkpoint.save` walks the model and records ``{"type": name, **module.spec()}`` for
every module of a registered type (`module_spec`); `compressor.checkpoint.load` builds the HF
skeleton and swaps in `build_module(spec)` for each. A new module type (sparse, low-rank, ...)
registers itself in its own file and needs no edit anywhere else.

Plain ``nn.Linear`` is registered as ``linear`` for the layers whose shape a pass changed (a pruned
MLP, one factor of a low-rank pair): `save` records those only where the shape differs from the
model's config, so `load` can rebuild any model the passes produced.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

__all__ = ["ModuleFormat", "MODULE_TYPES", "register_module", "register_format", "module_spec", "build_module",
           "format_of", "format_of_class", "linear_spec"]


@dataclass(frozen=True)
class ModuleFormat:
    name: str
    cls: type
    spec: Callable[[nn.Module], dict[str, Any]]
    build: Callable[[dict[str, Any]], nn.Module]


MODULE_TYPES: dict[str, ModuleFormat] = {}
_BY_CLASS: dict[type, ModuleFormat] = {}


def register_format(name: str, cls: type, spec: Callable[[nn.Module], dict[str, Any]],
                    build: Callable[[dict[str, Any]], nn.Module]) -> ModuleFormat:
    """Register how modules of exactly type `cls` are described (`spec`) and rebuilt (`build`)."""
    if name in MODULE_TYPES and MODULE_TYPES[name].cls is not cls:
        raise ValueError(f"module type {name!r} is registered twice ({MODULE_TYPES[name].cls.__name__} and "
                         f"{cls.__name__})")
    fmt = ModuleFormat(name, cls, spec, build)
    MODULE_TYPES[name] = _BY_CLASS[cls] = fmt
    return fmt


def register_module(name: str) -> Callable[[type], type]:
    """Class decorator: the class's own ``spec()`` and ``from_spec(spec)`` are its checkpoint format."""
    def deco(cls: type) -> type:
        cls.type_name = name
        register_format(name, cls, cls.spec, cls.from_spec)
        return cls
    return deco


def format_of(module: nn.Module) -> ModuleFormat | None:
    return _BY_CLASS.get(type(module))


def format_of_class(cls: type) -> ModuleFormat | None:
    return _BY_CLASS.get(cls)


def module_spec(module: nn.Module) -> dict[str, Any] | None:
    """``{"type": name, **spec}`` for a module of a registered type, else None."""
    fmt = format_of(module)
    return None if fmt is None else {"type": fmt.name, **fmt.spec(module)}


def build_module(spec: dict[str, Any]) -> nn.Module:
    """A module with empty (meta or uninitialised) tensors from a recorded spec; KeyError for an unknown type."""
    return MODULE_TYPES[spec["type"]].build({k: v for k, v in spec.items() if k != "type"})


def linear_spec(m: nn.Linear) -> dict[str, Any]:
    return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}


register_format("linear", nn.Linear, linear_spec,
                lambda s: nn.Linear(s["in_features"], s["out_features"], bias=s["bias"], device="meta"))
