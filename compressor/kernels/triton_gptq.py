"""Triton dequant-matmul on the kernels' tile layout: one kernel, a decode and a prefill configuration.

    y = triton_linear(x, packed, bias)                      # packed: a `compressor.kernels.PackedWeight`
    y = triton_linear(x, packed, bias, config="prefill")    # or "decode"; None picks by row count

It computes what `compressor.kernels.ops.reference` computes (dequantize in fp32, round to x's dtype,
``F.linear``), reading the same tile layout as the CPU kernels (`compressor.kernels.ops` has it in full;
`compressor.kernels.repack.pack` builds it). With K = in_features, N = out_features, P = 32 / bits, T = 32,
Nt = ceil(N / T) and G = K / group (1 per channel):

* ``x``: float16 or bfloat16 ``(..., K)``, any leading shape; ``y`` has x's dtype and shape ``(..., N)``.
* ``qweight``: int32 ``(Nt, K / P, T)``; word ``[t, w, c]`` holds the codes of input channels
  ``P*w .. P*w+P-1`` of output column ``T*t + c``, code ``j`` in bits ``[bits*j, bits*(j+1))``.
* ``scales``: float16 ``(Nt, G, T)``; ``zeros``: float16 ``(Nt, G, T)`` holding integers, or None for a
  symmetric grid (zero ``2**(bits-1)``, the constexpr ``SYM``: the kernel loads no zeros).
* ``perm``: int64 ``(K,)`` or None. Act-order layers were sorted by group at pack time, so the wrapper
  gathers ``x[..., perm]`` and the kernel only ever sees contiguous groups: the group of channel k is
  ``k // group``, and no ``g_idx`` is read.
* ``bias``: ``(N,)`` or None, added in fp32 to the accumulator before the one rounding to x's dtype.

Each program computes a (BLOCK_M, BLOCK_N) tile of ``x @ W.T``. BLOCK_N is a multiple of T, so column n
lives at tile ``n // 32``, lane ``n % 32``, and a row of BLOCK_N words is BLOCK_N / 32 runs of 128
contiguous bytes: coalesced. Per BLOCK_K step the program
  * loads the x tile (rows past M repeat row M - 1 and are never stored, so the load needs no row mask);
  * loads BLOCK_K / P words per column once, and shifts the P codes out of each in registers (one
    (BLOCK_K / P, P, BLOCK_N) array, reshaped in k order), rather than loading each word P times;
  * loads scale (and zero) of each k's group, and dequantizes ``(q - zero) * scale`` in fp32, rounded to
    x's dtype as the reference rounds it;
  * calls ``tl.dot`` (tensor-core ``mma`` on sm_80 / sm_90, fp32 accumulation).
Columns past N read column N - 1 (in bounds whatever the padding) and are masked at the store; k past K
(K need not be a multiple of BLOCK_K) load x = 0 and a zero scale, so they add nothing.

`CONFIGS`: ``decode`` (16 x 64 x 64, 2 stages) for M <= 16 rows, where the weight stream dominates and a
deep K step keeps more loads in flight; ``prefill`` (64 x 64 x 32, 3 stages) for larger M. They differ in
tile shape and stages only. The decode grid has only ceil(N / 64) programs (no split-K).

``triton`` is an optional dependency. Under ``TRITON_INTERPRET=1`` the kernel runs on the CPU, one program
at a time in numpy (tests/kernels/test_triton_gptq.py; the interpreter has no bf16, so only fp16 runs there).
`compile_for` compiles it ahead of time for a CUDA target without a GPU (the PTX and the shared memory it
needs), which the tests check with ptxas.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ops import TILE_N

__all__ = ["CONFIGS", "DTYPES", "choose_config", "triton_linear", "compile_for"]

CONFIGS = {
    "decode": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2},
    "prefill": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3},
}
DECODE_ROWS = 16                                  # config=None: "decode" up to this many rows of x
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@triton.jit
def _dequant_matmul(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, group,
                    BITS: tl.constexpr, SYM: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    T: tl.constexpr = 32                          # TILE_N: output columns per tile
    PER: tl.constexpr = 32 // BITS                # codes per int32 word
    WK: tl.constexpr = BLOCK_K // PER             # words per column per K step
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = tl.minimum(offs_m, M - 1).to(tl.int64)                 # (BLOCK_M,) clamped: loads need no row mask
    n_ok = (offs_n < N)[None, :]
    tile, lane = offs_n // T, offs_n % T
    G = K // group
    x_ptrs = x_ptr + rows[:, None] * K + offs_k[None, :]          # (BLOCK_M, BLOCK_K)
    w_rows = tl.arange(0, WK)
    w_ptrs = qw_ptr + (tile * (K // PER) * T + lane)[None, :] + w_rows[:, None] * T   # (WK, BLOCK_N)
    sz_cols = (tile * G * T + lane)[None, :]                      # (1, BLOCK_N) into scales / zeros
    shifts = (tl.arange(0, PER) * BITS)[None, :, None]            # (1, PER, 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        words = tl.load(w_ptrs, mask=(k0 + w_rows * PER < K)[:, None] & n_ok, other=0)
        # code j of word w is channel P*w + j: (WK, PER, BLOCK_N) in row-major order is k order
        q = tl.reshape((words[:, None, :] >> shifts) & MASK, (BLOCK_K, BLOCK_N))
        g_off = sz_cols + ((kk // group) * T)[:, None]           # (BLOCK_K, BLOCK_N)
        s = tl.load(s_ptr + g_off, mask=k_ok[:, None] & n_ok, other=0.0).to(tl.float32)
        if SYM:
            w = (q - (1 << (BITS - 1))).to(tl.float32) * s
        else:
            z = tl.load(z_ptr + g_off, mask=k_ok[:, None] & n_ok, other=0.0).to(tl.float32)
            w = (q.to(tl.float32) - z) * s
        acc = tl.dot(x, w.to(x.dtype), acc)                       # w rounded once, as the reference rounds it
        x_ptrs += BLOCK_K
        w_ptrs += WK * T
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def choose_config(rows: int) -> str:
    """The `CONFIGS` entry ``triton_linear(config=None)`` runs for `rows` rows of x."""
    return "decode" if rows <= DECODE_ROWS else "prefill"


def _check(x: torch.Tensor, packed, bias: torch.Tensor | None, config: str) -> None:
    """ValueError naming the offending size or value, before anything is launched."""
    if x.dtype not in DTYPES.values():
        raise ValueError(f"x is {x.dtype}: the Triton kernels take torch.float16 or torch.bfloat16")
    if config not in CONFIGS:
        raise ValueError(f"config={config!r}: choose one of {sorted(CONFIGS)} (or None)")
    bits = packed.bits
    if bits not in (4, 8):
        raise ValueError(f"bits={bits}: the Triton kernels have 4- and 8-bit paths")
    per, k, n = 32 // bits, x.shape[-1], packed.out_features
    nt = -(-n // TILE_N)
    if k != packed.in_features:
        raise ValueError(f"x has K={k}, the layer has in_features={packed.in_features}")
    if packed.qweight.shape != (nt, k // per, TILE_N) or k % per:
        raise ValueError(f"{bits}-bit qweight {tuple(packed.qweight.shape)} is not ({nt}, {k // per}, {TILE_N}) "
                         f"for K={k}, N={n}")
    group = k if packed.group_size == -1 else packed.group_size
    if group <= 0 or k % group:
        raise ValueError(f"group_size={packed.group_size} does not divide K={k}")
    want = (nt, k // group, TILE_N)
    for name, t in (("scales", packed.scales), ("zeros", packed.zeros)):
        if t is not None and tuple(t.shape) != want:
            raise ValueError(f"{name} {tuple(t.shape)} is not {want} for K={k}, N={n}, group_size={packed.group_size}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias {tuple(bias.shape)} is not ({n},)")


def triton_linear(x: torch.Tensor, packed, bias: torch.Tensor | None = None, config: str | None = None):
    """``x @ W.T + bias`` for a `PackedWeight` (layout in the module docstring): x float16 / bfloat16
    ``(..., K)`` -> ``(..., N)`` in x's dtype. `config`: a `CONFIGS` key, or None for `choose_config`."""
    lead, k = x.shape[:-1], x.shape[-1]
    m = lead.numel()
    config = choose_config(m) if config is None else config
    _check(x, packed, bias, config)
    n = packed.out_features
    if packed.perm is not None:
        x = x.index_select(-1, packed.perm)                     # packed channel order: groups contiguous
    x2 = x.reshape(m, k).contiguous()                           # (M, K)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)      # (M, N)
    if m == 0:
        return y.reshape(*lead, n)
    c = CONFIGS[config]
    group = k if packed.group_size == -1 else packed.group_size
    sym, has_bias = packed.zeros is None, bias is not None
    b = bias.to(x.dtype).contiguous() if has_bias else y       # the reference adds bias in x's dtype
    grid = (triton.cdiv(n, c["BLOCK_N"]), triton.cdiv(m, c["BLOCK_M"]))
    # SYM / HAS_BIAS are constexprs: the kernel never reads z_ptr / b_ptr then, and any tensor fills the slot
    _dequant_matmul[grid](x2, packed.qweight, packed.scales, packed.scales if sym else packed.zeros, b, y,
                          m, n, k, group, BITS=packed.bits, SYM=sym, HAS_BIAS=has_bias,
                          BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"],
                          num_warps=c["num_warps"], num_stages=c["num_stages"])
    return y.reshape(*lead, n)


def compile_for(arch: int, config: str, bits: int, sym: bool, dtype: str = "fp16", bias: bool = False):
    """Ahead-of-time compile for CUDA compute capability `arch` (80, 90) without a GPU: the CompiledKernel
    (its ``asm["ptx"]`` and ``metadata.shared``). `dtype` is x's, ``"fp16"`` or ``"bf16"``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    if config not in CONFIGS:
        raise ValueError(f"config={config!r}: choose one of {sorted(CONFIGS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {sorted(DTYPES)}")
    if bits not in (4, 8):
        raise ValueError(f"bits={bits}: the Triton kernels have 4- and 8-bit paths")
    c = CONFIGS[config]
    sig = {"x_ptr": f"*{dtype}", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "b_ptr": f"*{dtype}",
           "y_ptr": f"*{dtype}", "M": "i32", "N": "i32", "K": "i32", "group": "i32",
           "BITS": "constexpr", "SYM": "constexpr", "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr",
           "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
    consts = {"BITS": bits, "SYM": sym, "HAS_BIAS": bias, "BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"],
              "BLOCK_K": c["BLOCK_K"]}
    src = ASTSource(fn=_dequant_matmul, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": c["num_warps"], "num_stages": c["num_stages"],
                                   "enable_fp_fusion": True})
