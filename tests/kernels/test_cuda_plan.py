"""compressor/kernels/cuda_plan.py and cuda/gptq_gemv.cu without a GPU: the .cu compiles for sm_80 and
sm_90 with no spills and a bounded register count; the launch plan; the emulation of the kernel's
arithmetic against the dequantize-then-matmul reference."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from compressor.kernels.cuda_plan import K_CHUNK, emulate, plan
from gptq_layers import gptq_layer

CU = Path(__file__).resolve().parents[2] / "cuda" / "gptq_gemv.cu"
MAX_REGISTERS = 168          # 3 blocks of 128 threads per SM on sm_80/sm_90 (65536 registers)
KERNELS = 2 * 2 * 5 * 2      # dtype x bits x row tiles x act-order


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cu_compiles_without_spills(arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA toolkit): the compile check needs it")
    r = subprocess.run([nvcc, "-std=c++17", "-cubin", f"-arch={arch}", "-Xptxas", "-v", "-o",
                        str(tmp_path / "k.cubin"), str(CU)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    entries = re.findall(r"Compiling entry function '(\w+)'", r.stderr)
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", r.stderr)]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    gemv = [e for e in entries if "gptq_gemv" in e]
    assert len(gemv) == KERNELS and len(regs) == len(entries)
    assert all(s == ("0", "0") for s in spills), spills
    worst = max(zip(regs, entries))
    assert worst[0] <= MAX_REGISTERS, worst


def test_plan_tiles_rows_and_splits_k():
    p = plan(3, 576, 1536, 4, 64, False)
    assert [(ln.rows, ln.row0) for ln in p] == [(2, 0), (1, 2)]
    assert p[0].grid == (3, -(-576 // K_CHUNK))
    assert [ln.rows for ln in plan(16, 4096, 4096, 4, 128, False)] == [16]
    assert plan(16, 4096, 4096, 4, 128, False)[0].grid == (8, 32)          # 256 blocks for 108 SMs
    with pytest.raises(ValueError, match="M=17"):
        plan(17, 576, 576, 4, 64, False)
    with pytest.raises(ValueError, match="K=576 is not a multiple of the group size 128"):
        plan(1, 576, 576, 4, 128, False)
    with pytest.raises(ValueError, match="multiples of 8"):
        plan(1, 576, 196, 4, 64, False)


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("n", [192, 576, 1536])
@pytest.mark.parametrize("bits,group,sym,act", [(4, 32, False, False), (4, 64, True, False), (4, 128, False, True),
                                                (4, 64, False, True), (8, -1, True, False)])
def test_emulation_matches_reference(m, n, bits, group, sym, act):
    k = 576 if group in (-1, 32, 64) else 640
    t, w = gptq_layer(n, k, bits, group, sym, act, seed=m + n)
    g_idx = t["g_idx"]
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n)).half()
    got = emulate(x, t["qweight"], t["qzeros"], t["scales"], g_idx if act else None, group, bits)
    want = (x.double() @ w.double().t())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    torch.testing.assert_close(got.half(), want.half(), rtol=1e-3, atol=1e-3 * want.abs().max().item())
