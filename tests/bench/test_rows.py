"""compressor/bench/rows.py: rows from raw samples (medians, pairing, cost, gate)."""
import pytest

from compressor.bench.config import BenchConfig
from compressor.bench.measure import RunSample
from compressor.bench.rows import ModelResult, build_rows
from compressor.bench.runner import BenchResult


def _model(label, decode_s, prefill_s=0.5, ppl=None, batch=1):
    runs = [RunSample(batch=batch, prefill_s=prefill_s, decode_s=d, peak_rss=100 + i) for i, d in enumerate(decode_s)]
    return ModelResult(label=label, spec=label, path=label, disk_bytes=1000, rss_load=10, ppl=ppl, runs=runs)


def test_rows_pair_runs_and_take_medians():
    cfg = BenchConfig(batches=(1,), prompt_len=10, gen_len=11, runs=3, price_per_hour=0.36)
    # decode tok/s = 1 * (11 - 1) / decode_s; base 10, 5, 10 tok/s; candidate 20, 10, 40 tok/s
    base = _model("base", [1.0, 2.0, 1.0], ppl=10.0)
    cand = _model("w4", [0.5, 1.0, 0.25], ppl=10.5)
    rb, rc = build_rows([base, cand], cfg)
    assert rb.is_base and rb.decode_speedup == 1.0 and rb.decode_tok_s == 10.0
    assert rc.decode_tok_s == 20.0                               # median of 20, 10, 40
    assert rc.decode_speedup == 2.0                              # median of per-pair 2, 2, 4
    assert rc.decode_spread_pct == pytest.approx((40 - 10) / 2 / 20 * 100)
    assert rc.ppl_increase_pct == pytest.approx(5.0)
    assert rc.cost_gen == pytest.approx(0.36 / 3600 / 20 * 1e6)  # $5 per 1M at 20 tok/s
    assert rc.prefill_tok_s == 20.0 and rc.cost_prompt == pytest.approx(5.0)
    assert rc.ttft_s == 0.5 and rc.peak_rss == 102 and rc.failures == ()
    assert rc.prefill_speedup == 1.0
    _, fast = build_rows([base, _model("w4", [0.5, 1.0, 0.25], prefill_s=0.4)], cfg)
    assert fast.prefill_speedup == pytest.approx(1.25)           # the "prefill ×base" column


def test_rows_gate_flags_candidates_only():
    cfg = BenchConfig(batches=(1,), prompt_len=10, gen_len=11, runs=2, max_ppl_increase=1.0, min_speedup=3.0)
    rows = build_rows([_model("base", [1.0, 1.0], ppl=10.0), _model("w4", [0.5, 0.5], ppl=10.5)], cfg)
    assert rows[0].failures == ()
    assert len(rows[1].failures) == 2
    res = BenchResult(config=cfg, machine={}, models=[], rows=rows)
    assert res.failures[0].startswith("w4 (batch 1): perplexity +5.00% > --max-ppl-increase 1%")


def test_no_price_no_cost():
    rows = build_rows([_model("a", [1.0])], BenchConfig(batches=(1,), runs=1))
    assert rows[0].cost_gen is None and rows[0].cost_prompt is None


def test_task_gate_fails_a_significant_drop_only():
    from compressor.bench.rows import ModelResult, task_cells
    base = ModelResult("base", "b", "b", tasks={"piqa": {"acc": 0.8, "acc_norm": 0.8, "n": 500,
                                                        "correct": [1] * 400 + [0] * 100,
                                                        "correct_norm": [1] * 400 + [0] * 100}})
    bad = ModelResult("bad", "c", "c", tasks={"piqa": {"acc": 0.7, "acc_norm": 0.7, "n": 500, "correct": [0] * 500,
                                                      "correct_norm": [0] * 50 + [1] * 350 + [0] * 100}})
    cells, fails = task_cells(bad, base, 0.5)
    assert cells[0].diff_pp == -10.0 and cells[0].verdict == "significant drop of 10.0 pp"
    assert len(fails) == 1 and "piqa acc_norm -10.0 pp" in fails[0] and "--max-acc-drop 0.5" in fails[0]
    assert task_cells(bad, base, 15.0)[1] == []           # significant, but not larger than 15 pp
    assert task_cells(bad, base, None)[1] == []
