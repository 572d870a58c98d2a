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
Cross-pass ordering is checked in `compressor.recipe.check_order` using each pass's `stage` and
`leaves_float`; what `compressor.api.compress` writes follows from the last pass's `artifact`.
"""
from __future__ import annotations

import dataclasses
import enum
import importlib.util
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn

__all__ = ["Stage", "PassConfig", "Context", "register_pass", "PASSES", "select_linears", "DEFAULT_IGNORE",
           "require_packages"]

log = logging.getLogger("compressor")

DEFAULT_IGNORE = (r"(^|\.)lm_head$", r"(^|\.)embed", r"(^|\.)wte$", r"(^|\.)wpe$")


class Stage(enum.IntEnum):
    """Where a pass may stand in a recipe; stages never decrease along the recipe.

    TRANSFORM: float-to-float rewrites (AWQ scaling, pruning, low-rank factorization).
    QUANTIZE:  replaces float Linears with packed ones (RTN, GPTQ, NF4). At most one per recipe,
               or one more after a pass that `leaves_float` (LoRA with ``save: merged``).
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
    needs_calibration: ClassVar[bool] = False     # reads ctx.calibration()
    needs_train_data: ClassVar[bool] = False      # reads ctx.train_data
    needs_original: ClassVar[bool] = False        # calls ctx.original() for the uncompressed model
    checkpointable: ClassVar[bool] = True         # checkpoint.save can store the modules it makes

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

    def check_bools(self, *fields: str) -> None:
        """Refuse a recipe value that is not true/false (YAML 'yes' or 1) for each of `fields`."""
        for f in fields:
            v = getattr(self, f)
            if not isinstance(v, bool):
                raise ValueError(f"{self.name}.{f}={v!r} must be true or false")

    @property
    def leaves_float(self) -> bool:
        """True if the model leaves this pass with float Linears again, so one more quantize may follow."""
        return False

    @property
    def artifact(self) -> str:
        """What `compressor.api.compress` writes when this pass is last: 'checkpoint' or 'adapter'."""
        return "checkpoint"

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


def select_linears(model: nn.Module, targets=(r".*",), ignore=DEFAULT_IGNORE,
                   kinds: tuple[type, ...] = (nn.Linear,)) -> dict[str, nn.Linear]:
    """Modules of exactly one of the types `kinds` (default: float ``nn.Linear``) whose name matches a
    target regex and no ignore regex. Subclasses such as bitsandbytes' ``Linear4bit`` are only
    selected when listed in `kinds`."""
    tgt = [re.compile(t) for t in targets]
    ign = [re.compile(i) for i in ignore]
    out = {}
    for name, mod in model.named_modules():
        if type(mod) not in kinds:
            continue
        if any(r.search(name) for r in ign) or not any(r.search(name) for r in tgt):
            continue
        out[name] = mod
    return out


def require_packages(who: str, *modules: str) -> None:
    """Raise ValueError naming the missing packages if one of `modules` cannot be imported."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"{who} needs {', '.join(missing)}, which is not installed: "
                         f"pip install {' '.join(missing)}")


@dataclass
class Context:
    """What a pass may use besides the model: data, tokenizer, the original model, statistics, progress.

    `calibration()` loads calibration windows lazily (only passes that need them pay).
    `record(layer, **stats)` collects per-layer statistics that end up in compression.json.
    `original()` returns the uncompressed float model (a teacher for distillation); `compress`
    sets it to reload the source, `compress_` falls back to a deep copy taken before the first pass.
    `measure(model, stage)` records the perplexity of the model as it stands, if the caller set
    `evaluate` (the CLI does when given --eval-data); passes call it at the stages worth reporting.
    `work_dir` (beside the output) holds training state that survives a crash; `resume` says
    whether to continue from it.
    """
    tokenizer: Any = None
    calib_data: str | None = None
    calib_samples: int = 64
    calib_seqlen: int = 512
    train_data: str | None = None
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = True
    original: Callable[[], nn.Module] | None = None
    evaluate: Callable[[nn.Module], float] | None = None
    work_dir: Path | None = None
    resume: bool = False
    source: dict[str, Any] = field(default_factory=dict)       # spec, path, sha256 of the input model
    applied: list[str] = field(default_factory=list)           # names of the passes applied so far
    evals: dict[str, float] = field(default_factory=dict)      # stage label -> perplexity, in order
    training: dict[str, dict[str, Any]] = field(default_factory=dict)   # pass -> loss curve etc.
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

    def measure(self, model: nn.Module, stage: str) -> float | None:
        """Perplexity of `model` now, recorded under `stage` (e.g. 'nf4 + lora'); None without `evaluate`."""
        if self.evaluate is None:
            return None
        was_training = model.training
        ppl = self.evaluate(model)
        model.train(was_training)
        self.evals[stage] = ppl
        log.info("perplexity after %s: %.3f", stage, ppl)
        return ppl
