"""`compressor::int4_linear` / `int8_linear` against their PyTorch reference, on every compiled ISA.

Oracle: `reference`, except for calls of 2-31 rows inside `int8_activations` on a kernel set with
a batch gemv (AVX-512 VNNI: then `extension.batch_rows()` > 0), which take their activations as int8
per block: there the oracle is `int8_activation_reference`, the same arithmetic on the activations
those kernels see (`expected`). The `act` fixture runs a test both ways.

Tolerances: fp32 activations, relative error ||y - ref|| / ||ref|| <= 1e-5 (the kernels keep fp32
accumulation and fp32 dequantized weights). bf16 activations: relative error <= 2**-7, the size of
bf16 rounding. The reference rounds the dequantized weight to bf16 before ``F.linear`` (as
`QuantLinear.reference_forward` does); the decode kernels multiply the exact fp32 weight and round
only the output, so they differ from it by one bf16 rounding of the weight (measured ~3e-3).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from compressor.kernels import OPS, extension, int8_activations, pack, reference
from compressor.kernels.ops import f16_reference, int8_activation_reference, unpack_weight
from compressor.quant.primitives import choose_qparams, dequantize, quantize

@pytest.fixture(params=["exact", "int8"])
def act(request):
    """Kernel calls exact, or inside `int8_activations` (where this ISA has the int8 path)."""
    with int8_activations(request.param == "int8"):
        yield request.param


def batch_mode(rows: int) -> bool:
    """Whether the compiled kernels in use take a call of `rows` rows from this thread with int8 activations."""
    first = extension.batch_rows() if extension is not None else 0
    return first > 0 and first <= rows < 32


def expected(x: torch.Tensor, *args, bits: int) -> torch.Tensor:
    """The oracle for the op on x (see the module docstring), in x's dtype."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if batch_mode(rows):
        return int8_activation_reference(x, *args, bits=bits).to(x.dtype)
    return reference(x, *args, bits=bits)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm())


def assert_bf16_close(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    assert rel_err(y, ref) <= 2 ** -7


def make_packed(n: int, k: int, bits: int, group: int, sym: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    scale, zero = choose_qparams(w, bits, group, sym)
    q = quantize(w, scale, zero, bits, group)
    return pack(q, scale, zero, bits, group), (q, scale, zero)


# K not a multiple of 256, N odd (the op pads N to whole tiles; QuantLinear itself needs N % 8 == 0).
# 32 * 9 + 5 columns are ten tiles: the AVX-512 gemv streams them four, four and two at a time.
SHAPES = [(33, 384), (17, 1152), (65, 640), (32 * 9 + 5, 384)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_op_matches_reference(isa, act, bits, group, sym):
    for n, k in SHAPES + ([(9, 200)] if group == -1 else []):
        p, _ = make_packed(n, k, bits, group, sym)
        assert (p.zeros is None) == sym
        for m in (1, 2, 3, 17, 64):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            y = p(x)
            ref = expected(x, *p.args(), bits=bits)
            assert y.shape == (m, n) and y.dtype == torch.float32
            assert rel_err(y, ref) <= 1e-5, (n, k, m)
            xb = x.bfloat16()
            assert_bf16_close(p(xb), expected(xb, *p.args(), bits=bits))


@pytest.mark.parametrize("bits,group", [(4, 64), (8, -1)])
def test_activation_range(isa, act, bits, group):
    """Outliers, an all-zero block, and tiny and huge magnitudes: the AVX-512 gemv splits x into int8
    slices scaled per block, so a block's small entries are only as exact as its largest allows."""
    n, k = 32 * 5 + 3, 512
    p, _ = make_packed(n, k, bits, group, sym=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, k, generator=g)
    x[0, 7] = 3000.0                       # one outlier channel
    x[1, :256] = 0.0                       # zero blocks
    x[2] *= 1e-30                          # tiny (slices near the bottom of the fp32 range)
    x[3] *= 1e30                           # huge
    x[4, ::2] *= 1e-6                      # dynamic range inside every block
    for m in (1, 2, 6):
        ref = expected(x[:m], *p.args(), bits=bits)
        y = p(x[:m])
        for r in range(m):
            assert rel_err(y[r], ref[r]) <= 1e-5, (m, r)


@pytest.mark.parametrize("bits,group", [(4, 64), (8, -1)])
def test_non_finite_activations_propagate(isa, act, bits, group):
    """inf or NaN in a row of x gives no finite output in that row (as F.linear), others are unharmed."""
    n, k = 32 * 5 + 3, 256
    p, _ = make_packed(n, k, bits, group, sym=False)
    x = torch.randn(3, k)
    x[0, 5], x[1, 100] = float("inf"), float("nan")
    y, ref = p(x), expected(x, *p.args(), bits=bits)
    for r in (0, 1):
        assert not torch.isfinite(ref[r]).any() and not torch.isfinite(y[r]).any(), r
    assert rel_err(y[2], ref[2]) <= 1e-5


@pytest.mark.parametrize("bits,group", [(4, 64), (8, -1)])
def test_batch_shapes_bias_and_perm(isa, act, bits, group):
    n, k = 45, 256
    p, (q, scale, zero) = make_packed(n, k, bits, group, sym=False)
    bias = torch.randn(n)
    for shape in [(k,), (2, 3, k), (0, k), (40, k)]:
        x = torch.randn(*shape)
        y = OPS[bits](x, *p.args(bias))
        assert y.shape == (*shape[:-1], n)
        if x.numel():
            assert rel_err(y, expected(x, *p.args(bias), bits=bits)) <= 1e-5
    perm = torch.randperm(k)
    args = (p.qweight, p.scales, p.zeros, perm, bias, group, n)
    for m in (1, 5):
        x = torch.randn(m, k)
        assert rel_err(OPS[bits](x, *args), expected(x, *args, bits=bits)) <= 1e-5


@pytest.mark.skipif(extension is None or not extension.int8_supported(),
                    reason="no int8 batch gemv in this CPU's kernel set (AVX-512 VNNI only)")
@pytest.mark.parametrize("bits,group,sym", [(4, 64, False), (4, 128, True), (8, -1, True), (8, 32, False)])
def test_batch_gemv_every_row_count(bits, group, sym):
    """Inside int8_activations, 2-31 rows (one and two passes of the 16-row kernel, every row count it is
    compiled for) against the int8-activation oracle at fp32 tolerance, and within the int8 activations'
    own error of the fp32 reference (SQNR > 35 dB; measured ~44 dB). One row stays exact, and so does
    every call outside the block, on this thread and on another."""
    import threading
    n, k = 32 * 3 + 7, 512
    p, _ = make_packed(n, k, bits, group, sym)
    xs = [torch.randn(m, k, generator=torch.Generator().manual_seed(m)) for m in range(1, 32)]
    assert extension.batch_rows() == 0
    with int8_activations() as on:
        assert on and extension.batch_rows() == 2
        for x in xs:
            y, fp32 = p(x), reference(x, *p.args(), bits=bits)
            if len(x) == 1:
                assert rel_err(y, fp32) <= 1e-5
                continue
            assert rel_err(y, int8_activation_reference(x, *p.args(), bits=bits)) <= 1e-5, len(x)
            assert 10 * torch.log10(fp32.pow(2).sum() / (y - fp32).pow(2).sum()) > 35, len(x)
        other = []
        t = threading.Thread(target=lambda: other.append(rel_err(p(xs[7]), reference(xs[7], *p.args(), bits=bits))))
        t.start()
        t.join()
        assert other[0] <= 1e-5                     # the setting is the calling thread's
        with int8_activations(False):
            assert rel_err(p(xs[7]), reference(xs[7], *p.args(), bits=bits)) <= 1e-5
        assert extension.batch_rows() == 2
    assert extension.batch_rows() == 0
    assert rel_err(p(xs[7]), reference(xs[7], *p.args(), bits=bits)) <= 1e-5


@pytest.mark.skipif(extension is None, reason="the C++ extension is not built")
def test_half_rows_equal_torch_bit_for_bit(isa):
    """The fp32 -> fp16 conversion of the fp16 KV cache's rows (ToHalfFn) gives torch's fp16 bits for every
    kind of value: ties to even, the largest finite and what overflows, subnormals and what underflows, both
    zeros, infinities and NaNs of either sign; 16 at a time and the tail."""
    g = torch.Generator().manual_seed(0)
    edge = torch.tensor([0.0, -0.0, 1.0, 1 + 2 ** -11, 1 + 3 * 2 ** -11, 65504.0, 65519.0, 65520.0, -65520.0,
                         2 ** -24, 2 ** -25, 3 * 2 ** -26, 2 ** -26, 6.1e-5, -6.0e-8, float("inf"), float("-inf"),
                         float("nan"), -float("nan"), 1e30, -1e-30])
    x = torch.cat([edge, torch.randn(1000, generator=g) * 10 ** torch.randint(-8, 6, (1000,), generator=g)])
    for n in (len(x), 16, 7):
        assert torch.equal(extension._to_half(x[:n].contiguous()), x[:n].half().view(torch.int16)), (isa, n)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, -1])
def test_repack_round_trip_is_exact(bits, group):
    """unpack(pack(q)) reproduces dequantize(q) bit for bit, padding included."""
    for n, k in [(33, 384), (8, 64)]:
        p, (q, scale, zero) = make_packed(n, k, bits, group, sym=False)
        assert p.qweight.shape == (-(-n // 32), k * bits // 32, 32)
        w = unpack_weight(p.qweight, p.scales, p.zeros, bits, group, n)
        assert torch.equal(w, dequantize(q, scale, zero, group))


def test_opcheck():
    for bits, group, sym, bias, perm in [(4, 64, False, True, False), (4, -1, True, False, True),
                                         (8, 32, False, False, False), (8, -1, True, True, True)]:
        n, k = 40, 128
        p, _ = make_packed(n, k, bits, group, sym)
        args = (p.qweight, p.scales, p.zeros, torch.randperm(k) if perm else None,
                torch.randn(n) if bias else None, group, n)
        for x in (torch.randn(3, k), torch.randn(2, 1, k).bfloat16()):
            torch.library.opcheck(OPS[bits], (x, *args))


@pytest.mark.skipif(extension is None, reason="constraint checks are in the C++ kernel")
def test_errors_name_the_sizes():
    p, _ = make_packed(40, 128, 4, 64, sym=True)
    with pytest.raises(RuntimeError, match="in_features=96"):
        p(torch.randn(2, 96))
    with pytest.raises(RuntimeError, match="out_features=100"):
        OPS[4](torch.randn(2, 128), p.qweight, p.scales, None, None, None, 64, 100)
    with pytest.raises(RuntimeError, match="group_size=48"):
        OPS[4](torch.randn(2, 128), p.qweight, p.scales, None, None, None, 48, 40)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        p(torch.randn(2, 128).half())


def test_pack_rejects_unsupported():
    q = torch.zeros(8, 64, dtype=torch.uint8)
    s, z = torch.ones(8, 1), torch.full((8, 1), 4.0)
    with pytest.raises(ValueError, match="bits=3"):
        pack(q, s, z, 3, -1)
    g_idx = torch.zeros(64, dtype=torch.int32)  # one group of 64 channels where two of 32 are expected
    with pytest.raises(ValueError, match="not all 32"):
        pack(q, torch.ones(8, 2), torch.full((8, 2), 8.0), 4, 32, g_idx=g_idx)


def test_no_ext_env_uses_reference():
    """COMPRESSOR_NO_EXT=1 registers the PyTorch reference as the CPU kernel."""
    code = (
        "import torch\n"
        "from compressor.kernels import extension, pack, reference\n"
        "assert extension is None\n"
        "q = torch.randint(0, 16, (33, 128), dtype=torch.uint8)\n"
        "s, z = torch.rand(33, 2) + 0.1, torch.randint(1, 16, (33, 2)).float()\n"
        "p = pack(q, s, z, 4, 64)\n"
        "x = torch.randn(3, 128)\n"
        "assert torch.equal(p(x), reference(x, *p.args(), bits=4))\n"
        "print('ok')\n"
    )
    env = dict(os.environ, COMPRESSOR_NO_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_threads_split_tiles():
    """Two threads over many tiles give the single-thread result exactly (each tile is independent)."""
    p, _ = make_packed(32 * 40 + 7, 512, 4, 64, sym=False)
    x = torch.randn(5, 512)
    y1 = p(x)
    torch.set_num_threads(2)
    assert torch.equal(p(x), y1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(32 * 9 + 5, 640), (32 * 17 + 5, 2048)])
def test_prefill_on_two_threads_in_inference_mode(dtype, n, k):
    """The GEMM path: a small layer (< 2 MiB of fp32 per thread) is dequantized whole and multiplied on
    all threads; a larger one runs ATen ops on worker threads, which must see the caller's inference mode."""
    p, _ = make_packed(n, k, 4, 64, sym=False)
    x = torch.randn(40, k).to(dtype)
    ref = reference(x, *p.args(), bits=4)
    torch.set_num_threads(2)
    with torch.inference_mode():
        y = p(x)
    if dtype is torch.float32:
        assert rel_err(y, ref) <= 1e-5
    else:
        assert_bf16_close(y, ref)


# ------------------------------------------------------------------------------------------------
# compressor::f16_linear
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("m", [1, 3, 5, 17, 40])
def test_f16_linear_matches_reference(isa, m):
    """fp32 accumulation over an exactly widened fp16 weight: fp32 tolerance. K not a multiple of 32."""
    w, b = torch.randn(101, 200).half(), torch.randn(101)
    x = torch.randn(m, 200)
    y = torch.ops.compressor.f16_linear(x, w, b)
    assert y.shape == (m, 101) and rel_err(y, f16_reference(x, w, b)) <= 1e-5
    xb = torch.randn(2, m, 200).bfloat16()
    assert_bf16_close(torch.ops.compressor.f16_linear(xb, w, None), f16_reference(xb, w, None))


def test_f16_linear_opcheck_and_errors():
    w = torch.randn(24, 64).half()
    for x, b in ((torch.randn(3, 64), torch.randn(24)), (torch.randn(2, 1, 64).bfloat16(), None)):
        torch.library.opcheck(torch.ops.compressor.f16_linear.default, (x, w, b))
    if extension is not None:
        with pytest.raises(RuntimeError, match=r"x.size\(-1\)=63 does not match weight.size\(1\)=64"):
            torch.ops.compressor.f16_linear(torch.randn(2, 63), w, None)
        with pytest.raises(RuntimeError, match="weight must be float16"):
            torch.ops.compressor.f16_linear(torch.randn(2, 64), w.float(), None)
