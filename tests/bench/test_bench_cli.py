"""compressor/bench/cli.py: bad inputs exit 2 with one line before any model loads; the gate exits 3
naming the failing rows; the files (JSON with raw samples, Markdown, PNG) are written."""
import json

from compressor.bench.cli import main

FAST = ["--batch", "1,2", "--prompt-len", "8", "--gen-len", "4", "--runs", "2", "--threads", "1", "--seqlen", "64",
        "--eval-windows", "2", "-q"]


def _err(capsys):
    return capsys.readouterr().err.strip()


# --- bad inputs: exit 2 with one line, before any model is loaded ----------------------------------

def test_path_that_does_not_resolve(capsys, tiny_llama, tmp_path):
    code = main([str(tiny_llama), f"w4={tmp_path / 'nope'}", *FAST])
    err = _err(capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("compress-bench: error: w4:") and "no such file or directory" in err


def test_eval_file_missing(capsys, tiny_llama, tmp_path):
    code = main([str(tiny_llama), "--eval-data", str(tmp_path / "missing.txt"), *FAST])
    err = _err(capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "missing.txt' does not exist" in err


def test_eval_file_too_short(capsys, tiny_llama, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("the quick brown fox")
    code = main([str(tiny_llama), "--eval-data", str(short), *FAST])
    err = _err(capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "fewer than one window of 64 (--seqlen)" in err


def test_tokenizer_mismatch_refused_for_perplexity(capsys, tiny_llama, tmp_path, eval_text):
    import shutil

    from transformers import AutoTokenizer
    other = tmp_path / "other"
    shutil.copytree(tiny_llama, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["brownfox"])              # a different vocabulary, same model weights
    tok.save_pretrained(other)
    code = main([str(tiny_llama), f"other={other}", "--eval-data", str(eval_text), *FAST])
    err = _err(capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "other: its tokenizer differs from llama's" in err


def test_too_many_positions(capsys, tiny_llama):
    code = main([str(tiny_llama), *FAST, "--prompt-len", "500", "--gen-len", "100"])
    err = _err(capsys)
    assert code == 2 and "needs 600 positions" in err and "max_position_embeddings is 512" in err


def test_ppl_gate_needs_eval_data(capsys, tiny_llama):
    assert main([str(tiny_llama), *FAST, "--max-ppl-increase", "1"]) == 2
    assert "--max-ppl-increase needs --eval-data" in _err(capsys)


def test_duplicate_labels(capsys, tiny_llama, tiny_w8):
    assert main([f"a={tiny_llama}", f"a={tiny_w8}", *FAST]) == 2
    assert "two models are labelled 'a'" in _err(capsys)



def test_cli_end_to_end_gate_and_outputs(capsys, tiny_llama, tiny_w8, eval_text, tmp_path):
    """One worker process per model; --min-speedup 100 fails the candidate rows: exit 3, rows named."""
    out = tmp_path / "o"
    code = main([str(tiny_llama), f"w8={tiny_w8}", "--eval-data", str(eval_text), *FAST, "--price-per-hour", "0.1",
                 "--min-speedup", "100", "--json", str(out / "b.json"), "--markdown", str(out / "b.md"),
                 "--plot", str(out / "b.png")])
    captured = capsys.readouterr()
    assert code == 3
    gate_lines = [ln for ln in captured.err.splitlines() if ln.startswith("compress-bench: gate failed")]
    assert len(gate_lines) == 2 and "< --min-speedup 100x" in gate_lines[0]
    assert "w8 (batch 1): decode speedup" in gate_lines[0]
    assert "w8 (batch 2)" in gate_lines[1]
    for col in ("disk MiB", "RSS load MiB", "peak RSS MiB", "ppl", "TTFT ms", "prefill tok/s", "prefill ×base", "decode tok/s",
                "$/1M gen", "$/1M prompt", "FAIL"):
        assert col in captured.out
    data = json.loads((out / "b.json").read_text())
    assert data["machine"]["threads"] == 1 and "torch" in data["machine"]["versions"]
    assert len(data["models"]) == 2 and len(data["models"][1]["runs"]) == 4     # 2 batches x 2 runs, raw
    assert {"prefill_s", "decode_s", "peak_rss", "batch"} <= set(data["models"][1]["runs"][0])
    assert data["models"][1]["rss_load"] > data["models"][1]["rss_base"] > 0
    assert len(data["failures"]) == 2
    md = (out / "b.md").read_text()
    assert "| model | engine | batch |" in md and "**Gate failed:**" in md
    assert (out / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- tasks ------------------------------------------------------------------------------------------

def test_task_inputs_are_checked_first(capsys, tiny_llama, tmp_path, task_data):
    assert main([str(tiny_llama), *FAST, "--max-acc-drop", "1"]) == 2
    assert "--max-acc-drop needs --tasks" in _err(capsys)
    assert main([str(tiny_llama), *FAST, "--tasks", "hellaswag,mmlu"]) == 2
    assert "unknown task 'mmlu' (known: hellaswag, piqa)" in _err(capsys)
    assert main([str(tiny_llama), *FAST, "--tasks", "piqa", "--data", str(tmp_path)]) == 2
    assert "piqa-valid.jsonl: no such file" in _err(capsys)
    assert main([str(tiny_llama), *FAST, "--tasks", "piqa", "--data", str(task_data), "--limit", "0"]) == 2
    assert "task_limit=0" in _err(capsys)


def test_task_columns_and_json(capsys, tiny_llama, tiny_w8, task_data, tmp_path):
    out = tmp_path / "r.json"
    code = main([str(tiny_llama), f"w8={tiny_w8}", "--batch", "1", "--prompt-len", "8", "--gen-len", "2", "--runs",
                 "1", "--threads", "1", "-q", "--tasks", "hellaswag,piqa", "--data", str(task_data), "--limit", "3",
                 "--max-acc-drop", "0", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert "w8 hellaswag: acc" in text and "w8 piqa: acc" in text and "95% CI" in text
    data = json.loads(out.read_text())
    m = data["models"][1]["tasks"]["hellaswag"]
    assert m["n"] == 3 and len(m["correct_norm"]) == 3 and len(m["loglikelihoods"]) == 3
