"""QuantLinear.forward (the kernels on the packed layout) against QuantLinear.reference_forward; prepare_."""
from __future__ import annotations

import pytest
import torch

from compressor.kernels import extension
from compressor.nn import HalfLinear, prepare_
from compressor.nn.qlinear import QuantLinear
from compressor.quant.primitives import choose_qparams, quantize

pytestmark = pytest.mark.usefixtures("one_thread")   # see tests/kernels/conftest.py


def rel_err(y, ref) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm())


def make_qlinear(n, k, bits, group, sym=False, g_idx=None, bias=True, seed=0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    scale, zero = choose_qparams(w, bits, group, sym)
    q = quantize(w, scale, zero, bits, group)
    return QuantLinear.from_codes(q, scale, zero, bits, group, g_idx=g_idx,
                                  bias=torch.randn(n, generator=g) if bias else None)


@pytest.mark.parametrize("bits,group,sym", [(4, 64, False), (4, 32, True), (4, 128, False), (4, -1, True),
                                            (8, -1, True), (8, 64, False)])
@pytest.mark.parametrize("shape", [(1, 1), (3,), (2, 17), (64,)])
def test_forward_matches_reference(bits, group, sym, shape):
    m = make_qlinear(96, 384, bits, group, sym)
    x = torch.randn(*shape, 384)
    y = m(x)
    assert m.packed() is not None          # the op ran, not the fallback
    assert y.shape == (*shape, 96)
    assert rel_err(y, m.reference_forward(x)) <= 1e-5
    xb = x.bfloat16()
    yb = m(xb)
    # reference_forward itself would fail here: F.linear refuses a bf16 input with the fp32 bias.
    ref = torch.nn.functional.linear(xb, m.dequantized_weight(torch.bfloat16), m.bias.bfloat16())
    assert yb.dtype == torch.bfloat16 and rel_err(yb, ref) <= 2 ** -7


@pytest.mark.parametrize("bits", [2, 3])
def test_low_bits_take_the_reference(bits):
    m = make_qlinear(64, 128, bits, 32)
    x = torch.randn(5, 128)
    assert torch.equal(m(x), m.reference_forward(x))
    assert m.packed() is None


@pytest.mark.parametrize("bits", [4, 8])
def test_act_order_g_idx(bits):
    """A GPTQ desc_act checkpoint: groups are contiguous only after permuting input channels."""
    k, group = 256, 32
    order = torch.randperm(k, generator=torch.Generator().manual_seed(1))
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // group).to(torch.int32)   # non-monotone
    m = make_qlinear(64, k, bits, group, g_idx=g_idx)
    x = torch.randn(3, k)
    assert rel_err(m(x), m.reference_forward(x)) <= 1e-5
    assert m.packed().perm is not None


def test_unequal_groups_fall_back():
    k = 128
    g_idx = torch.cat([torch.zeros(48), torch.ones(16), torch.full((64,), 2)]).to(torch.int32).flip(0)
    m = make_qlinear(32, k, 4, 64, g_idx=None)
    m.g_idx.copy_(torch.where(g_idx > 1, 1, g_idx))     # groups of 48 and 80 channels
    x = torch.randn(2, k)
    assert torch.equal(m(x), m.reference_forward(x))
    assert m.packed() is None


def test_cache_follows_load_state_dict():
    a, b = make_qlinear(64, 128, 4, 64, seed=0), make_qlinear(64, 128, 4, 64, seed=1)
    x = torch.randn(2, 128)
    a(x)                                                  # builds the cache for a's weights
    a.load_state_dict(b.state_dict())                     # in-place copy_
    assert rel_err(a(x), b.reference_forward(x)) <= 1e-5
    c = make_qlinear(64, 128, 4, 64, seed=2)
    a.load_state_dict(c.state_dict(), assign=True)        # new tensors
    assert rel_err(a(x), c.reference_forward(x)) <= 1e-5


def test_prepare_and_compile():
    model = torch.nn.Sequential(make_qlinear(64, 128, 4, 64), torch.nn.ReLU(), make_qlinear(32, 64, 8, -1))
    prepare_(model)
    assert all("cpu" in m._kernel_state for m in model if isinstance(m, QuantLinear))
    x = torch.randn(3, 128)
    ref = model[2].reference_forward(torch.relu(model[0].reference_forward(x)))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    assert rel_err(compiled(x), ref) <= 1e-5


def test_current_backend_is_marked_constant_without_importing_dynamo():
    """dispatch sets the flag `torch.compiler.assume_constant_result` sets, so that loading a model does not
    import torch._dynamo (~145 MiB with sympy and triton); the compile test above checks it takes effect."""
    import subprocess
    import sys
    from compressor.kernels.dispatch import current_backend
    marked = torch.compiler.assume_constant_result(lambda: "auto")
    assert vars(marked) == {"_dynamo_marked_constant": True} and current_backend._dynamo_marked_constant is True
    code = ("import sys, torch, compressor.nn, compressor.nn.decoder, compressor.kernels; "
            "print(sorted(m for m in ('torch._dynamo', 'sympy', 'triton', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_module_built_in_inference_mode():
    with torch.inference_mode():
        m = make_qlinear(64, 128, 4, 64)
        x = torch.randn(2, 128)
        assert rel_err(m(x), m.reference_forward(x)) <= 1e-5


class _Head(torch.nn.Module):
    """The two methods of a transformers model that `prepare_` uses, around one Linear head."""
    def __init__(self, head: torch.nn.Linear):
        super().__init__()
        self.lm_head = head

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, m):
        self.lm_head = m


@pytest.mark.skipif(extension is None, reason="without the extension the fp32 head is kept")
def test_prepare_swaps_an_exact_fp16_head_only():
    head = torch.nn.Linear(96, 300, bias=False)
    with torch.no_grad():
        head.weight.copy_(head.weight.half().float())          # as loaded from an fp16 checkpoint
    x = torch.randn(1, 96)
    ref = head(x).detach()
    model = prepare_(_Head(head))
    assert isinstance(model.lm_head, HalfLinear) and model.lm_head.weight.dtype == torch.float16
    assert rel_err(model.lm_head(x), ref) <= 1e-6
    fp32 = torch.nn.Linear(96, 300, bias=False)                 # not fp16-exact: nothing may be lost
    assert prepare_(_Head(fp32)).lm_head is fp32
    assert prepare_(_Head(head), half_lm_head=False).lm_head is head


@pytest.mark.skipif(extension is None, reason="the probe is in the C++ extension")
@pytest.mark.parametrize("streams", [1, 8])
def test_stream_read_probe_reads_every_element(streams):
    """The bandwidth probe of bench_kernels: its checksum is the sum of whole spans it read."""
    span = 16384 * streams
    buf = torch.randint(0, 100, (3 * span + 5,), dtype=torch.int32)  # the 5-element tail is not read
    assert extension._stream_read(buf, streams) == int(buf[:3 * span].sum())
    with pytest.raises(RuntimeError, match="contiguous int32"):
        extension._stream_read(buf.float(), streams)
