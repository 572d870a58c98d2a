"""compressor/bench/runner.py: one in-process run on the tiny llama against its rtn-w8 checkpoint,
and the names `compressor.bench` re-exports. The isolated run (a worker process per model) is
tested through the command line in test_bench_cli.py."""
import compressor.bench
from compressor.bench.config import BenchConfig
from compressor.bench.runner import run


def test_package_reexports_the_public_names():
    assert set(compressor.bench.__all__) == {"BenchConfig", "BenchInputError", "BenchResult", "ModelResult", "Row",
                                             "run", "parse_model_arg", "machine_info"}
    assert compressor.bench.run is run
    assert compressor.bench.machine_info(3)["threads"] == 3


def test_run_in_process(tiny_llama, tiny_w8, eval_text):
    cfg = BenchConfig(batches=(1, 3), prompt_len=8, gen_len=4, runs=2, threads=1, seqlen=64, eval_windows=2,
                      price_per_hour=1.0)
    res = run(str(tiny_llama), [f"w8={tiny_w8}"], eval_data=str(eval_text), config=cfg, progress=False,
              isolate=False)
    base, w8 = res.models
    assert (base.kind, w8.kind) == ("hf", "checkpoint") and w8.disk_bytes < base.disk_bytes
    from compressor import kernels
    assert (base.kernels, w8.kernels) == ("", kernels.backend())
    assert [len(m.runs) for m in res.models] == [4, 4] and [len(m.warmup) for m in res.models] == [2, 2]
    assert base.ppl_windows == 2
    # rtn-w8 barely moves perplexity: a loose check that both models ran on the same ids
    assert abs(w8.ppl / base.ppl - 1) < 0.05
    assert [(r.label, r.batch) for r in res.rows] == [("llama", 1), ("llama", 3), ("w8", 1), ("w8", 3)]
    assert all(r.cost_gen > 0 and r.decode_tok_s > 0 and r.ttft_s > 0 for r in res.rows)


def test_tasks_in_process(tiny_llama, tiny_w8, task_data):
    cfg = BenchConfig(batches=(1,), prompt_len=8, gen_len=2, runs=1, warmup=0, threads=1,
                      tasks=("hellaswag", "piqa"), task_limit=4, task_data=str(task_data), task_precision="fp32",
                      max_acc_drop=0.0)
    res = run(str(tiny_llama), [f"w8={tiny_w8}", f"same={tiny_llama}"], config=cfg, progress=False, isolate=False)
    base, w8, same = res.models
    assert base.tasks["hellaswag"]["n"] == 4 and base.tasks["piqa"]["n"] == 4
    assert len(base.tasks["hellaswag"]["loglikelihoods"][0]) == 4      # per item, per choice: kept for the JSON
    s = next(r for r in res.rows if r.label == "same")
    assert [c.task for c in s.tasks] == ["hellaswag", "piqa"]
    assert all(c.diff_pp == 0 and c.verdict == "no significant drop" for c in s.tasks)  # same model, same items
    assert same.tasks["piqa"]["loglikelihoods"] == base.tasks["piqa"]["loglikelihoods"]
    assert not s.failures                       # 4 items cannot make any drop significant


def test_gguf_export_row_runs_in_llama_cpp(tiny_bpe_llama, eval_text, tmp_path):
    """A gguf export is measured by llama.cpp in the same table, at batch 1 only, on the same ids."""
    import pytest
    pytest.importorskip("llama_cpp", reason="llama.cpp rows need llama-cpp-python (scripts/install-llama-cpp.sh)")
    import compressor
    from compressor.export import export
    ck = tmp_path / "q4"
    compressor.compress(str(tiny_bpe_llama), compressor.recipe.parse_recipe(
        {"passes": [{"rtn": {"bits": 4, "group_size": 32, "sym": True}}]}), ck, progress=False)
    gg = export(ck, "gguf", tmp_path / "q4-gguf", pre_tokenizer="gpt-2")
    cfg = BenchConfig(batches=(1, 2), prompt_len=8, gen_len=4, runs=2, threads=1, seqlen=64, eval_windows=2)
    res = run(str(ck), [f"gguf={gg}"], eval_data=str(eval_text), config=cfg, progress=False, isolate=False)
    base, g = res.models
    assert (g.engine, g.kind) == ("llama.cpp", "gguf") and g.kernels.startswith("llama.cpp")
    assert g.disk_bytes == (gg / "model.gguf").stat().st_size
    assert [(r.label, r.batch) for r in res.rows] == [("q4", 1), ("q4", 2), ("gguf", 1)]
    assert abs(g.ppl / base.ppl - 1) < 0.02                 # Q4_0 with llama.cpp's q8 activations
    assert res.rows[-1].decode_tok_s > 0


def test_gguf_export_as_base_needs_batch_one(tiny_bpe_llama, tmp_path):
    import pytest
    pytest.importorskip("llama_cpp", reason="llama.cpp rows need llama-cpp-python (scripts/install-llama-cpp.sh)")
    import compressor
    from compressor.bench import BenchInputError
    from compressor.export import export
    ck = tmp_path / "q4"
    compressor.compress(str(tiny_bpe_llama), compressor.recipe.parse_recipe(
        {"passes": [{"rtn": {"bits": 4, "group_size": 32, "sym": True}}]}), ck, progress=False)
    gg = export(ck, "gguf", tmp_path / "q4-gguf", pre_tokenizer="gpt-2")
    with pytest.raises(BenchInputError, match="--batch 1"):
        run(str(gg), [str(ck)], config=BenchConfig(batches=(1, 8)), progress=False, isolate=False)


def test_engines_torch_and_ort_measure_the_same_checkpoint(tiny_llama, tiny_w8, eval_text):
    """--engine torch,ort,ort:4: each model once per engine, the ort rows on onnx exports made for the run
    (the float BASE too) and removed after it; same windows, so the ort:0 ppl equals the torch one."""
    import pytest
    pytest.importorskip("onnxruntime", reason="ort rows need the onnx extra: pip install '.[onnx]'")
    from pathlib import Path
    cfg = BenchConfig(batches=(1, 2), prompt_len=8, gen_len=4, runs=1, threads=1, seqlen=64, eval_windows=2,
                      engines=("torch", "ort", "ort:4"))
    res = run(str(tiny_llama), [f"w8={tiny_w8}"], eval_data=str(eval_text), config=cfg, progress=False,
              isolate=False)
    by = {m.label: m for m in res.models}
    assert list(by) == ["llama", "llama [ort]", "llama [ort:4]", "w8", "w8 [ort]", "w8 [ort:4]"]
    assert [m.engine for m in res.models] == ["torch", "ort", "ort"] * 2
    assert by["w8 [ort]"].kind == "onnx" and "accuracy_level 0" in by["w8 [ort]"].kernels
    assert "accuracy_level 4" in by["w8 [ort:4]"].engine_note
    assert not Path(by["w8 [ort]"].path).exists()                     # the run's exports are gone
    for name in ("llama", "w8"):
        assert abs(by[f"{name} [ort]"].ppl / by[name].ppl - 1) < 1e-4
        assert abs(by[f"{name} [ort:4]"].ppl / by[name].ppl - 1) < 0.05
    assert [(r.label, r.batch, r.engine) for r in res.rows][:3] == [("llama", 1, "torch"), ("llama", 2, "torch"),
                                                                    ("llama [ort]", 1, "ort")]
    assert all(r.decode_tok_s > 0 for r in res.rows)


def test_unknown_engine_is_refused():
    import pytest

    from compressor.bench.config import BenchInputError
    with pytest.raises(BenchInputError, match="engine 'ort:9'"):
        BenchConfig(engines=("torch", "ort:9"))
