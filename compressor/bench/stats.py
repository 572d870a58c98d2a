"""The arithmetic of `compress-bench`: medians, spreads, pairwise ratios, cost and the gate.

Pure functions on numbers, so each can be tested without a model.

  * A throughput is the median over k timed runs (after warm-up); its spread is half the range
    over the median, in percent (``±5%`` means the runs lay within about 5% of the median).
  * Runs alternate model by model (`schedule`: A B A B ...), so run r of every model saw the same
    machine state. A ratio against BASE is therefore computed per pair, ``cand[r] / base[r]``, and
    the median of those ratios is reported: drift that hits both members of a pair cancels.
  * Cost: a machine rented at P $/hour that sustains T tokens/s makes 3600 T tokens an hour, so
    one million tokens cost ``P / (3600 T) * 1e6`` dollars.
"""
from __future__ import annotations

import statistics
from typing import Sequence

__all__ = ["median", "spread_pct", "paired_ratios", "paired_speedup", "cost_per_million", "ppl_increase_pct",
           "gate", "schedule"]


def median(xs: Sequence[float]) -> float:
    if not xs:
        raise ValueError("median of no samples")
    return statistics.median(xs)


def spread_pct(xs: Sequence[float]) -> float:
    """Half the range of `xs` relative to their median, in percent (0 for a single sample)."""
    m = median(xs)
    return 0.0 if m == 0 else (max(xs) - min(xs)) / 2 / m * 100


def paired_ratios(cand: Sequence[float], base: Sequence[float]) -> list[float]:
    """``cand[r] / base[r]`` for each run r; both lists come from the same alternating schedule."""
    if len(cand) != len(base):
        raise ValueError(f"paired runs need equal counts, got {len(cand)} candidate and {len(base)} base samples")
    return [c / b for c, b in zip(cand, base)]


def paired_speedup(cand: Sequence[float], base: Sequence[float]) -> float:
    """Median of the per-pair throughput ratios (> 1: the candidate is faster)."""
    return median(paired_ratios(cand, base))


def cost_per_million(price_per_hour: float, tok_s: float) -> float:
    """Dollars per 1M tokens for a machine at `price_per_hour` $/h sustaining `tok_s` tokens/s."""
    if tok_s <= 0:
        raise ValueError(f"throughput must be positive, got {tok_s} tokens/s")
    return price_per_hour / 3600.0 / tok_s * 1e6


def ppl_increase_pct(ppl: float, base_ppl: float) -> float:
    """Relative perplexity increase over BASE in percent (negative: the candidate is better)."""
    return (ppl / base_ppl - 1.0) * 100


def gate(ppl_increase: float | None, speedup: float | None, max_ppl_increase: float | None,
         min_speedup: float | None) -> list[str]:
    """Why a candidate row fails the gate (empty list: it passes). None thresholds are not checked."""
    why = []
    if max_ppl_increase is not None and ppl_increase is not None and ppl_increase > max_ppl_increase:
        why.append(f"perplexity +{ppl_increase:.2f}% > --max-ppl-increase {max_ppl_increase:g}%")
    if min_speedup is not None and speedup is not None and speedup < min_speedup:
        why.append(f"decode speedup {speedup:.2f}x < --min-speedup {min_speedup:g}x")
    return why


def schedule(labels: Sequence[str], batches: Sequence[int], runs: int) -> list[tuple[int, int, str]]:
    """(batch, run, label) in execution order: per batch, run r of every model before run r + 1."""
    return [(b, r, label) for b in batches for r in range(runs) for label in labels]
