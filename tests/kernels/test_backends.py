"""compressor/kernels/dispatch.py: the backend of a call, by argument, by scope and by environment, and which
kernel the ops register for CUDA tensors when the CUDA extension is not built."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from compressor import kernels
from compressor.kernels import current_backend, unavailable, use_backend
from gptq_layers import packed_layer


def test_backend_by_call_and_by_scope():
    p, w = packed_layer(99, 576, 4, 64, False, True, seed=0)
    x = torch.randn(3, 576)
    ref = p(x, backend="reference")
    assert torch.equal(ref, kernels.reference(x, *p.args(), bits=4))
    torch.testing.assert_close(p(x), ref, rtol=1e-5, atol=1e-5)         # auto: the CPU kernels
    assert current_backend() == "auto"
    with use_backend("reference"):
        assert current_backend() == "reference" and torch.equal(p(x), ref)
        with use_backend("auto"):
            assert current_backend() == "auto"
    assert current_backend() == "auto"


def test_quant_linear_follows_the_scope():
    from compressor.nn import QuantLinear
    from compressor.quant.primitives import choose_qparams, quantize
    w = torch.randn(64, 128)
    s, z = choose_qparams(w, 4, 64, False)
    m = QuantLinear.from_codes(quantize(w, s, z, 4, 64), s, z, 4, 64)
    x = torch.randn(2, 128)
    with torch.no_grad(), use_backend("reference"):
        assert torch.equal(m(x), kernels.reference(x, *m.packed().args(), bits=4))


def test_bad_and_unavailable_backends_are_named(monkeypatch):
    p, _ = packed_layer(64, 576, 4, 64, True, False, seed=0)
    x = torch.randn(1, 576)
    with pytest.raises(ValueError, match="backend='cdua': choose one of auto, cuda, triton, reference"):
        p(x, backend="cdua")
    with pytest.raises(ValueError, match="backend='cuda' cannot run here: the CUDA kernels run on CUDA tensors, not cpu"):
        p(x, backend="cuda")
    assert "CUDA extension is not loaded" in unavailable("cuda", "cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "not cpu" in unavailable("triton", "cpu") or "not installed" in unavailable("triton", "cpu")
    monkeypatch.setenv("COMPRESSOR_BACKEND", "reference")
    assert current_backend() == "reference"
    monkeypatch.setenv("COMPRESSOR_BACKEND", "fast")
    with pytest.raises(ValueError, match="backend='fast'"):
        current_backend()


def test_pack_for_cuda_is_the_tile_layout():
    q = torch.randint(0, 16, (99, 576))
    s, z = torch.rand(99, 9) + 0.1, torch.randint(0, 16, (99, 9)).float()
    g_idx = (torch.randperm(576) // 64).to(torch.int32)
    a, b = kernels.pack_for("cpu", q, s, z, 4, 64, g_idx), kernels.LAYOUTS["cuda"](q, s, z, 4, 64, g_idx)
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("qweight", "scales", "zeros", "perm"))
    assert kernels.pack_for("cuda", torch.randint(0, 16, (32, 36)), s[:32, :1], z[:32, :1], 4, -1) is None  # K % 8


def test_cuda_tensors_get_the_triton_kernels_without_the_extension():
    """As on a GPU machine with a CUDA torch and triton but no compressor._C_cuda: the ops' CUDA kernel is the
    Triton one (run in a fresh process that pretends torch has CUDA)."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        torch.version.cuda = "13.0"
        from compressor.kernels import ops
        assert ops.cuda_extension is None, ops.cuda_extension
        assert "Triton" in ops.cuda_extension_source, ops.cuda_extension_source
        for op in ("int4_linear", "int8_linear"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"compressor::{op}", "CUDA"), op
        print("ok")
    """)
    env = {**os.environ, "COMPRESSOR_NO_EXT": "0"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_reference_stays_on_the_weights_device():
    """The oracle builds nothing on the CPU behind the caller's back: on meta tensors (as on CUDA ones) it
    runs and returns a tensor of that device and shape."""
    p, _ = packed_layer(99, 576, 4, 64, False, True, seed=0)
    m = p.to("meta")
    y = m(torch.empty(2, 3, 576, device="meta"), backend="reference")
    assert y.device.type == "meta" and y.shape == (2, 3, 99)
