"""Triton dequant-matmul on the GPTQ checkpoint layout: one kernel, a decode and a prefill configuration.

    y = gptq_matmul(x, qweight, qzeros, scales, g_idx, group, bits, config="decode")   # or "prefill"

Each program computes a (BLOCK_M, BLOCK_N) tile of ``x @ W.T``. It walks K in BLOCK_K steps:
  * it loads the x tile;
  * it loads the int32 qweight words of those k (``k // (32 / bits)``, one word serves 32 / bits rows,
    from the cache);
  * it shifts each code out, looks up each k's group (``g_idx`` for act-order, ``k // group`` otherwise),
    and dequantizes ``(q - zero) * scale`` in fp32, rounded to fp16 as the reference rounds it;
  * it calls ``tl.dot`` (mma on sm_80, fp32 accumulation).
`DECODE` and `PREFILL` differ in tile shapes and stages only. ``triton`` is an optional dependency; under
``TRITON_INTERPRET=1`` the kernel runs on the CPU (tests/kernels/test_triton_gptq.py), and `compile_for`
compiles it ahead of time for a CUDA target without a GPU.
Layout: x (M, K) fp16; qweight (K*bits/32, N) int32; qzeros (G, N*bits/32) int32 holding zero - 1;
scales (G, N) fp16; g_idx (K,) int32; y (M, N) fp16.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["CONFIGS", "gptq_matmul", "compile_for"]

CONFIGS = {
    "decode": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2},
    "prefill": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3},
}


@triton.jit
def _gptq_matmul(x_ptr, qw_ptr, qz_ptr, s_ptr, g_ptr, y_ptr, M, N, K, group,
                 BITS: tl.constexpr, ACT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    zshift = (offs_n % PER) * BITS
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wk = k_ok[:, None] & n_ok[None, :]
        words = tl.load(qw_ptr + (offs_k[:, None] // PER) * N + offs_n[None, :], mask=wk, other=0)
        q = (words >> ((offs_k[:, None] % PER) * BITS)) & MASK                  # (BLOCK_K, BLOCK_N)
        if ACT:
            g = tl.load(g_ptr + offs_k, mask=k_ok, other=0)
        else:
            g = offs_k // group
        s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=wk, other=0.0).to(tl.float32)
        zw = tl.load(qz_ptr + g[:, None] * (N // PER) + (offs_n // PER)[None, :], mask=wk, other=0)
        z = ((zw >> zshift[None, :]) & MASK) + 1
        w = ((q - z).to(tl.float32) * s).to(tl.float16)
        acc = tl.dot(x, w, acc)
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(tl.float16), mask=m_ok[:, None] & n_ok[None, :])


def gptq_matmul(x, qweight, qzeros, scales, g_idx, group: int, bits: int, config: str = "decode"):
    """(M, K) fp16 x the GPTQ layer -> (M, N) fp16, with the `CONFIGS` tiles (see the module docstring)."""
    import torch
    if config not in CONFIGS:
        raise ValueError(f"config={config!r}: choose one of {sorted(CONFIGS)}")
    if bits not in (4, 8):
        raise ValueError(f"bits={bits}: the Triton kernel has 4- and 8-bit paths")
    m, k = x.shape
    n = qweight.shape[1]
    if qweight.shape[0] * (32 // bits) != k:
        raise ValueError(f"x has K={k}, the {bits}-bit qweight {tuple(qweight.shape)} holds {qweight.shape[0] * 32 // bits}")
    c = CONFIGS[config]
    act = g_idx is not None
    y = torch.empty(m, n, dtype=torch.float16, device=x.device)
    grid = (triton.cdiv(n, c["BLOCK_N"]), triton.cdiv(m, c["BLOCK_M"]))
    # without act-order the kernel never reads g_ptr (ACT is a constexpr); any tensor fills the slot
    _gptq_matmul[grid](x, qweight, qzeros, scales, g_idx if act else qweight, y, m, n, k,
                       k if group == -1 else group, BITS=bits, ACT=act, BLOCK_M=c["BLOCK_M"],
                       BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], num_warps=c["num_warps"],
                       num_stages=c["num_stages"])
    return y


def compile_for(arch: int, config: str, bits: int, act: bool):
    """Ahead-of-time compile for CUDA compute capability `arch` (80, 90) without a GPU: the CompiledKernel
    (its ``asm["ptx"]`` and ``metadata.shared``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    c = CONFIGS[config]
    sig = {"x_ptr": "*fp16", "qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": "*fp16", "g_ptr": "*i32",
           "y_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32", "group": "i32",
           "BITS": "constexpr", "ACT": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
           "BLOCK_K": "constexpr"}
    consts = {"BITS": bits, "ACT": act, "BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"], "BLOCK_K": c["BLOCK_K"]}
    src = ASTSource(fn=_gptq_matmul, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": c["num_warps"], "num_stages": c["num_stages"]})
