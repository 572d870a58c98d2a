"""Recipes: strict YAML lists of passes, validated before any work starts.

    description: 4-bit round-to-nearest, group size 64, asymmetric
    targets: ['.*']                 # optional, regexes over module names
    ignore: ['lm_head', 'embed']    # optional, default ignores lm_head and embeddings
    calibration: {samples: 64, seqlen: 512}   # optional
    passes:
      - rtn: {bits: 4, group_size: 64, sym: false}

Each pass entry is built with ``Config(**fields)``, so an unknown key is an error naming it and the
allowed ones. Recipe-level ``targets``/``ignore`` are defaults that a pass entry may override.
Ordering across passes is checked in one place, `check_order`.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .passes import PASSES, PassConfig, Stage

__all__ = ["Recipe", "RecipeError", "RECIPES_DIR", "load_recipe", "list_recipes", "check_order"]

# Shipped recipes are package data (compressor/recipes/*.yaml), so a wheel or sdist install has them.
RECIPES_DIR = importlib.resources.files("compressor") / "recipes"
_TOP_KEYS = {"description", "targets", "ignore", "calibration", "passes"}
_CALIB_KEYS = {"samples", "seqlen", "seed"}


class RecipeError(ValueError):
    """A recipe that cannot be found, parsed or validated."""


@dataclass(frozen=True)
class Recipe:
    passes: tuple[PassConfig, ...]
    description: str = ""
    calibration: dict[str, int] = field(default_factory=dict)
    source: str = "<inline>"

    @property
    def needs_calibration(self) -> bool:
        return any(p.needs_calibration for p in self.passes)

    @property
    def needs_train_data(self) -> bool:
        return any(p.needs_train_data for p in self.passes)

    @property
    def needs_original(self) -> bool:
        return any(p.needs_original for p in self.passes)

    @property
    def artifact(self) -> str:
        """What `compressor.api.compress` writes: 'checkpoint' (GPTQ layout) or 'adapter' (peft)."""
        return self.passes[-1].artifact

    def unsaved_quantizers(self) -> list[str]:
        """Quantization passes whose modules would reach a checkpoint with no format to store them."""
        if self.artifact != "checkpoint":
            return []
        last = []
        for p in self.passes:
            if p.leaves_float:
                last = []
            elif p.stage == Stage.QUANTIZE and not p.checkpointable:
                last.append(p.name)
        return last

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        """Inverse of `to_dict` (as stored in compression.json)."""
        passes = [{d["pass"]: {k: v for k, v in d.items() if k != "pass"}} for d in data["passes"]]
        return parse_recipe({"description": data.get("description", ""), "calibration": data.get("calibration") or {},
                             "passes": passes}, source=data.get("source", "<inline>"))

    def to_dict(self) -> dict[str, Any]:
        return {"description": self.description, "calibration": dict(self.calibration),
                "passes": [p.to_dict() for p in self.passes], "source": self.source}


def check_order(passes: tuple[PassConfig, ...]) -> None:
    """The cross-pass rules, all in one place.

    * A pass that gives float Linears back (`leaves_float`: lora with ``save: merged``) ends a
      *segment*. Within a segment stages never decrease: transforms, then at most one quantization,
      then recovery passes. So a recipe may quantize once more after a merge, and must: a merged
      model is float, and the recipe says how to re-quantize it.
    * A pass whose result is saved as an adapter (lora with ``save: adapter``) comes last.
    * A transform that prepares for quantization (AWQ) needs the quantization pass of its segment,
      after it, to use the same bits and group size; a pass that tunes integer-quantized layers
      (PEQA) needs an integer quantization pass before it in its segment.
    """
    if not passes:
        raise RecipeError("recipe has no passes")
    segments: list[list[PassConfig]] = [[]]
    for p in passes:
        segments[-1].append(p)
        if p.leaves_float:
            segments.append([])
    for i, seg in enumerate(segments):
        for pa, pb in zip(seg, seg[1:]):
            if pb.stage < pa.stage:
                raise RecipeError(f"pass {pb.name!r} ({pb.stage.name.lower()}) cannot follow {pa.name!r} "
                                  f"({pa.stage.name.lower()}): order is transform -> quantize -> recover "
                                  f"(after lora with save: merged, one more quantize pass may follow)")
        quant = [p for p in seg if p.stage == Stage.QUANTIZE]
        if len(quant) > 1:
            raise RecipeError(f"at most one quantization pass per recipe, got {[p.name for p in quant]} "
                              f"(a second one may follow lora with save: merged)")
        if i > 0 and not quant:
            raise RecipeError(f"pass {segments[i - 1][-1].name!r} with save: merged gives back float weights: add a "
                              f"quantization pass after it (for example gptq) or use save: adapter")
        for j, p in enumerate(seg):
            if getattr(p, "requires_quantized", False) and not any(hasattr(q, "group_size") for q in seg[:j]
                                                                   if q.stage == Stage.QUANTIZE):
                raise RecipeError(f"pass {p.name!r} trains the scales of integer-quantized layers: put it after "
                                  f"rtn or gptq")
            if not getattr(p, "requires_quantizer", False):
                continue
            after = [q for q in seg[j + 1:] if q.stage == Stage.QUANTIZE]
            if not after:
                raise RecipeError(f"pass {p.name!r} prepares weights for quantization: add a quantization pass "
                                  f"(rtn or gptq) after it")
            q = after[0]
            if not hasattr(q, "group_size"):
                raise RecipeError(f"pass {p.name!r} searches for integer w{p.bits}g{p.group_size} rounding but "
                                  f"{q.name!r} is not an integer quantizer; use rtn or gptq")
            if (q.bits, q.group_size) != (p.bits, p.group_size):
                raise RecipeError(f"pass {p.name!r} searched for w{p.bits}g{p.group_size} but {q.name!r} quantizes "
                                  f"to w{q.bits}g{q.group_size}; make them equal")
    for p in passes[:-1]:
        if p.artifact == "adapter":
            raise RecipeError(f"pass {p.name!r} with save: adapter must be the last pass (its adapter is what is "
                              f"saved); use save: merged to quantize again after it")


def _build_pass(entry: Any, defaults: dict[str, Any], where: str) -> PassConfig:
    if not (isinstance(entry, dict) and len(entry) == 1):
        raise RecipeError(f"{where}: each pass is a one-key mapping like '- rtn: {{bits: 4}}', got {entry!r}")
    (name, fields), = entry.items()
    if name not in PASSES:
        raise RecipeError(f"{where}: unknown pass {name!r}; allowed: {sorted(PASSES)}")
    cls = PASSES[name]
    fields = dict(fields or {})
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in fields if k not in allowed]
    if unknown:
        raise RecipeError(f"{where}: unknown key {unknown[0]!r} for pass {name!r}; allowed: {allowed}")
    for k, v in defaults.items():
        fields.setdefault(k, v)
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{where}: {e}") from None


def parse_recipe(data: Any, source: str = "<inline>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with a 'passes' list, got {type(data).__name__}")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise RecipeError(f"{source}: unknown key {unknown[0]!r}; allowed: {sorted(_TOP_KEYS)}")
    if not isinstance(data.get("passes"), list):
        raise RecipeError(f"{source}: 'passes' must be a list of passes")
    calib = dict(data.get("calibration") or {})
    bad = sorted(set(calib) - _CALIB_KEYS)
    if bad:
        raise RecipeError(f"{source}: unknown key {bad[0]!r} in calibration; allowed: {sorted(_CALIB_KEYS)}")
    for k, v in calib.items():
        if not isinstance(v, int) or v < (0 if k == "seed" else 1):
            raise RecipeError(f"{source}: calibration.{k}={v!r} must be a positive integer")
    defaults = {k: tuple([data[k]] if isinstance(data[k], str) else data[k]) for k in ("targets", "ignore") if k in data}
    passes = tuple(_build_pass(e, defaults, f"{source}: passes[{i}]") for i, e in enumerate(data["passes"]))
    check_order(passes)
    return Recipe(passes=passes, description=str(data.get("description", "")), calibration=calib, source=source)


def load_recipe(name_or_path: str | Path) -> Recipe:
    """`NAME` finds the shipped ``compressor/recipes/NAME.yaml``; anything else is read as a path."""
    s = str(name_or_path)
    p = Path(s)
    source = str(p)
    if not p.suffix and not p.exists():
        p = RECIPES_DIR / f"{s}.yaml"
        if not p.is_file():
            raise RecipeError(f"unknown recipe {s!r}; available: {', '.join(list_recipes()) or 'none'} "
                              f"(or pass a path to a .yaml file)")
        source = s
    if not p.is_file():
        raise RecipeError(f"recipe file {s!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{source}: invalid YAML ({str(e).splitlines()[0]})") from None
    return parse_recipe(data, source=source)


def list_recipes() -> dict[str, str]:
    """name -> description of every shipped recipe (`RECIPES_DIR`)."""
    out = {}
    for f in sorted((f for f in RECIPES_DIR.iterdir() if f.name.endswith(".yaml")), key=lambda f: f.name):
        try:
            out[f.name[:-5]] = str((yaml.safe_load(f.read_text()) or {}).get("description", ""))
        except yaml.YAMLError:
            out[f.name[:-5]] = "(invalid YAML)"
    return out
