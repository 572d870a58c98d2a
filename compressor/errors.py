"""The one base of every error about something the user gave: a file, a recipe, a value.

Each loader raises a subclass naming the file and what is wrong with it (`ModelError` for source models
and safetensors, `CheckpointError`, `RecipeError`, `DataError` for calibration and evaluation text,
`TaskDataError`, `WorkDirError`, `ExportError`, `BenchInputError`), so a caller, the CLI, and
benchmarks/fuzz_loaders.py can tell "this input is bad" from "this program is broken" with one
``except InputError``. They stay ValueErrors, as they were.
"""
from __future__ import annotations

__all__ = ["InputError", "DataError", "NumericError", "read_json"]


class InputError(ValueError):
    """An input the project cannot use; the message names it, what is wrong, and what to do."""


class DataError(InputError):
    """A calibration, training or evaluation text file that cannot be used."""


class NumericError(RuntimeError):
    """A layer whose numbers are wrong (NaN, Inf, or packed weights that are not the pass's): the run stops
    before anything is written (`compressor.passes.weight_quant.self_check`)."""


def read_json(path, error: type[InputError] = InputError, what: str = "JSON") -> dict:
    """The JSON object in `path`; `error` naming the file when it is missing, unreadable, not UTF-8, not
    JSON, or not an object."""
    import json
    from pathlib import Path
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise error(f"{path}: not a valid {what} file ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: not a valid {what} file (a {type(data).__name__}, expected an object)")
    return data
