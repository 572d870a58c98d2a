"""Accuracy of one model on one task (`TaskResult`) and the paired comparison of two models on the same
items (`Paired`): the difference, a 95% paired-bootstrap interval, McNemar's exact test, a verdict.

Paired, because both models answer the same items: an item both get right or both get wrong says
nothing about the difference, so the interval is far tighter than two independent ones would be.
The bootstrap resamples items (with their pair of answers) 10,000 times with a fixed seed; McNemar's
test is the exact two-sided binomial test on the discordant items. A drop is *significant* when the
whole interval lies below zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["TaskResult", "TaskReport", "Paired", "paired", "mcnemar_p", "predictions"]


def predictions(lls: list[tuple[float, ...]], choices: list[tuple[str, ...]]) -> tuple[list[int], list[int]]:
    """(argmax of the summed log-likelihood, argmax of it divided by each choice's length in characters)."""
    acc, norm = [], []
    for ll, ch in zip(lls, choices):
        acc.append(max(range(len(ll)), key=lambda i: ll[i]))
        norm.append(max(range(len(ll)), key=lambda i: ll[i] / max(len(ch[i]), 1)))
    return acc, norm


@dataclass
class TaskResult:
    """One model on one task. The per-item log-likelihoods are kept so two runs can be compared later."""
    task: str
    n: int
    acc: float
    acc_norm: float
    correct: list[int] = field(repr=False)          # per item, 1 if acc's answer is right
    correct_norm: list[int] = field(repr=False)     # per item, 1 if acc_norm's answer is right
    loglikelihoods: list[list[float]] = field(repr=False)
    precision: str = "fp32"
    seconds: float = 0.0
    tokens: int = 0

    @classmethod
    def from_scores(cls, task: str, lls, items, **kw) -> "TaskResult":
        acc, norm = predictions(lls, [it.choices for it in items])
        c = [int(a == it.gold) for a, it in zip(acc, items)]
        cn = [int(a == it.gold) for a, it in zip(norm, items)]
        n = len(items)
        return cls(task, n, sum(c) / n, sum(cn) / n, c, cn, [list(x) for x in lls], **kw)

    FIELDS = {"acc": "correct", "acc_norm": "correct_norm"}     # metric -> its per-item field

    def metric(self, name: str) -> list[int]:
        return getattr(self, self.FIELDS[name])


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: b items only the first got right, c only the second."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Paired:
    metric: str
    base: float
    candidate: float
    diff_pp: float                 # candidate - base, percentage points
    ci_pp: tuple[float, float]     # 95% paired-bootstrap interval of diff_pp
    p_value: float                 # McNemar, exact
    n: int

    @property
    def significant_drop(self) -> bool:
        return self.ci_pp[1] < 0

    def verdict(self) -> str:
        if self.significant_drop:
            return f"significant drop of {-self.diff_pp:.1f} pp"
        if self.ci_pp[0] > 0:
            return f"significant gain of {self.diff_pp:.1f} pp"
        return "no significant drop"

    def fails(self, max_drop_pp: float) -> bool:
        """The gate: a significant drop larger than `max_drop_pp`."""
        return self.significant_drop and -self.diff_pp > max_drop_pp

    def failure(self, task: str, max_drop_pp: float | None) -> str | None:
        """Why `task` fails the gate, or None if it passes (or no gate is set)."""
        if max_drop_pp is None or not self.fails(max_drop_pp):
            return None
        return (f"{task} {self.metric} {self.diff_pp:+.1f} pp (95% CI {self.ci_pp[0]:+.1f} to {self.ci_pp[1]:+.1f}), "
                f"a significant drop > --max-acc-drop {max_drop_pp:g} pp")


def paired(base: list[int], cand: list[int], metric: str = "acc_norm", n_boot: int = 10_000,
           seed: int = 0) -> Paired:
    """Compare per-item correctness (0/1 lists over the same items, in the same order)."""
    if len(base) != len(cand) or not base:
        raise ValueError(f"paired comparison needs the same non-empty items: {len(base)} vs {len(cand)}")
    b = torch.tensor(base, dtype=torch.float64)
    c = torch.tensor(cand, dtype=torch.float64)
    d = c - b
    n = d.numel()
    g = torch.Generator().manual_seed(seed)
    means = []
    for i in range(0, n_boot, 1000):                   # 1000 resamples at a time: bounded memory
        idx = torch.randint(0, n, (min(1000, n_boot - i), n), generator=g)
        means.append(d[idx].mean(1))
    boots = torch.cat(means).sort().values
    lo, hi = boots[int(0.025 * (n_boot - 1))].item(), boots[int(math.ceil(0.975 * (n_boot - 1)))].item()
    only_base = int(((b == 1) & (c == 0)).sum())
    only_cand = int(((b == 0) & (c == 1)).sum())
    return Paired(metric, b.mean().item(), c.mean().item(), 100 * d.mean().item(), (100 * lo, 100 * hi),
                  mcnemar_p(only_base, only_cand), n)


@dataclass
class TaskReport:
    """Task accuracy of one `compressor.compress` run: the original and the compressed model as saved."""
    original: dict[str, TaskResult]
    compressed: dict[str, TaskResult] = field(default_factory=dict)
    metric: str = "acc_norm"

    def paired(self) -> dict[str, Paired]:
        return {t: paired(self.original[t].metric(self.metric), r.metric(self.metric), self.metric)
                for t, r in self.compressed.items()}

    def failures(self, max_drop_pp: float | None) -> list[str]:
        return [f for t, p in self.paired().items() if (f := p.failure(t, max_drop_pp))]
