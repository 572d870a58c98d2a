"""cuda/ and compressor/kernels/cuda_plan.py without a GPU:
* cuda/dq_gemm.cu compiles for sm_80 and sm_90 with torch's nvcc flags, 0 spills, bounded registers, and the
  PTX has the tensor-core mma, lop3 and prmt the design relies on;
* cuda/ops.cu (the torch binding) compiles against this torch's headers;
* cuda/plan.h, compiled with g++, gives the launch plan of cuda_plan.plan over many shapes;
* the emulation of the kernel's arithmetic: its dequantized tiles equal the reference's weight bit for bit,
  and its output matches the dequantize-then-matmul reference; a wrong slot order is caught."""
from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from compressor.kernels import cuda_plan
from compressor.kernels.cuda_plan import dequantized, emulate, plan
from compressor.kernels.ops import reference, unpack_weight
from gptq_layers import packed_layer

CUDA = Path(__file__).resolve().parents[2] / "cuda"
KERNELS = 2 * 2 * 2            # dtype x bits x tile config (decode, prefill)
MAX_REGISTERS = {"16": 128, "64": 255}   # decode: 4 blocks of 128 threads per SM; prefill: no spills at 255


def _nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA toolkit): the compile checks need it")
    return nvcc


def _torch_nvcc_flags():
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    return list(COMMON_NVCC_FLAGS)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_dq_gemm_compiles_without_spills(arch, tmp_path):
    nvcc = _nvcc()
    cmd = [nvcc, "-std=c++17", *_torch_nvcc_flags(), f"-arch={arch}", str(CUDA / "dq_gemm.cu")]
    r = subprocess.run(cmd + ["-cubin", "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    entries = re.findall(r"Compiling entry function '(\w+)'", r.stderr)
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", r.stderr)]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    gemm = [e for e in entries if "dq_gemm" in e]
    assert len(gemm) == len(entries) == len(regs) == len(spills) == KERNELS
    assert all(s == ("0", "0") for s in spills), spills
    for entry, n in zip(entries, regs):
        bm = re.search(r"dq_gemmI.*?Li[48]ELi(\d+)E", entry)
        assert n <= MAX_REGISTERS[bm.group(1)], (entry, n)
    r = subprocess.run(cmd + ["-ptx", "-o", str(tmp_path / "k.ptx")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ptx = (tmp_path / "k.ptx").read_text()
    assert re.search(r"\bwmma\.mma\.sync|\bmma\.sync", ptx) and "lop3.b32" in ptx and "prmt.b32" in ptx


def test_binding_compiles_against_torch_headers(tmp_path):
    """cuda/ops.cu, as setup.py's CUDAExtension builds it. A CPU build of torch ships the c10/cuda headers
    but not the one its CMake generates (cuda_cmake_macros.h): the test writes that one-line header."""
    from torch.utils.cpp_extension import include_paths
    nvcc = _nvcc()
    inc = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    macros = Path(include_paths()[0]) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not macros.is_file():
        stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        inc.insert(0, f"-I{tmp_path / 'stub'}")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    r = subprocess.run([nvcc, "-std=c++20", *_torch_nvcc_flags(), "-c", "-arch=sm_80", *inc,
                        "-DTORCH_EXTENSION_NAME=_C_cuda", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
                        "-o", str(tmp_path / "ops.o"), str(CUDA / "ops.cu")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    nm = shutil.which("nm")
    if nm:
        syms = subprocess.run([nm, str(tmp_path / "ops.o")], capture_output=True, text=True).stdout
        assert "PyInit__C_cuda" in syms and "launch_dq_gemm" in syms


@pytest.fixture(scope="module")
def cpp_plan(tmp_path_factory):
    """cuda/plan.h's make_plan, compiled with g++ and called through ctypes."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    d = tmp_path_factory.mktemp("plan")
    (d / "plan.cpp").write_text('#include "plan.h"\nextern "C" void plan(int m, int k, int n, int sms, int* o) {\n'
                                "  const compressor::Plan p = compressor::make_plan(m, k, n, sms);\n"
                                "  o[0] = p.bm; o[1] = p.grid_x; o[2] = p.grid_y; o[3] = p.splits;"
                                " o[4] = p.steps_per_split;\n}\n")
    subprocess.run([cxx, "-std=c++17", "-O1", "-shared", "-fPIC", f"-I{CUDA}", "-o", str(d / "plan.so"),
                    str(d / "plan.cpp")], check=True, timeout=120)
    lib = ctypes.CDLL(str(d / "plan.so"))

    def run(m, k, n, sms):
        out = (ctypes.c_int * 5)()
        lib.plan(m, k, n, sms, out)
        return tuple(out)
    return run


def test_plan_h_is_the_python_plan(cpp_plan):
    g = torch.Generator().manual_seed(0)
    shapes = [(m, k, n, sms) for m in (1, 3, 16, 17, 64, 256, 1000) for k, n in
              ((576, 192), (576, 1536), (4096, 4096), (4096, 11008), (11008, 4096), (640, 99), (8, 1))
              for sms in (1, 46, 108, 132)]
    shapes += [tuple(int(v) for v in torch.randint(1, 20000, (3,), generator=g)) + (int(torch.randint(1, 200, (1,), generator=g)),)
               for _ in range(300)]
    for m, k, n, sms in shapes:
        p = plan(m, k, n, sms)
        assert cpp_plan(m, k, n, sms) == (p.bm, p.grid_x, p.grid_y, p.splits, p.steps_per_split), (m, k, n, sms)
        assert p.grid_x * 128 >= n and p.grid_y * p.bm >= m
        assert (p.splits - 1) * p.steps_per_split * 64 < k <= p.splits * p.steps_per_split * 64


def test_plan_tiles():
    assert plan(1, 4096, 4096) == cuda_plan.Plan(16, 32, 1, 13, 5)       # 416 blocks for 108 SMs
    assert plan(17, 576, 576).bm == 64 and plan(16, 576, 576).bm == 16
    assert plan(256, 4096, 11008, sms=108).splits == 1                 # 86 x 4 blocks fill the GPU
    assert plan(1, 576, 99).grid_x == 1
    with pytest.raises(ValueError, match="M=0"):
        plan(0, 576, 576)


CASES = [(4, 32, False, False), (4, 64, True, False), (4, 64, False, True), (4, 128, False, True),
         (4, 128, True, False), (8, -1, True, False), (8, -1, False, True)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,group,sym,act", CASES)
def test_dequantized_tiles_equal_the_reference_weight(bits, group, sym, act, dtype):
    """The magic-number dequantization and the slot order, bit for bit: the kernel's shared tiles, put back in
    k order, are the reference's weight rounded to x's dtype."""
    k = 640 if group == 128 else 576
    p, _ = packed_layer(99, k, bits, group, sym, act, seed=bits + k)
    want = unpack_weight(p.qweight, p.scales, p.zeros, bits, p.group_size, p.out_features).to(dtype)
    assert torch.equal(dequantized(p, dtype), want)


@pytest.mark.parametrize("m", [1, 3, 16, 17, 70])
@pytest.mark.parametrize("n", [192, 576, 1536, 99])
@pytest.mark.parametrize("bits,group,sym,act", CASES)
def test_emulation_matches_reference(m, n, bits, group, sym, act):
    k = 640 if group == 128 else 576
    p, w = packed_layer(n, k, bits, group, sym, act, seed=m + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n)).half()
    bias = torch.randn(n, generator=torch.Generator().manual_seed(m)) if m == 3 else None
    got = emulate(x, p, bias)
    want = reference(x.float(), *p.args(None if bias is None else bias.float()), bits=bits)
    assert torch.allclose((x.double() @ w.double().t()).float() + (0 if bias is None else bias), want, atol=1e-4)
    scale = want.abs().max().item()
    torch.testing.assert_close(got.float(), want, rtol=1e-3, atol=1e-3 * scale)
    if m == 16:   # bf16 once per shape
        got = emulate(x.bfloat16(), p, bias)
        torch.testing.assert_close(got.float(), want, rtol=8e-3, atol=8e-3 * scale)


def test_emulation_catches_a_wrong_slot_order(monkeypatch):
    """The check can fail: x in one order and the weights in another give a different product."""
    p, w = packed_layer(192, 576, 4, 64, False, False, seed=1)
    x = torch.randn(4, 576).half()
    good = emulate(x, p)
    monkeypatch.setattr(cuda_plan, "_a_tiles", lambda x, bits: x)        # x not reordered into slots
    bad = emulate(x, p)
    err = (bad.float() - good.float()).abs().max() / good.float().abs().max()
    assert err > 0.1


def test_emulation_refuses_what_the_kernel_cannot_take():
    p, _ = packed_layer(64, 576, 4, 64, True, False, seed=0)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        emulate(torch.randn(1, 576), p)
