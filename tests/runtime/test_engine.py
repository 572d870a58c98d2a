"""The engine library (csrc/engine/engine.cpp) on every kernel set this CPU has, against compressor.load's
fast path on the same set: prefill, decode steps and the head."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import compressor
from compressor.kernels import extension
from compressor.runtime import Runtime
from compressor.runtime.engine import library

pytestmark = pytest.mark.skipif(extension is None, reason="compressor.load's side of the comparison needs the kernels")


def _isas() -> list[str]:
    lib, out = library(), []
    for name in ("avx512", "avx2", "scalar"):
        if lib.cmp_set_isa(name.encode()) == 0:
            out.append(name)
    lib.cmp_set_isa(b"auto")
    return out


@pytest.fixture(params=_isas())
def isa(request):
    lib = library()
    assert lib.cmp_set_isa(request.param.encode()) == 0
    extension._set_isa(request.param)
    yield request.param
    lib.cmp_set_isa(b"auto")
    extension._set_isa("auto")


@pytest.fixture(scope="module")
def int8_head(tmp_path_factory):
    from compressor.testing import make_tiny_llama
    tmp = tmp_path_factory.mktemp("eng")
    out = tmp / "ckpt"
    compressor.compress(str(make_tiny_llama(tmp / "src", vocab=300)), "rtn-w4g64", out, progress=False)
    return out


def test_every_kernel_set_matches_compressor_load(int8_head, isa):
    rt, m = Runtime(int8_head), compressor.load(int8_head)
    dec = m.generate.fast
    ids = torch.randint(3, 290, (2, 40), generator=torch.Generator().manual_seed(0))   # a prompt of GEMM rows
    for batch in (1, 2):
        x = ids[:batch]
        rt.engine.reserve(batch, 44, batch > 1)
        caches = dec.caches(batch, 44)
        pairs = [(rt.engine.forward(x.numpy(), 0, False), dec.forward(x, 0, caches))]
        for pos in range(40, 44):                                           # decode steps after it
            tok = x[:, pos - 40:pos - 39]
            pairs.append((rt.engine.forward(tok.numpy(), pos, batch > 1), dec.forward(tok, pos, caches)))
        for got, want in pairs:
            want = want.numpy()
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), isa


def test_batch_rows_split_by_thread_equal_one_shared_step(int8_head):
    """A decode step of 8 rows on 2 threads runs as two groups of 4 rows, one per thread, each with blocks of its
    own (DecodeStack, csrc/cpu/block.h): its logits are bit for bit those of one thread running all 8 rows, and
    4 rows (2 per thread) stay in one group."""
    two, one = Runtime(int8_head, threads=2), Runtime(int8_head, threads=1)
    if two.engine.decode_groups(8) != 2:
        pytest.skip("the C library does not know this CPU's L3 size, or it is under twice the tiny model's weights")
    assert one.engine.decode_groups(8) == 1 and two.engine.decode_groups(4) == 1
    ids = torch.randint(3, 290, (8, 12), generator=torch.Generator().manual_seed(1)).numpy()
    for rt in (two, one):
        rt.engine.reserve(8, 16, True)
    assert np.array_equal(two.engine.forward(ids, 0, False), one.engine.forward(ids, 0, False))
    for pos in range(12, 16):
        tok = ids[:, pos - 12:pos - 11]
        assert np.array_equal(two.engine.forward(tok, pos, True), one.engine.forward(tok, pos, True)), pos


def test_isa_names_and_refusal():
    lib = library()
    assert lib.cmp_isa().decode() in ("avx512", "avx2", "scalar")
    assert lib.cmp_set_isa(b"sse9") == -1 and b"unknown" in lib.cmp_error()
