"""Quantize/dequantize against a float64 reference, and SQNR floors per bit width."""
import pytest
import torch

from compressor.quant.primitives import choose_qparams, dequantize, fake_quantize, quantize, sqnr_db


def _reference(w, bits, group, sym):
    """Float64, element by element per group, written from the definition."""
    w = w.double()
    n, k = w.shape
    g = k if group == -1 else group
    maxq = 2 ** bits - 1
    out = torch.empty_like(w)
    for r in range(n):
        for s in range(0, k, g):
            x = w[r, s:s + g]
            lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
            if sym:
                scale = 2 * max(hi, -lo) / maxq or 1.0
                zero = (maxq + 1) // 2
            else:
                scale = (hi - lo) / maxq or 1.0
                zero = min(max(round(-lo / scale), 1), maxq)
            scale = float(torch.tensor(max(scale, 1e-6)).half())
            q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
            out[r, s:s + g] = (q - zero) * scale
    return out


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group", [-1, 32, 64])
@pytest.mark.parametrize("sym", [True, False])
def test_matches_float64_reference(bits, group, sym):
    w = torch.randn(7, 128, generator=torch.Generator().manual_seed(bits + group))
    got = fake_quantize(w, bits, group, sym).double()
    ref = _reference(w, bits, group, sym)
    # fp32 vs fp64 arithmetic can flip a rounding exactly at .5: allow at most a few codes
    flips = (got - ref).abs() > 1e-5
    assert flips.float().mean() < 0.01
    assert torch.allclose(got[~flips], ref[~flips], atol=1e-5)


@pytest.mark.parametrize("bits,floor", [(8, 40.0), (4, 18.0), (3, 12.0)])
def test_sqnr_floor(bits, floor):
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    assert sqnr_db(w, fake_quantize(w, bits, 64, sym=False)) > floor
    assert sqnr_db(w, fake_quantize(w, bits, 64, sym=True)) > floor - 1.5


def test_codes_in_range_and_groupwise_is_better():
    w = torch.randn(64, 256) * torch.logspace(-2, 1, 256)  # channels of very different ranges
    s, z = choose_qparams(w, 4, 32, False)
    q = quantize(w, s, z, 4, 32)
    assert q.min() >= 0 and q.max() <= 15 and z.min() >= 1
    assert sqnr_db(w, dequantize(q, s, z, 32)) > sqnr_db(w, fake_quantize(w, 4, -1, False))


def test_bad_group_size():
    with pytest.raises(ValueError, match="does not divide in_features=96"):
        choose_qparams(torch.randn(4, 96), 4, 64, False)
