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
allowed set) and checks itself against the model it will see in ``check``, which runs just before
the pass (and, for the first pass, before any work starts).

Recipe order is a walk over model states (`State`): each pass declares the states it `accepts` and
the state it `produces`; `compressor.recipe.check_order` names the first pass that cannot follow,
with the states. What `compressor.api.compress` writes follows from the final state.
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

from ..nn.sparse import SparseLinear

__all__ = ["State", "FLOATS", "PassConfig", "Context", "register_pass", "PASSES", "select_linears", "DEFAULT_IGNORE",
           "require_packages", "FLOAT_LINEARS"]

log = logging.getLogger("compressor")

DEFAULT_IGNORE = (r"(^|\.)lm_head$", r"(^|\.)embed", r"(^|\.)wte$", r"(^|\.)wpe$")


class State(str, enum.Enum):
    """What the model is between two passes, as far as the next pass is concerned."""
    FLOAT = "float"                      # plain float Linears (the model a recipe starts from)
    FLOAT_SPARSE = "float-sparse"        # float Linears with zeros a later pass must keep
    FLOAT_LOW_RANK = "float-low-rank"    # float Linears, some split into two thin factors
    INT = "int-quantized"                # integer codes + scales (QuantLinear, the GPTQ layout)
    NF4 = "nf4"                          # bitsandbytes NF4 base weights (no checkpoint format of their own)
    ADAPTER = "adapter"                  # a peft model: what is saved is its adapter

    @property
    def saved_as(self) -> str | None:
        """What `compressor.api.compress` writes for a model in this state, or None (no format)."""
        return {State.ADAPTER: "adapter", State.NF4: None}.get(self, "checkpoint")


FLOATS = frozenset({State.FLOAT, State.FLOAT_SPARSE, State.FLOAT_LOW_RANK})

# Module types a pass that takes float Linears selects by default: nn.Linear and its pruned form.
FLOAT_LINEARS: tuple[type, ...] = (nn.Linear, SparseLinear)


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
    accepts: ClassVar[frozenset[State]] = FLOATS   # states of the model this pass can take
    changes_shapes: ClassVar[bool] = False        # may change Linear shapes (pruning, low-rank)
    needs_calibration: ClassVar[bool] = False     # reads ctx.calibration()
    needs_train_data: ClassVar[bool] = False      # reads ctx.train_data
    needs_original: ClassVar[bool] = False        # calls ctx.original() for the uncompressed model

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

    def produces(self, state: State) -> State:
        """The model's state after this pass, given the state it takes (default: unchanged)."""
        return state

    # --- hooks a pass overrides -----------------------------------------------------------
    def check(self, model: nn.Module, ctx: "Context") -> None:
        """Check the config against the model this pass will see (just before it runs); raise ValueError."""

    def check_shapes(self, shapes: dict[str, tuple[int, int]]) -> None:
        """Check the config against Linear shapes {name: (in_features, out_features)} alone; raise
        ValueError. Run before any work starts for every pass that no shape-changing pass precedes,
        so that, say, a bad group size for the last pass of a long recipe fails at once."""

    def apply(self, model: nn.Module, ctx: "Context") -> nn.Module:
        raise NotImplementedError

    streams: ClassVar[bool] = False               # works one decoder block at a time (compress --stream)

    def stream_refusal(self, model: nn.Module) -> str | None:
        """Why this pass cannot run on a streamed model (`compressor.stream`), or None when it can: it must
        sweep the blocks once (`streams`) and touch only Linears inside them."""
        if not self.streams:
            return f"pass {self.name!r} needs the whole model in memory"
        from ..sequential import find_blocks
        prefix, _ = find_blocks(model)
        outside = [n for n in self.modules(model) if not n.startswith(prefix + ".")]
        if outside:
            return f"pass {self.name!r} targets {outside[0]}, outside the decoder blocks ({prefix}.*)"
        return None

    # --- helpers --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"pass": self.name, **{k: (list(v) if isinstance(v, tuple) else
                                          v.value if isinstance(v, enum.Enum) else v) for k, v in d.items()}}

    def modules(self, model: nn.Module) -> dict[str, nn.Linear]:
        return select_linears(model, self.targets, self.ignore)

    def check_targets(self, model: nn.Module) -> dict[str, nn.Linear]:
        """The targeted Linears, checked: at least one, and `check_shapes` on their shapes."""
        mods = self.modules(model)
        if not mods:
            raise ValueError(f"{self.name}: no Linear layer matches targets={list(self.targets)} "
                             f"minus ignore={list(self.ignore)}")
        self.check_shapes({n: (m.in_features, m.out_features) for n, m in mods.items()})
        return mods

    def targeted(self, names) -> list[str]:
        """The names among `names` that match targets and no ignore regex."""
        return select_names(names, self.targets, self.ignore)


def select_linears(model: nn.Module, targets=(r".*",), ignore=DEFAULT_IGNORE,
                   kinds: tuple[type, ...] = FLOAT_LINEARS) -> dict[str, nn.Linear]:
    """Modules of exactly one of the types `kinds` (default: float ``nn.Linear`` and `SparseLinear`) whose
    name matches a target regex and no ignore regex. Subclasses such as bitsandbytes' ``Linear4bit`` are only
    selected when listed in `kinds`."""
    keep = set(select_names([n for n, m in model.named_modules() if type(m) in kinds], targets, ignore))
    return {n: m for n, m in model.named_modules() if n in keep}


def select_names(names, targets=(r".*",), ignore=DEFAULT_IGNORE) -> list[str]:
    """The names that match a target regex and no ignore regex, in their order."""
    tgt = [re.compile(t) for t in targets]
    ign = [re.compile(i) for i in ignore]
    return [n for n in names if any(r.search(n) for r in tgt) and not any(r.search(n) for r in ign)]


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
    `work_dir` (beside the output) holds the progress that survives a crash (`compressor.workdir`):
    training state, the committed blocks of the running pass's layer-wise loop (`pass_index`,
    `pass_name`), the model after each finished pass; `resume` says whether to continue from it.
    """
    tokenizer: Any = None
    calib_data: str | None = None
    calib_samples: int = 64
    calib_seqlen: int = 512
    train_data: str | None = None
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    stream: Any = None                                         # compressor.stream.Stream of a --stream run
    progress: bool = True
    original: Callable[[], nn.Module] | None = None
    evaluate: Callable[[nn.Module], float] | None = None
    work_dir: Path | None = None
    resume: bool = False
    pass_index: int | None = None                              # the recipe pass running now, and its name
    pass_name: str = ""
    source: dict[str, Any] = field(default_factory=dict)       # spec, path, sha256 of the input model
    applied: list[str] = field(default_factory=list)           # names of the passes applied so far
    evals: dict[str, float] = field(default_factory=dict)      # stage label -> perplexity, in order
    training: dict[str, dict[str, Any]] = field(default_factory=dict)   # pass -> loss curve etc.
    layer_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
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
