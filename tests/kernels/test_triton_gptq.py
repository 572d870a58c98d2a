"""compressor/kernels/triton_gptq.py without a GPU: the kernel under TRITON_INTERPRET=1 against the reference
over awkward shapes, and ahead-of-time compiles for sm_80 / sm_90 checked with the bundled ptxas."""
from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch

from gptq_layers import gptq_layer

triton = pytest.importorskip("triton", reason="the Triton kernels need triton (pip install triton)")

SMEM_SM80 = 163 * 1024            # the most shared memory one block may have on sm_80


def _cases():
    dec = [(m, n, q, "decode") for m in (1, 3, 16, 17) for n in (192, 576, 1536) for q in QUANT]
    return dec + [(m, 576, q, "prefill") for m in (17, 70) for q in QUANT]


@pytest.fixture(scope="module")
def interpreted():
    """Every case run once by this file as a script under TRITON_INTERPRET=1 (the kernel on the CPU, numpy,
    one program at a time): triton picks the interpreter when the kernel is decorated, so it gets a process
    of its own. Case id -> "ok" or the failure."""
    import json
    import sys
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_DEFAULT_FP_FUSION": "1"}
    r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


QUANT = [(4, 32, False, False), (4, 64, True, False), (4, 128, False, True), (4, 64, False, True),
         (8, -1, True, False)]


def _id(case) -> str:
    m, n, (bits, group, sym, act), config = case
    return f"{config}-m{m}-n{n}-w{bits}g{group}{'-sym' if sym else ''}{'-act' if act else ''}"


def _check(m, n, quant, config):
    from compressor.kernels.triton_gptq import gptq_matmul
    bits, group, sym, act = quant
    k = 640 if group == 128 else 576
    t, w = gptq_layer(n, k, bits, group, sym, act, seed=m * 7 + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n)).half()
    y = gptq_matmul(x, t["qweight"], t["qzeros"], t["scales"], t["g_idx"] if act else None, group, bits, config)
    want = x.float() @ w.half().float().t()          # the reference: weight rounded to fp16, fp32 sums
    torch.testing.assert_close(y.float(), want, rtol=2e-3, atol=2e-3 * want.abs().max().item())


@pytest.mark.parametrize("case", _cases(), ids=_id)
def test_kernel_in_the_interpreter_matches_the_reference(interpreted, case):
    """M in {1, 3, 16, 17} (decode tiles) and {17, 70} (prefill), K = 576 (640 for g128), N in {192, 576,
    1536}, 4-bit g32 / g64 sym / g128 act-order / g64 act-order, 8-bit per channel."""
    assert interpreted[_id(case)] == "ok"


def test_bad_arguments_are_named():
    from compressor.kernels.triton_gptq import gptq_matmul
    x = torch.zeros(1, 64).half()
    t, _ = gptq_layer(64, 128, 4, 64, False, False, 0)
    with pytest.raises(ValueError, match="K=64"):
        gptq_matmul(x, t["qweight"], t["qzeros"], t["scales"], None, 64, 4)
    with pytest.raises(ValueError, match="config='big'"):
        gptq_matmul(x, t["qweight"], t["qzeros"], t["scales"], None, 64, 4, "big")


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("config", ["decode", "prefill"])
@pytest.mark.parametrize("act", [False, True])
def test_aot_compile_has_no_spills(arch, config, act, tmp_path):
    from compressor.kernels.triton_gptq import compile_for
    k = compile_for(arch, config, 4, act)
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


if __name__ == "__main__":          # the interpreter run of `interpreted`: one JSON line of results
    import json
    results = {}
    for case in _cases():
        try:
            _check(*case)
            results[_id(case)] = "ok"
        except Exception as e:       # noqa: BLE001  (reported per case, asserted by the test)
            results[_id(case)] = f"{type(e).__name__}: {str(e)[:300]}"
    print(json.dumps(results))
