from __future__ import annotations

import math

import pytest

from compressor.tasks import mcnemar_p, paired


def test_mcnemar_exact_values():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 5) == 1.0
    # 10 discordant, all one way: 2 * 0.5**10
    assert mcnemar_p(10, 0) == pytest.approx(2 / 1024)
    # b=2, c=8: 2 * P(X <= 2), X ~ Bin(10, 0.5) = 2 * 56 / 1024
    assert mcnemar_p(2, 8) == pytest.approx(112 / 1024)


def test_identical_models_have_no_drop():
    base = [1, 0, 1, 1, 0] * 40
    p = paired(base, list(base))
    assert p.diff_pp == 0 and p.ci_pp == (0.0, 0.0) and not p.significant_drop
    assert p.verdict() == "no significant drop" and not p.fails(0.0)


def test_a_clear_drop_is_significant_and_gated():
    base = [1] * 300 + [0] * 200
    cand = [0] * 60 + [1] * 240 + [0] * 200          # loses 60 of the base's right answers: -12 pp
    p = paired(base, cand)
    assert p.diff_pp == pytest.approx(-12.0)
    assert p.ci_pp[0] < -12 < p.ci_pp[1] < 0
    assert p.significant_drop and p.verdict() == "significant drop of 12.0 pp"
    assert p.fails(0.5) and not p.fails(20.0)
    assert p.p_value < 1e-10


def test_a_small_noisy_difference_is_not_significant():
    base = [1, 0] * 100
    cand = [0, 1] * 3 + [1, 0] * 97                  # 3 flips each way, plus... equal
    cand[-1], cand[-2] = 1, 1                         # one extra right answer
    p = paired(base, cand)
    assert p.ci_pp[0] < 0 < p.ci_pp[1] and not p.fails(0.0)
    assert 0 < p.p_value <= 1 and math.isfinite(p.p_value)


def test_mismatched_items_are_refused():
    with pytest.raises(ValueError, match="same non-empty items"):
        paired([1, 0], [1])
