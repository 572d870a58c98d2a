"""LowRankLinear: the forward is B(Ax) + bias, the spec rebuilds it, and a rank out of range is refused."""
import pytest
import torch

from compressor.nn import LowRankLinear, build_module, module_spec


def test_forward_is_the_product_of_the_factors():
    A, B, bias = torch.randn(8, 24), torch.randn(40, 8), torch.randn(40)
    m = LowRankLinear.from_factors(A, B, bias)
    x = torch.randn(3, 24)
    torch.testing.assert_close(m(x), x @ (B @ A).T + bias, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.weight, B @ A)
    assert m.n_params == 8 * (24 + 40)


def test_spec_rebuilds_an_empty_module_that_loads_the_state_dict():
    m = LowRankLinear.from_factors(torch.randn(16, 32), torch.randn(48, 16), None)
    spec = module_spec(m)
    assert spec == {"type": "low-rank", "in_features": 32, "out_features": 48, "rank": 16, "bias": False}
    back = build_module(spec)
    back.load_state_dict(m.state_dict(), assign=True)
    x = torch.randn(2, 32)
    assert torch.equal(back(x), m(x))


@pytest.mark.parametrize("rank", [0, 33])
def test_rank_out_of_range_is_refused(rank):
    with pytest.raises(ValueError, match=rf"rank={rank} must be in \[1, min\(in, out\) = 32\]"):
        LowRankLinear(32, 48, rank)
