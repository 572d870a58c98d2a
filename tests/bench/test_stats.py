"""compressor/bench/stats.py: cost arithmetic, medians and spreads, pairing, the gate, the schedule."""
import pytest

from compressor.bench import stats


def test_cost_per_million_by_hand():
    # $0.10/h at 100 tok/s: 360,000 tokens an hour, so 1M tokens take 1/0.36 h = $0.2778
    assert stats.cost_per_million(0.10, 100.0) == pytest.approx(0.10 / 0.36)
    assert stats.cost_per_million(3.6, 1.0) == pytest.approx(1000.0)      # $0.001/s for 1e6 s
    assert stats.cost_per_million(0.0, 5.0) == 0.0


def test_cost_halves_when_throughput_doubles():
    assert stats.cost_per_million(0.5, 200.0) == pytest.approx(stats.cost_per_million(0.5, 100.0) / 2)


def test_cost_refuses_zero_throughput():
    with pytest.raises(ValueError, match="throughput must be positive"):
        stats.cost_per_million(0.1, 0.0)


@pytest.mark.parametrize("xs, med", [([3.0], 3.0), ([5.0, 1.0, 3.0], 3.0), ([4.0, 1.0, 3.0, 2.0], 2.5),
                                      ([7.0, 7.0, 100.0], 7.0)])
def test_median(xs, med):
    assert stats.median(xs) == med


def test_median_of_nothing():
    with pytest.raises(ValueError, match="no samples"):
        stats.median([])


def test_spread_is_half_range_over_median():
    assert stats.spread_pct([90.0, 100.0, 110.0]) == pytest.approx(10.0)
    assert stats.spread_pct([42.0]) == 0.0


def test_paired_ratios_are_run_by_run():
    base = [10.0, 20.0, 10.0]       # the machine was twice as fast during run 1 ...
    cand = [15.0, 30.0, 15.0]       # ... for both models: every pair says 1.5x
    assert stats.paired_ratios(cand, base) == [1.5, 1.5, 1.5]
    assert stats.paired_speedup(cand, base) == 1.5
    # the ratio of medians would mix runs; the median of per-pair ratios does not
    cand2, base2 = [12.0, 30.0, 31.0], [10.0, 20.0, 40.0]
    assert stats.paired_speedup(cand2, base2) == pytest.approx(1.2)
    assert stats.median(cand2) / stats.median(base2) == pytest.approx(1.5)


def test_paired_ratios_need_equal_counts():
    with pytest.raises(ValueError, match="2 candidate and 3 base"):
        stats.paired_ratios([1.0, 2.0], [1.0, 2.0, 3.0])


def test_ppl_increase():
    assert stats.ppl_increase_pct(11.0, 10.0) == pytest.approx(10.0)
    assert stats.ppl_increase_pct(9.5, 10.0) == pytest.approx(-5.0)


@pytest.mark.parametrize("inc, speed, max_inc, min_speed, n_fail", [
    (5.0, 2.0, None, None, 0),        # no thresholds: nothing checked
    (5.0, 2.0, 5.0, 2.0, 0),          # exactly at the limits passes
    (5.01, 2.0, 5.0, None, 1),
    (1.0, 1.99, None, 2.0, 1),
    (9.0, 0.5, 5.0, 2.0, 2),
    (None, 3.0, 5.0, 2.0, 0),         # no perplexity measured: only speed is judged
])
def test_gate(inc, speed, max_inc, min_speed, n_fail):
    assert len(stats.gate(inc, speed, max_inc, min_speed)) == n_fail


def test_gate_names_the_limit():
    (why,) = stats.gate(None, 1.4, None, 100)
    assert why == "decode speedup 1.40x < --min-speedup 100x"


def test_schedule_alternates_models_run_by_run():
    order = stats.schedule(["A", "B", "C"], [1, 8], 2)
    assert [lbl for _, _, lbl in order] == ["A", "B", "C"] * 4
    assert [(b, r) for b, r, _ in order[:6]] == [(1, 0)] * 3 + [(1, 1)] * 3
    assert {b for b, _, _ in order[6:]} == {8}
    assert len(order) == 3 * 2 * 2
