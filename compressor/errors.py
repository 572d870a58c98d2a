"""The one base of every error about something the user gave: a file, a recipe, a value.

Each loader raises a subclass naming the file and what is wrong with it (`ModelError` for source models
and safetensors, `CheckpointError`, `RecipeError`, `DataError` for calibration and evaluation text,
`TaskDataError`, `WorkDirError`, `ExportError`, `BenchInputError`), so a caller, the CLI, and
benchmarks/fuzz_loaders.py can tell "this input is bad" from "this program is broken" with one
``except InputError``. They stay ValueErrors, as they were.
"""
from __future__ import annotations

__all__ = ["InputError", "DataError"]


class InputError(ValueError):
    """An input the project cannot use; the message names it, what is wrong, and what to do."""


class DataError(InputError):
    """A calibration, training or evaluation text file that cannot be used."""
