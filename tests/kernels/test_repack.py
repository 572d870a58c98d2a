"""`pack_gptq` (GPTQ words straight to the kernel layout) and `fuse`, exact against `pack`."""
from __future__ import annotations

import pytest
import torch

from compressor.kernels import pack, pack_gptq
from compressor.kernels.repack import fuse, select_rows
from compressor.quant.packing import pack_gptq as gptq_buffers


def _codes(n, k, bits, group, sym, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2 ** bits, (n, k), generator=g)
    groups = 1 if group == -1 else k // group
    scale = torch.rand(n, groups, generator=g).half().float() + 0.01
    zero = (torch.full((n, groups), 2.0 ** (bits - 1)) if sym
            else torch.randint(1, 2 ** bits, (n, groups), generator=g).float())   # GPTQ v1 holds zero >= 1
    return q, scale, zero


@pytest.mark.parametrize("bits,group,sym,n", [(4, 64, False, 96), (4, 64, True, 104), (4, 32, False, 40),
                                              (8, -1, True, 36), (8, 64, False, 64), (4, -1, False, 8)])
def test_pack_gptq_equals_pack(bits, group, sym, n):
    k = 128
    q, scale, zero = _codes(n, k, bits, group, sym)
    t = gptq_buffers(q, scale, zero, bits, torch.arange(k) // (k if group == -1 else group))
    a = pack(q, scale, zero, bits, group)
    b = pack_gptq(t["qweight"], t["qzeros"], t["scales"], bits, group, sym)
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)
    assert (a.zeros is None) == (b.zeros is None) and (a.zeros is None or torch.equal(a.zeros, b.zeros))
    assert (b.in_features, b.out_features, b.perm) == (k, n, None)


def test_fuse_concatenates_outputs_exactly():
    k, x = 128, torch.randn(3, 128)
    parts = [pack(*_codes(n, k, 4, 64, sym, seed=i), 4, 64) for i, (n, sym) in enumerate([(64, False), (32, True), (96, False)])]
    fused = fuse(parts)
    assert fused.out_features == 192
    torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], dim=-1), rtol=0, atol=0)


def test_fuse_refuses_what_it_cannot_join():
    k = 128
    a = pack(*_codes(64, k, 4, 64, False), 4, 64)
    assert fuse([a, pack(*_codes(64, k, 8, 64, False), 8, 64)]) is None          # bits differ
    assert fuse([a, pack(*_codes(64, k, 4, 32, False), 4, 32)]) is None          # group sizes differ
    assert fuse([pack(*_codes(40, k, 4, 64, False), 4, 64), a]) is None          # a padded tile inside
    assert fuse([a, None]) is None


@pytest.mark.parametrize("bits,sym,n", [(4, False, 96), (4, True, 40), (8, False, 72)])
def test_select_rows_moves_outputs_exactly(bits, sym, n):
    k, x = 128, torch.randn(3, 128)
    q, scale, zero = _codes(n, k, bits, 64, sym)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    g_idx = torch.randperm(k, generator=torch.Generator().manual_seed(1)) % 2    # act-order input: kept as is
    p = pack(q, scale, zero, bits, 64, g_idx=g_idx)
    moved, want = select_rows(p, order), pack(q[order], scale[order], zero[order], bits, 64, g_idx=g_idx)
    for name in ("qweight", "scales", "zeros", "perm"):
        a, b = getattr(moved, name), getattr(want, name)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name
    torch.testing.assert_close(moved(x), p(x)[:, order], rtol=0, atol=0)
    with pytest.raises(ValueError, match="permutation of the 96"):
        select_rows(pack(*_codes(96, k, 4, 64, False), 4, 64), torch.zeros(96, dtype=torch.long))
