"""compressor/kernels/triton_gptq.py without a GPU: the kernel under TRITON_INTERPRET=1 against the reference
over awkward shapes, and ahead-of-time compiles for sm_80 / sm_90 checked with the bundled ptxas."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from gptq_layers import packed_layer

triton = pytest.importorskip("triton", reason="the Triton kernels need triton (pip install 'compressor[triton]')")

SMEM_SM80 = 163 * 1024            # the most shared memory one block may have on sm_80

# (bits, group, sym, act): 4-bit g32 asym, g64 sym, g64 / g128 act-order, 8-bit per channel
QUANT = [(4, 32, False, False), (4, 64, True, False), (4, 64, False, True), (4, 128, False, True),
         (8, -1, True, False), (8, -1, False, False)]


def _cases():
    """(rows, N, quant, config, bias): decode tiles at M in {1, 3, 16, 17}, prefill at {17, 70}."""
    dec = [(m, n, q, "decode", False) for m in (1, 3, 16, 17) for n in (192, 576, 1536, 97) for q in QUANT]
    pre = [(m, n, q, "prefill", False) for m in (17, 70) for n in (576, 97) for q in QUANT]
    extra = [(3, 192, QUANT[0], "decode", True), (70, 577, QUANT[2], "prefill", True),   # bias, N odd
             ((2, 5), 192, QUANT[1], None, False), ((4, 9), 576, QUANT[3], None, True)]  # leading shape, config=None
    return dec + pre + extra


def _id(case) -> str:
    m, n, (bits, group, sym, act), config, bias = case
    rows = "x".join(map(str, m)) if isinstance(m, tuple) else m
    return (f"{config or 'auto'}-m{rows}-n{n}-w{bits}g{group}{'-sym' if sym else ''}{'-act' if act else ''}"
            f"{'-bias' if bias else ''}")


def _check(m, n, quant, config, bias):
    """One case: triton_linear against `ops.reference` (and a plain fp32 matmul of the fp16-rounded weight)."""
    from compressor.kernels import ops
    from compressor.kernels.triton_gptq import triton_linear
    bits, group, sym, act = quant
    k = 640 if group == 128 else 576
    lead = m if isinstance(m, tuple) else (m,)
    packed, w = packed_layer(n, k, bits, group, sym, act, seed=sum(lead) * 7 + n)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(*lead, k, generator=g).half()
    b = torch.randn(n, generator=g).half() if bias else None
    y = triton_linear(x, packed, b, config=config)
    assert y.shape == (*lead, n) and y.dtype == torch.float16
    want = x.float() @ w.half().float().t() + (0 if b is None else b.float())     # fp32 sums, weight in fp16
    tol = 2e-3 * want.abs().max().item()
    torch.testing.assert_close(y.float(), want, rtol=2e-3, atol=tol)
    ref = ops.reference(x.float(), *packed.args(None if b is None else b.float()), bits=bits)
    torch.testing.assert_close(y.float(), ref, rtol=2e-3, atol=tol)
    if not isinstance(m, tuple) and m == 3 and n == 192:          # the per-call selector reaches the same kernel
        assert torch.equal(packed(x, b, backend="triton"), triton_linear(x, packed, b))


@pytest.fixture(scope="module")
def interpreted():
    """Every case run once by this file as a script under TRITON_INTERPRET=1 (the kernel on the CPU, numpy,
    one program at a time): triton picks the interpreter when the kernel is decorated, so it gets a process
    of its own. Case id -> "ok" or the failure."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=1200,
                       cwd=os.path.dirname(__file__))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", _cases(), ids=_id)
def test_kernel_in_the_interpreter_matches_the_reference(interpreted, case):
    """K = 576 (640 for g128), N in {192, 576, 1536, 97, 577}, every group kind, sym and asym, act-order,
    bias, leading dims; fp16 (the interpreter has no bf16)."""
    assert interpreted[_id(case)] == "ok"


def test_interpreter_catches_a_wrong_kernel(interpreted):
    """The oracle is not vacuous: the script also runs the kernel with the wrong zero point, which must fail."""
    assert interpreted["negative"].startswith("AssertionError"), interpreted["negative"]


def test_bad_arguments_are_named():
    from compressor.kernels.triton_gptq import compile_for, triton_linear
    packed, _ = packed_layer(64, 128, 4, 64, False, False, 0)
    with pytest.raises(ValueError, match="K=64"):
        triton_linear(torch.zeros(1, 64).half(), packed)
    with pytest.raises(ValueError, match="config='big'"):
        triton_linear(torch.zeros(1, 128).half(), packed, config="big")
    with pytest.raises(ValueError, match="torch.float32"):
        triton_linear(torch.zeros(1, 128), packed)
    with pytest.raises(ValueError, match=r"bias \(3,\)"):
        triton_linear(torch.zeros(1, 128).half(), packed, torch.zeros(3).half())
    with pytest.raises(ValueError, match="dtype='fp8'"):
        compile_for(80, "decode", 4, True, "fp8")


def test_choose_config():
    from compressor.kernels.triton_gptq import choose_config
    assert [choose_config(m) for m in (1, 16, 17, 512)] == ["decode", "decode", "prefill", "prefill"]


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("config", ["decode", "prefill"])
@pytest.mark.parametrize("bits,sym,dtype", [(4, False, "fp16"), (4, True, "bf16"), (8, True, "fp16")])
def test_aot_compile_has_no_spills(arch, config, bits, sym, dtype, tmp_path):
    from compressor.kernels.triton_gptq import compile_for
    k = compile_for(arch, config, bits, sym, dtype, bias=not sym)
    ptx = k.asm["ptx"]
    assert "mma" in ptx                                   # tl.dot became tensor-core code
    if arch == 80:
        assert "cp.async" in ptx                          # the pipelined loads
    assert k.metadata.shared <= SMEM_SM80
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(arch).path                          # the ptxas triton itself uses for this target
    (tmp_path / "k.ptx").write_text(ptx)
    r = subprocess.run([str(ptxas), f"-arch=sm_{arch}{'a' if arch == 90 else ''}", "-v", str(tmp_path / "k.ptx"),
                        "-o", str(tmp_path / "k.cubin")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    assert spills and all(s == ("0", "0") for s in spills), r.stderr


def _negative():
    """The decode kernel fed zeros off by one: the same comparison must raise."""
    import dataclasses
    packed, w = packed_layer(192, 576, 4, 32, False, False, seed=1)
    from compressor.kernels.triton_gptq import triton_linear
    bad = dataclasses.replace(packed, zeros=packed.zeros + 1)
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(2)).half()
    want = x.float() @ w.half().float().t()
    torch.testing.assert_close(triton_linear(x, bad).float(), want, rtol=2e-3, atol=2e-3 * want.abs().max().item())


if __name__ == "__main__":          # the interpreter run of `interpreted`: one JSON line of results
    results = {}
    for name, fn in [(_id(c), lambda c=c: _check(*c)) for c in _cases()] + [("negative", _negative)]:
        try:
            fn()
            results[name] = "ok"
        except Exception as e:       # noqa: BLE001  (reported per case, asserted by the test)
            results[name] = f"{type(e).__name__}: {str(e)[:300]}"
    print(json.dumps(results))
