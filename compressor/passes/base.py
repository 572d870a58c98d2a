"""Pass registry, the shared config base, the run context and module targeting.

A pass is a frozen dataclass config plus one function ``apply(model, config, ctx) -> model``,
registered by name:

    @register_pass("rtn")
    @dataclass(frozen=True)
    class RTNConfig(PassConfig):
        bits: int = 4
        ...
        def apply(self, model, ctx): ...

Every config validates itself in ``__post_init__`` (bad value -> ValueError naming it and the
allowed set) and may check itself against the model in ``preflight`` before any pass runs.
Cross-pass ordering is checked in `compressor.recipe.check_order` using each pass's `stage`.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn

__all__ = ["Stage", "PassConfig", "Context", "register_pass", "PASSES", "select_linears", "DEFAULT_IGNORE"]

log = logging.getLogger("compressor")

DEFAULT_IGNORE = (r"(^|\.)lm_head$", r"(^|\.)embed", r"(^|\.)wte$", r"(^|\.)wpe$")


class Stage(enum.IntEnum):
    """Where a pass may stand in a recipe; stages never decrease along the recipe.

    TRANSFORM: float-to-float rewrites (AWQ scaling, pruning, low-rank factorization).
    QUANTIZE:  replaces float Linears with packed ones (RTN, GPTQ, NF4). At most one per recipe.
    RECOVER:   trains or adapts what is there (LoRA, distillation) after any other pass.
    """
    TRANSFORM = 0
    QUANTIZE = 1
    RECOVER = 2


PASSES: dict[str, type["PassConfig"]] = {}


def register_pass(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in PASSES:
            raise ValueError(f"pass {name!r} registered twice")
        cls.name = name
        PASSES[name] = cls
        return cls
    return deco


@dataclass(frozen=True)
class PassConfig:
    """Fields every pass has: which modules it touches (regexes over module names)."""
    name: ClassVar[str] = "?"
    stage: ClassVar[Stage] = Stage.TRANSFORM
    needs_calibration: ClassVar[bool] = False

    targets: tuple[str, ...] = (r".*",)
    ignore: tuple[str, ...] = DEFAULT_IGNORE

    def __post_init__(self):
        for attr in ("targets", "ignore"):
            v = getattr(self, attr)
            if isinstance(v, str):
                v = (v,)
            v = tuple(v)
            for rx in v:
                try:
                    re.compile(rx)
                except re.error as e:
                    raise ValueError(f"{self.name}.{attr}: invalid regex {rx!r} ({e})") from None
            object.__setattr__(self, attr, v)

    # --- hooks a pass overrides -----------------------------------------------------------
    def preflight(self, model: nn.Module, ctx: "Context") -> None:
        """Check the config against the model before any work starts; raise ValueError."""

    def apply(self, model: nn.Module, ctx: "Context") -> nn.Module:
        raise NotImplementedError

    # --- helpers --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"pass": self.name, **{k: (list(v) if isinstance(v, tuple) else
                                          v.value if isinstance(v, enum.Enum) else v) for k, v in d.items()}}

    def modules(self, model: nn.Module) -> dict[str, nn.Linear]:
        return select_linears(model, self.targets, self.ignore)


def select_linears(model: nn.Module, targets=(r".*",), ignore=DEFAULT_IGNORE) -> dict[str, nn.Linear]:
    """Float ``nn.Linear`` modules whose name matches a target regex and no ignore regex."""
    tgt = [re.compile(t) for t in targets]
    ign = [re.compile(i) for i in ignore]
    out = {}
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear:
            continue
        if any(r.search(name) for r in ign) or not any(r.search(name) for r in tgt):
            continue
        out[name] = mod
    return out


@dataclass
class Context:
    """What a pass may use besides the model: calibration data, tokenizer, statistics, progress.

    `calibration()` loads calibration windows lazily (only passes that need them pay).
    `record(layer, **stats)` collects per-layer statistics that end up in compression.json.
    """
    tokenizer: Any = None
    calib_data: str | None = None
    calib_samples: int = 64
    calib_seqlen: int = 512
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = True
    layer_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    module_specs: dict[str, dict[str, Any]] = field(default_factory=dict)
    _calib: torch.Tensor | None = None

    def calibration(self) -> torch.Tensor:
        """(n_samples, seqlen) int64 token windows from `calib_data`."""
        if self._calib is None:
            from ..calib import calibration_windows
            if self.calib_data is None:
                raise ValueError("this recipe needs calibration data: pass --calib-data FILE "
                                 "(for example ../shared/data/wikitext2-valid.tokens)")
            self._calib = calibration_windows(self.calib_data, self.tokenizer, self.calib_samples,
                                              self.calib_seqlen, self.seed)
        return self._calib

    def record(self, layer: str, **stats: Any) -> None:
        self.layer_stats.setdefault(layer, {}).update(stats)
