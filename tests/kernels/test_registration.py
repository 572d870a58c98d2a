"""The ops' references serve every device; the compiled extension overrides CPU only."""
import pytest
import torch

from compressor.kernels import LAYOUTS, extension, pack_for


@pytest.mark.parametrize("op", ["int4_linear", "int8_linear", "f16_linear"])
def test_reference_registered_for_every_device(op):
    name = f"compressor::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeExplicitAutograd")
    if extension is not None:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")


def test_pack_for_knows_its_devices():
    q = torch.randint(0, 16, (32, 64))
    s, z = torch.rand(32, 1) + 0.1, torch.full((32, 1), 8.0)
    assert pack_for("cpu", q, s, z, 4, 64) is not None and "cpu" in LAYOUTS
    assert pack_for("meta", q, s, z, 4, 64) is None            # no layout: the module takes its reference
    assert pack_for("cpu", q, s, z, 3, 64) is None             # no 3-bit op


def test_quant_linear_without_a_layout_takes_the_reference(monkeypatch):
    from compressor.nn import QuantLinear
    from compressor.quant.primitives import choose_qparams, quantize
    w = torch.randn(32, 64)
    s, z = choose_qparams(w, 4, 32, False)
    m = QuantLinear.from_codes(quantize(w, s, z, 4, 32), s, z, 4, 32)
    monkeypatch.delitem(LAYOUTS, "cpu")                        # as on a device with no kernels yet
    x = torch.randn(3, 64)
    assert m.packed() is None and torch.equal(m(x), m.reference_forward(x))
