"""compressor::llama_layer (csrc/cpu/layer.cpp) against its pure-PyTorch reference, on every ISA."""
from __future__ import annotations

import pytest
import torch

from compressor.kernels import extension, layer, pack
from compressor.quant.primitives import choose_qparams, quantize

from compressor.kernels.ops import int8_activation_reference
from test_ops import act, batch_mode, rel_err  # noqa: F401  (act: a fixture; isa comes from conftest.py)

H, NH, NKV, HD, INTER = 128, 4, 2, 32, 256


def _lin(n: int, k: int, bits: int, group: int, sym: bool, seed: int, perm: bool = False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    order = torch.randperm(k, generator=g) if perm else torch.arange(k)
    scale, zero = choose_qparams(w[:, order], bits, group, sym)
    qo = quantize(w[:, order], scale, zero, bits, group)      # groups contiguous in `order`
    q = torch.empty_like(qo)
    q[:, order] = qo
    g_idx = torch.empty(k, dtype=torch.int32)              # act-order: channel order[i] is in group i // group
    g_idx[order] = (torch.arange(k) // (k if group == -1 else group)).to(torch.int32)
    return pack(q, scale, zero, bits, group, g_idx if perm else None)


def _weights(bits=4, group=64, sym=False, bias=False, perm=False, nh=NH, nkv=NKV, hd=HD):
    w, meta = [], []
    for i, (n, k) in enumerate([((nh + 2 * nkv) * hd, H), (H, nh * hd), (2 * INTER, H), (H, INTER)]):
        p = _lin(n, k, bits, group, sym, seed=i, perm=perm and i != 1)
        w += [p.qweight, p.scales, p.zeros, p.perm, torch.randn(n) * 0.1 if bias else None]
        meta += [bits, group, n]
    return w, meta + [nh, nkv, hd]


def _tables(n: int, hd: int = HD):
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    f = torch.outer(torch.arange(n).float(), inv)
    emb = torch.cat([f, f], dim=-1)
    return emb.cos().contiguous(), emb.sin().contiguous()


@pytest.mark.skipif(extension is None, reason="the C++ extension is not built")
@pytest.mark.parametrize("bits,group,sym,bias,perm", [(4, 64, False, False, False), (4, 32, True, True, False),
                                                      (8, -1, True, False, False), (4, 64, False, False, True)])
@pytest.mark.parametrize("batch,steps", [(1, [7, 1, 1]), (3, [5, 2, 1]), (8, [3, 1, 1]),
                                         (33, [2, 1])])   # 33: past decode_block
@pytest.mark.parametrize("kv", [torch.float32, torch.float16])
def test_matches_reference(isa, act, bits, group, sym, bias, perm, batch, steps, kv):  # noqa: F811
    """Prefill, a later chunk and single-token decode: output and caches equal the reference within fp32
    rounding (the kernels' own tolerance; int8-activation calls: see below); the caches are written at
    the right positions only."""
    torch.manual_seed(0)
    w, meta = _weights(bits, group, sym, bias, perm)
    ln1, ln2 = torch.rand(H) + 0.5, torch.rand(H) + 0.5
    cos, sin = _tables(32)
    s = 16
    kc, vc = torch.zeros(batch, NKV, s, HD, dtype=kv), torch.zeros(batch, NKV, s, HD, dtype=kv)
    kr, vr = kc.clone(), vc.clone()
    # an fp16 cache: an element whose fp32 value differs from the reference's in the last bits may round
    # to the neighbouring fp16 value (1/1024 relative), and attention reads it back
    tol = {"rtol": 1e-4, "atol": 1e-5} if kv == torch.float32 else {"rtol": 2e-3, "atol": 2e-4}
    pos = 0
    for t in steps:
        x = torch.randn(batch, t, H)
        y = torch.ops.compressor.llama_layer(x, kc, vc, pos, cos, sin, ln1, ln2, w, meta, 1e-5, HD ** -0.5)
        assert y.shape == x.shape
        if batch_mode(batch * t):
            # Inside int8_activations, projections of 2-31 rows take int8 activations on AVX-512
            # (test_ops.expected). Against the same arithmetic in PyTorch they agree but for the odd
            # activation whose rounding flips (x / step within fp32 noise of .5: one step, ~1/254 of
            # its block); against fp32, within the int8 activations' error.
            fp32 = layer.reference(x, kr.clone(), vr.clone(), pos, cos, sin, ln1, ln2, w, meta, 1e-5, HD ** -0.5)
            ref = layer.reference(x, kr, vr, pos, cos, sin, ln1, ln2, w, meta, 1e-5, HD ** -0.5,
                                  linear=int8_activation_reference)
            assert rel_err(y, ref) <= 1e-3 and rel_err(kc.float(), kr.float()) <= 1e-3
            assert rel_err(vc.float(), vr.float()) <= 1e-3
            assert rel_err(y - x, fp32 - x) <= 3e-2          # measured 1.0-1.6e-2
        else:
            ref = layer.reference(x, kr, vr, pos, cos, sin, ln1, ln2, w, meta, 1e-5, HD ** -0.5)
            torch.testing.assert_close(y, ref, **tol)
            torch.testing.assert_close(kc, kr, **tol)    # the kernels: ~3e-6 of a block's largest
            torch.testing.assert_close(vc, vr, **tol)
        pos += t
    assert kc[:, :, pos:].abs().sum() == 0 and vc[:, :, pos:].abs().sum() == 0


@pytest.mark.skipif(extension is None, reason="the C++ extension is not built")
@pytest.mark.parametrize("nh,nkv,hd", [(2, 1, 64), (2, 2, 128), (4, 2, 80), (4, 1, 48)])   # 48: the portable loop
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("kv", [torch.float32, torch.float16])
def test_decode_attention_head_sizes(isa, act, nh, nkv, hd, batch, kv):  # noqa: F811
    """Decode attention (the kernel set's AttendFn) at the head sizes it has code for and one it has not,
    over 40 cached positions (two and a half vectors of scores), one query head per KV head or several."""
    torch.manual_seed(1)
    w, meta = _weights(nh=nh, nkv=nkv, hd=hd)
    ln = torch.rand(H) + 0.5
    cos, sin = _tables(48, hd)
    kc = torch.randn(batch, nkv, 48, hd).to(kv)      # fp16: the AttendF16Fn path, widened exactly
    vc = torch.randn(batch, nkv, 48, hd).to(kv)
    kr, vr = kc.clone(), vc.clone()
    x = torch.randn(batch, 1, H)
    y = torch.ops.compressor.llama_layer(x, kc, vc, 40, cos, sin, ln, ln, w, meta, 1e-5, hd ** -0.5)
    lin = int8_activation_reference if batch_mode(batch) else None
    ref = layer.reference(x, kr, vr, 40, cos, sin, ln, ln, w, meta, 1e-5, hd ** -0.5, linear=lin)
    assert rel_err(y - x, ref - x) <= (1e-3 if lin else 1e-5)
    assert torch.equal(kc[:, :, :40], kr[:, :, :40]) and rel_err(kc.float(), kr.float()) <= 1e-5


@pytest.mark.skipif(extension is None, reason="the C++ extension is not built")
def test_refuses_bad_shapes():
    w, meta = _weights()
    cos, sin = _tables(8)
    ln = torch.ones(H)
    kc = torch.zeros(1, NKV, 8, HD)
    x = torch.randn(1, 4, H)
    with pytest.raises(RuntimeError, match="do not fit the cache"):
        torch.ops.compressor.llama_layer(x, kc, kc.clone(), 6, cos, sin, ln, ln, w, meta, 1e-5, 0.1)
    with pytest.raises(RuntimeError, match="caches must be"):
        torch.ops.compressor.llama_layer(x, torch.zeros(1, NKV, 8, HD + 1), kc, 0, cos, sin, ln, ln, w, meta, 1e-5, 0.1)
    with pytest.raises(RuntimeError, match="both the same"):
        torch.ops.compressor.llama_layer(x, kc, kc.half(), 0, cos, sin, ln, ln, w, meta, 1e-5, 0.1)
    with pytest.raises(RuntimeError, match="projection widths"):
        torch.ops.compressor.llama_layer(x, kc, kc.clone(), 0, cos, sin, ln, ln, w, meta[:12] + [NH // 2, NKV, HD],
                                         1e-5, 0.1)


@pytest.mark.skipif(extension is None, reason="the C++ extension is not built")
@pytest.mark.parametrize("batch,steps", [(1, [6, 1, 1]), (4, [3, 1]), (33, [2, 1])])
def test_stack_equals_its_blocks(isa, act, batch, steps):  # noqa: F811
    """llama_stack over three blocks (one act-order, one with biases) gives bit for bit what llama_layer gives
    block after block (the same kernels; a decode step in one parallel region), caches included, and its
    reference is llama_layer's reference block after block."""
    torch.manual_seed(2)
    blocks = [_weights(), _weights(4, 32, True, True), _weights(perm=True)]
    norms = [torch.rand(H) + 0.5 for _ in range(6)]
    cos, sin = _tables(16)
    scales = [HD ** -0.5, 0.2, 0.1]
    kv = torch.float16 if batch > 1 else torch.float32
    caches = [[torch.zeros(batch, NKV, 12, HD, dtype=kv) for _ in range(2)] for _ in blocks]
    ref = [[c.clone() for c in pair] for pair in caches]
    pos = 0
    for t in steps:
        x = torch.randn(batch, t, H)
        y = torch.ops.compressor.llama_stack(x, [k for k, _ in caches], [v for _, v in caches], pos, cos, sin, norms,
                                             [t_ for w, _ in blocks for t_ in w], [i for _, m in blocks for i in m],
                                             1e-5, scales)
        want = x
        for i, ((w, meta), (kc, vc)) in enumerate(zip(blocks, ref)):
            want = torch.ops.compressor.llama_layer(want, kc, vc, pos, cos, sin, norms[2 * i], norms[2 * i + 1], w,
                                                    meta, 1e-5, scales[i])
        assert torch.equal(y, want)
        assert all(torch.equal(a, b) for pa, pb in zip(caches, ref) for a, b in zip(pa, pb))
        pos += t
    oracle = layer.stack_reference(x, [k.clone() for k, _ in ref], [v.clone() for _, v in ref], pos - t, cos, sin,
                                   norms, [t_ for w, _ in blocks for t_ in w], [i for _, m in blocks for i in m], 1e-5,
                                   scales, linear=int8_activation_reference if batch_mode(batch * t) else None)
    assert rel_err(y - x, oracle - x) <= 2e-2


@pytest.mark.skipif(extension is None, reason="the C++ extension is not built")
def test_stack_of_8_rows_equal_on_one_and_two_threads(isa, act):  # noqa: F811
    """A decode step of 8 rows on 2 threads runs in two row groups, one per thread where the weights fit the L3
    (DecodeStack, block.h; tests/runtime/test_engine.py checks the split itself): bit for bit what one thread
    gives, caches included."""
    torch.manual_seed(3)
    blocks = [_weights(), _weights(perm=True)]
    norms = [torch.rand(H) + 0.5 for _ in range(4)]
    cos, sin = _tables(8)
    x = torch.randn(8, 1, H)
    start = [torch.randn(8, NKV, 8, HD).half() for _ in range(4)]
    out = []
    threads = torch.get_num_threads()
    try:
        for n in (2, 1):
            torch.set_num_threads(n)
            caches = [c.clone() for c in start]
            y = torch.ops.compressor.llama_stack(x, caches[0::2], caches[1::2], 5, cos, sin, norms,
                                                 [t for w, _ in blocks for t in w], [i for _, m in blocks for i in m],
                                                 1e-5, [HD ** -0.5] * 2)
            out.append((y, caches))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0][0], out[1][0])
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))


@pytest.mark.skipif(extension is None, reason="the C++ extension is not built")
def test_stack_refuses_mismatched_lists():
    w, meta = _weights()
    cos, sin = _tables(8)
    kc = torch.zeros(1, NKV, 8, HD)
    with pytest.raises(RuntimeError, match="for 2 blocks"):
        torch.ops.compressor.llama_stack(torch.randn(1, 1, H), [kc, kc.clone()], [kc.clone()], 0, cos, sin,
                                         [torch.ones(H)] * 4, w + w, meta + meta, 1e-5, [0.1, 0.1])
