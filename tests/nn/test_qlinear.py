"""QuantLinear holds exactly the codes it was built from, and its forward matches dequant + F.linear."""
import pytest
import torch
import torch.nn.functional as F

from compressor.nn.qlinear import QuantLinear
from compressor.quant.primitives import choose_qparams, dequantize, quantize


@pytest.mark.parametrize("bits,group,sym", [(4, 64, False), (4, 32, True), (8, -1, True), (3, 64, False)])
def test_from_codes_round_trip(bits, group, sym):
    w = torch.randn(96, 128)
    s, z = choose_qparams(w, bits, group, sym)
    q = quantize(w, s, z, bits, group)
    m = QuantLinear.from_codes(q, s, z, bits, group, bias=torch.randn(96))
    q2, s2, z2, _ = m.codes()
    assert torch.equal(q2, q) and torch.equal(z2, z) and torch.equal(s2, s)
    x = torch.randn(3, 5, 128)
    ref = F.linear(x, dequantize(q, s, z, group), m.bias)
    # the compiled kernel accumulates in another order than F.linear: fp32 normwise relative error
    assert float((m(x) - ref).norm() / ref.norm()) < 1e-5
    torch.testing.assert_close(m.reference_forward(x), ref, rtol=0, atol=0)


def test_refuses_bad_shapes():
    with pytest.raises(ValueError, match="does not divide"):
        QuantLinear(96, 64, 4, 64)
    with pytest.raises(ValueError, match="divisible by 32"):
        QuantLinear(64, 40, 3, 32)


def test_forward_with_grad_enabled_takes_the_differentiable_reference():
    """model(x) outside no_grad (x requiring grad, e.g. from a trainable embedding) must not crash in
    the kernel, which has no backward, and must give gradients."""
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    s, z = choose_qparams(w, 4, 64, False)
    q = QuantLinear.from_codes(quantize(w, s, z, 4, 64), s, z, 4, 64)
    x = torch.randn(3, 128, requires_grad=True)
    y = q(x)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad():
        assert torch.allclose(q(x), y, rtol=1e-4, atol=1e-4)
