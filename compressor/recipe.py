"""Recipes: strict YAML lists of passes, validated before any work starts.

    description: 4-bit round-to-nearest, group size 64, asymmetric
    targets: ['.*']                 # optional, regexes over module names
    ignore: ['lm_head', 'embed']    # optional, default ignores lm_head and embeddings
    calibration: {samples: 64, seqlen: 512}   # optional
    passes:
      - rtn: {bits: 4, group_size: 64, sym: false}
    save: {format: gguf}            # optional: export the result (`compressor.export.FORMATS`)

Each pass entry is built with ``Config(**fields)``, so an unknown key is an error naming it and the
allowed ones. Recipe-level ``targets``/``ignore`` are defaults that a pass entry may override.
Ordering across passes is checked in one place, `check_order`: a walk over the model states each
pass accepts and produces (`compressor.passes.State`).
"""
from __future__ import annotations

import dataclasses
import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError
from .passes import PASSES, PassConfig, State

__all__ = ["Recipe", "RecipeError", "RECIPES_DIR", "START", "load_recipe", "list_recipes", "check_order"]

# Shipped recipes are package data (compressor/recipes/*.yaml), so a wheel or sdist install has them.
RECIPES_DIR = importlib.resources.files("compressor") / "recipes"
_TOP_KEYS = {"description", "targets", "ignore", "calibration", "passes", "save"}
_CALIB_KEYS = {"samples", "seqlen", "seed"}


class RecipeError(InputError):
    """A recipe that cannot be found, parsed or validated."""


@dataclass(frozen=True)
class Recipe:
    passes: tuple[PassConfig, ...]
    description: str = ""
    calibration: dict[str, int] = field(default_factory=dict)
    source: str = "<inline>"
    save: dict[str, Any] = field(default_factory=dict)   # {format: NAME, **export options}; {} is native

    @property
    def needs_calibration(self) -> bool:
        return any(p.needs_calibration for p in self.passes)

    @property
    def needs_train_data(self) -> bool:
        return any(p.needs_train_data for p in self.passes)

    @property
    def needs_original(self) -> bool:
        return any(p.needs_original for p in self.passes)

    def states(self) -> list[State]:
        """The model's state before the first pass and after each pass."""
        out = [START]
        for p in self.passes:
            out.append(p.produces(out[-1]))
        return out

    @property
    def final_state(self) -> State:
        return self.states()[-1]

    @property
    def artifact(self) -> str | None:
        """What `compressor.api.compress` writes: 'checkpoint', 'adapter' (peft), or None (no format)."""
        return self.final_state.saved_as

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        """Inverse of `to_dict` (as stored in compression.json)."""
        passes = [{d["pass"]: {k: v for k, v in d.items() if k != "pass"}} for d in data["passes"]]
        return parse_recipe({"description": data.get("description", ""), "calibration": data.get("calibration") or {},
                             "passes": passes, **({"save": data["save"]} if data.get("save") else {})},
                            source=data.get("source", "<inline>"))

    def to_dict(self) -> dict[str, Any]:
        out = {"description": self.description, "calibration": dict(self.calibration),
               "passes": [p.to_dict() for p in self.passes], "source": self.source}
        return {**out, "save": dict(self.save)} if self.save else out


START = State.FLOAT                      # a recipe starts from the float model

# Why a state is not accepted, where a sentence helps more than the list of states.
_HINTS = {
    State.INT: "a model is integer-quantized once; lora with save: merged gives float weights back first",
    State.ADAPTER: "lora with save: adapter must be the last pass (its adapter is what is saved); use "
                   "save: merged to go on after it",
    State.NF4: "NF4 layers take adapters (lora) and nothing else",
}


def _states(states) -> str:
    return ", ".join(sorted(s.value for s in states))


def check_order(passes: tuple[PassConfig, ...]) -> None:
    """The cross-pass rules, all in one place.

    * The model starts `START` (float). Each pass must accept the state the passes before it leave
      (``accepts``); its ``produces`` gives the next state. The first pass that cannot follow is
      named with the pass before it and both states.
    * A transform that prepares for quantization (AWQ: ``requires_quantizer``) needs the next
      integer quantization pass after it to use the same bits and group size, with only float
      passes between.
    """
    if not passes:
        raise RecipeError("recipe has no passes")
    state, prev = START, None
    for p in passes:
        if state not in p.accepts:
            where = f"cannot follow {prev.name!r}: after {prev.name!r} the model is {state.value}" if prev else \
                f"cannot come first: the model starts {state.value}"
            hint = f" ({_HINTS[state]})" if state in _HINTS else ""
            raise RecipeError(f"pass {p.name!r} {where}, and {p.name!r} takes {_states(p.accepts)}{hint}")
        state, prev = p.produces(state), p
    for j, p in enumerate(passes):
        if not getattr(p, "requires_quantizer", False):
            continue
        # the first pass after p that does not keep the model float must be the integer quantizer
        nxt = next((q for q in passes[j + 1:] if q.produces(State.FLOAT) != State.FLOAT), None)
        if nxt is None:
            raise RecipeError(f"pass {p.name!r} prepares weights for integer quantization: add a quantization "
                              f"pass (rtn or gptq) after it")
        if nxt.produces(State.FLOAT) != State.INT:
            raise RecipeError(f"pass {p.name!r} searches for integer w{p.bits}g{p.group_size} rounding but "
                              f"{nxt.name!r} comes next and is not an integer quantizer; use rtn or gptq")
        if (nxt.bits, nxt.group_size) != (p.bits, p.group_size):
            raise RecipeError(f"pass {p.name!r} searched for w{p.bits}g{p.group_size} but {nxt.name!r} quantizes "
                              f"to w{nxt.bits}g{nxt.group_size}; make them equal")


def _build_pass(entry: Any, defaults: dict[str, Any], where: str) -> PassConfig:
    if not (isinstance(entry, dict) and len(entry) == 1):
        raise RecipeError(f"{where}: each pass is a one-key mapping like '- rtn: {{bits: 4}}', got {entry!r}")
    (name, fields), = entry.items()
    if not isinstance(name, str) or name not in PASSES:
        raise RecipeError(f"{where}: unknown pass {name!r}; allowed: {sorted(PASSES)}")
    cls = PASSES[name]
    if not isinstance(fields, (dict, type(None))) or any(not isinstance(k, str) for k in (fields or {})):
        raise RecipeError(f"{where}: the settings of pass {name!r} must be a mapping of names to values, "
                          f"like '- {name}: {{bits: 4}}', got {fields!r}"[:300])
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
    if any(not isinstance(k, str) for k in data):
        raise RecipeError(f"{source}: every top-level key must be a name; got {sorted(map(repr, data))}"[:300])
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise RecipeError(f"{source}: unknown key {unknown[0]!r}; allowed: {sorted(_TOP_KEYS)}")
    if not isinstance(data.get("passes"), list):
        raise RecipeError(f"{source}: 'passes' must be a list of passes")
    calib = data.get("calibration") or {}
    if not isinstance(calib, dict) or any(not isinstance(k, str) for k in calib):
        raise RecipeError(f"{source}: calibration must be a mapping like '{{samples: 64, seqlen: 512}}', got {calib!r}"[:300])
    calib = dict(calib)
    bad = sorted(set(calib) - _CALIB_KEYS)
    if bad:
        raise RecipeError(f"{source}: unknown key {bad[0]!r} in calibration; allowed: {sorted(_CALIB_KEYS)}")
    for k, v in calib.items():
        if type(v) is not int or v < (0 if k == "seed" else 1):
            raise RecipeError(f"{source}: calibration.{k}={v!r} must be a positive integer")
    for k in ("targets", "ignore"):
        if k in data and not (isinstance(data[k], str) or
                              isinstance(data[k], list) and all(isinstance(x, str) for x in data[k])):
            raise RecipeError(f"{source}: {k} must be a name pattern or a list of them, got {data[k]!r}"[:300])
    defaults = {k: tuple([data[k]] if isinstance(data[k], str) else data[k]) for k in ("targets", "ignore") if k in data}
    passes = tuple(_build_pass(e, defaults, f"{source}: passes[{i}]") for i, e in enumerate(data["passes"]))
    check_order(passes)
    recipe = Recipe(passes=passes, description=str(data.get("description", "")), calibration=calib, source=source,
                    save=_save(data.get("save"), source))
    if recipe.save:
        from .export import ExportError, check_plan
        save = dict(recipe.save)
        try:
            check_plan(save.pop("format"), save, recipe)
        except ExportError as e:
            raise RecipeError(f"{source}: save: {e}") from None
    return recipe


def _save(save: Any, source: str) -> dict[str, Any]:
    """The recipe's ``save`` mapping: ``{format: NAME, ...options}``, checked by `check_plan` after the passes."""
    if save is None:
        return {}
    if not isinstance(save, dict) or not isinstance(save.get("format"), str):
        raise RecipeError(f"{source}: save must be a mapping with a 'format' name, e.g. save: {{format: gguf}}; "
                          f"got {save!r}")
    return dict(save)


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
        data = yaml.safe_load(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RecipeError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start}); a recipe is a YAML file") from None
    except (yaml.YAMLError, RecursionError) as e:
        raise RecipeError(f"{source}: invalid YAML ({(str(e).splitlines() or [type(e).__name__])[0]})") from None
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
