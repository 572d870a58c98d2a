"""Sparsity primitives against brute force, and the bitmask layout against numpy.packbits (exact)."""
import itertools

import numpy as np
import pytest
import torch

from compressor.sparsity import (allocate, bits_to_mask, mask_to_bits, max_nonzeros_per_group, nm_mask, pack_bitmask, parse_pattern, row_mask,
                                 unpack_bitmask)


@pytest.mark.parametrize("text,expect", [("2:4", (2, 4)), ("4:8", (4, 8)), (" 1 : 3 ", (1, 3))])
def test_parse_pattern(text, expect):
    assert parse_pattern(text) == expect


@pytest.mark.parametrize("bad", ["4:2", "2:2", "0:4", "2/4", "x:4", "", "2:4:8"])
def test_parse_pattern_refuses(bad):
    with pytest.raises(ValueError, match="pattern"):
        parse_pattern(bad)


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.75])
def test_row_mask_is_brute_force_top_k(sparsity):
    g = torch.Generator().manual_seed(1)
    score = torch.rand(6, 8, generator=g)
    mask = row_mask(score, sparsity)
    prune = round(sparsity * 8)
    for r in range(6):                        # the best keep set of each row, by enumeration
        best = max(itertools.combinations(range(8), 8 - prune), key=lambda c: float(score[r, list(c)].sum()))
        assert set(mask[r].nonzero().flatten().tolist()) == set(best)
    assert int((~mask).sum()) == 6 * prune


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_is_brute_force(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    score = torch.rand(5, 4 * m, generator=g)
    mask = nm_mask(score, n, m)
    for r in range(5):
        for j in range(0, 4 * m, m):
            best = max(itertools.combinations(range(m), n), key=lambda c: float(score[r, [j + i for i in c]].sum()))
            assert set((mask[r, j:j + m].nonzero().flatten()).tolist()) == set(best)
    assert max_nonzeros_per_group(mask.float(), m) == n


def test_nm_mask_refuses_indivisible():
    with pytest.raises(ValueError, match="divisible by 4"):
        nm_mask(torch.rand(2, 10), 2, 4)


@pytest.mark.parametrize("k", [8, 13, 64, 576])
def test_bitmask_round_trip_and_layout(k):
    g = torch.Generator().manual_seed(k)
    w = torch.randn(7, k, generator=g).half()
    w[torch.rand(7, k, generator=g) < 0.5] = 0
    w[2] = 0                                  # an empty row
    bitmask, values, offsets = pack_bitmask(w)
    ref = np.packbits((w != 0).numpy(), axis=-1, bitorder="little")
    assert np.array_equal(bitmask.numpy(), ref)
    assert torch.equal(values, w[w != 0])
    counts = (w != 0).sum(1)
    assert torch.equal(offsets, torch.cumsum(counts, 0) - counts)
    assert torch.equal(unpack_bitmask(bitmask, values, (7, k)), w)


def test_unpack_refuses_mismatch():
    w = torch.tensor([[1.0, 0.0, 2.0]])
    bitmask, values, _ = pack_bitmask(w)
    with pytest.raises(ValueError, match="values are stored"):
        unpack_bitmask(bitmask, values[:1], (1, 3))
    with pytest.raises(ValueError, match="does not match"):
        unpack_bitmask(bitmask, values, (1, 12))


def test_allocate_keeps_the_mean_and_orders_by_score():
    s = allocate([0.1, 0.5, 0.3, 0.9], 0.5, 0.08)
    assert sum(s) / 4 == pytest.approx(0.5)
    assert max(s) - min(s) == pytest.approx(0.16)
    assert s[3] < s[1] < s[2] < s[0]          # more outliers, fewer pruned
    assert allocate([0.2, 0.2], 0.5, 0.08) == [0.5, 0.5]


@pytest.mark.parametrize("k", [8, 13, 576])
def test_mask_bits_round_trip_exactly(k):
    mask = torch.rand(5, k, generator=torch.Generator().manual_seed(k)) > 0.5
    bits = mask_to_bits(mask)
    assert bits.dtype == torch.uint8 and bits.shape == (5, (k + 7) // 8)
    assert torch.equal(bits_to_mask(bits, (5, k)), mask)
    with pytest.raises(ValueError, match="does not match"):
        bits_to_mask(bits, (5, k + 8))
