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
