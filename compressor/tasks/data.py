"""The multiple-choice sets, read from their files into `Item`s exactly as lm-evaluation-harness prompts them.

* HellaSwag (`hellaswag-val-5000.txt`, 6 lines per task: ``activity_label: ctx``, the gold index,
  4 endings): context ``"{activity_label}: {ctx}"``, choices ``" " + ending``, after lm-eval's
  `preprocess` (strip, ``" [title]"`` to ``". "``, bracketed tags removed, double spaces collapsed).
* PIQA (`piqa-valid.jsonl` + `piqa-valid-labels.lst`): context ``"Question: {goal}\\nAnswer:"``,
  choices ``" " + sol1``, ``" " + sol2``, unprocessed.

`Item.choices` holds the choice texts without the separating space; `Item.delimiter` is that space.
acc_norm divides by ``len(choice)`` of these texts, as lm-eval does.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

__all__ = ["Item", "TASKS", "TaskDataError", "load_task", "task_files", "parse_tasks"]


class TaskDataError(InputError):
    """A task name or data file that cannot be read; raised before any model work."""


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]
    gold: int
    delimiter: str = " "


def _preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess`."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaskDataError(f"{path}: no such file (pass --data DIR with the task files, see ../shared/data/README.md)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TaskDataError(f"{path}: cannot read it as UTF-8 text ({e})") from None


def load_hellaswag(data: Path, limit: int | None = None) -> list[Item]:
    path = data / "hellaswag-val-5000.txt"
    lines = _read(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise TaskDataError(f"{path}: {len(lines)} lines, not a multiple of 6 (context, gold index, 4 endings per "
                            "task): the file is truncated or not in llama.cpp's hellaswag text form")
    items = []
    n = len(lines) // 6 if limit is None else min(limit, len(lines) // 6)
    for t in range(n):
        ctx, gold, *ends = lines[6 * t:6 * t + 6]
        if gold.strip() not in ("0", "1", "2", "3"):
            raise TaskDataError(f"{path}:{6 * t + 2}: gold index {gold!r}, expected 0-3")
        items.append(Item(_preprocess(ctx), tuple(_preprocess(e) for e in ends), int(gold)))
    return items


def load_piqa(data: Path, limit: int | None = None) -> list[Item]:
    qpath, lpath = data / "piqa-valid.jsonl", data / "piqa-valid-labels.lst"
    rows = [ln for ln in _read(qpath).split("\n") if ln.strip()]
    labels = [ln.strip() for ln in _read(lpath).split("\n") if ln.strip()]
    if len(rows) != len(labels):
        raise TaskDataError(f"{qpath}: {len(rows)} questions but {lpath.name} has {len(labels)} labels")
    items = []
    for i, (row, lab) in enumerate(zip(rows, labels)):
        if limit is not None and i >= limit:
            break
        try:
            d = json.loads(row)
            sols = (d["sol1"], d["sol2"])
            goal = d["goal"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise TaskDataError(f"{qpath}:{i + 1}: not a PIQA record with goal, sol1, sol2 ({e})") from None
        if lab not in ("0", "1"):
            raise TaskDataError(f"{lpath}:{i + 1}: label {lab!r}, expected 0 or 1")
        items.append(Item(f"Question: {goal}\nAnswer:", sols, int(lab)))
    return items


TASKS = {"hellaswag": load_hellaswag, "piqa": load_piqa}


def parse_tasks(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``"hellaswag,piqa"`` (or a list) -> a tuple of known task names; unknown ones are refused."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise TaskDataError(f"tasks={spec!r}: name at least one task (known: {', '.join(TASKS)})")
    for n in names:
        if n not in TASKS:
            raise TaskDataError(f"unknown task {n!r} (known: {', '.join(TASKS)})")
    if len(set(names)) != len(names):
        raise TaskDataError(f"tasks={spec!r}: a task is repeated")
    return tuple(names)


def default_data_dir() -> Path:
    """The first of `compressor.calib.data_dirs` ($COMPRESSOR_DATA, ../shared/data)."""
    from ..calib import data_dirs
    return data_dirs()[0]


def task_files(name: str) -> tuple[str, ...]:
    return {"hellaswag": ("hellaswag-val-5000.txt",),
            "piqa": ("piqa-valid.jsonl", "piqa-valid-labels.lst")}[name]


def load_task(name: str, data: str | os.PathLike | None = None, limit: int | None = None) -> list[Item]:
    """The first `limit` items (all if None) of task `name` from the directory `data`."""
    if name not in TASKS:
        raise TaskDataError(f"unknown task {name!r} (known: {', '.join(TASKS)})")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise TaskDataError(f"limit={limit!r}: must be a positive integer (or None for every item)")
    d = Path(data) if data is not None else default_data_dir()
    if not d.is_dir():
        raise TaskDataError(f"{d}: not a directory (pass --data DIR with the task files, see ../shared/data/README.md)")
    return TASKS[name](d, limit)
