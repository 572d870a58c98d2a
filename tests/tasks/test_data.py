from __future__ import annotations

import json

import pytest

from compressor.tasks import TaskDataError, load_task, load_tasks, parse_tasks


def _hellaswag(d, tasks):
    lines = []
    for ctx, gold, ends in tasks:
        lines += [ctx, str(gold), *ends]
    (d / "hellaswag-val-5000.txt").write_text("\n".join(lines) + "\n")


def test_hellaswag_prompt_and_preprocess(tmp_path):
    _hellaswag(tmp_path, [("Roof: A man is on a roof. he", 3, ["a", "b  c", "d [title] e", " f "]),
                          ("X: y", 0, ["1", "2", "3", "4"])])
    items = load_task("hellaswag", tmp_path)
    assert items[0].context == "Roof: A man is on a roof. he"
    assert items[0].choices == ("a", "b c", "d. e", "f") and items[0].gold == 3
    assert items[0].delimiter == " "
    assert len(load_task("hellaswag", tmp_path, limit=1)) == 1


def test_piqa_prompt(tmp_path):
    (tmp_path / "piqa-valid.jsonl").write_text(json.dumps({"goal": "open a jar", "sol1": "twist ", "sol2": "cut"}) + "\n")
    (tmp_path / "piqa-valid-labels.lst").write_text("1\n")
    (it,) = load_task("piqa", tmp_path)
    assert it.context == "Question: open a jar\nAnswer:" and it.choices == ("twist ", "cut") and it.gold == 1


def test_real_files_have_the_documented_sizes(data_dir):
    if not (data_dir / "hellaswag-val-5000.txt").exists():
        pytest.skip(f"no task data in {data_dir}")
    assert len(load_task("hellaswag", data_dir)) == 5000
    piqa = load_task("piqa", data_dir)
    assert len(piqa) == 1838 and all(len(i.choices) == 2 for i in piqa)


def test_bad_inputs_fail_with_a_clear_message(tmp_path):
    with pytest.raises(TaskDataError, match="unknown task 'mmlu'"):
        parse_tasks("hellaswag,mmlu")
    with pytest.raises(TaskDataError, match="not a directory"):
        load_tasks("piqa", tmp_path / "nope")
    with pytest.raises(TaskDataError, match="no such file"):
        load_tasks("piqa", tmp_path)
    (tmp_path / "hellaswag-val-5000.txt").write_text("ctx\n1\na\nb\n")     # truncated
    with pytest.raises(TaskDataError, match="not a multiple of 6"):
        load_task("hellaswag", tmp_path)
    with pytest.raises(TaskDataError, match="limit=0"):
        load_task("hellaswag", tmp_path, limit=0)
    (tmp_path / "piqa-valid.jsonl").write_text('{"goal": "g"}\n')
    (tmp_path / "piqa-valid-labels.lst").write_text("0\n")
    with pytest.raises(TaskDataError, match="not a PIQA record"):
        load_task("piqa", tmp_path)
