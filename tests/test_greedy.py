"""compressor.greedy: the greedy loop both fast paths share, against HF's semantics written out by hand."""
from __future__ import annotations

import numpy as np

from compressor.greedy import greedy

V = 10


def _scripted(script):
    """A step whose argmax at new-token index i of row b is script[b][i] (the eos scores 1 below the max)."""
    calls = []

    def step(tokens, pos):
        i = len(calls)
        calls.append((tokens.copy(), pos))
        logits = np.zeros((len(script), V), dtype=np.float32)
        for b, row in enumerate(script):
            logits[b, row[min(i, len(row) - 1)]] = 2.0
            logits[b, 9] = max(logits[b, 9], 1.0)
        return logits
    return step, calls


def test_positions_and_tokens_fed_back():
    step, calls = _scripted([[1, 2, 3]])
    out = greedy(step, np.array([[4, 5]]), 3)
    assert out.tolist() == [[4, 5, 1, 2, 3]]
    assert [p for _, p in calls] == [0, 2, 3] and calls[1][0].tolist() == [[1]]


def test_eos_pads_finished_rows_and_stops_when_all_are():
    step, _ = _scripted([[1, 9, 3, 3], [2, 2, 9, 3]])
    out = greedy(step, np.array([[4], [4]]), 6, eos_token_id=9, pad_token_id=0)
    assert out.tolist() == [[4, 1, 9, 0], [4, 2, 2, 9]]


def test_min_new_tokens_masks_eos_and_pad_defaults_to_it():
    step, _ = _scripted([[9, 9, 9]])
    assert greedy(step, np.array([[4]]), 3, min_new_tokens=2, eos_token_id=[9, 8]).tolist() == [[4, 0, 0, 9]]
    step, _ = _scripted([[1, 9, 9], [9, 1, 1]])
    assert greedy(step, np.array([[4], [4]]), 3, eos_token_id=9).tolist() == [[4, 1, 9], [4, 9, 9]]
