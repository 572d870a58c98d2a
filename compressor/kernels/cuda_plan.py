"""Host side of the CUDA dequant-matmul (`cuda/dq_gemm.cu`), runnable without a GPU: the launch plan, and an
emulation of what the kernel computes, in its order and precision.

`plan` is `make_plan` of ``cuda/plan.h`` (the C++ the binding runs) in Python; the tests compile the header with
g++ and compare the two over many shapes. A block computes a (bm, 128) tile of y over ``steps_per_split`` steps
of 64 k; when the grid would otherwise be too small for the GPU, ``splits`` K ranges park fp32 sums in a workspace
and the last block of each tile adds them in split order (one launch, deterministic).

`emulate` runs the kernel's arithmetic on the CPU, operation by operation where the values are made:
  * the dequantization as the kernel does it, from the words' bits: ``lop3`` masks and shifts, the fp16 magic
    number 0x6400, the exact half subtraction of 1024 + zero (or the fused ``x / 16 - 64 - zero`` of the high
    nibbles), one rounding multiply by the scale (fp16), or a widened fp32 product rounded to bf16;
  * the slot order these leave along k in shared memory, and the ``__byte_perm`` selectors that put the x runs
    in the same order;
  * fp32 accumulation in steps of 16 k (one ``mma``), the splits' sums added in split order, the bias added in
    fp32 and rounded once.
`dequantized` returns the shared-memory tiles it builds, put back in k order, so a test can check them against the
reference bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .repack import PackedWeight

__all__ = ["THREADS", "BN", "BK", "DECODE_BM", "PREFILL_BM", "Plan", "plan", "emulate", "dequantized", "SLOTS"]

THREADS, BN, BK = 128, 128, 64
DECODE_BM, PREFILL_BM = 16, 64
DECODE_BLOCKS_PER_SM, PREFILL_BLOCKS_PER_SM = 4, 2
SLOTS = {4: (0, 4, 1, 5, 2, 6, 3, 7), 8: (0, 2, 1, 3)}     # k of each shared-memory slot of a word
_EX = 0x64006400                                          # fp16 1024.0 in both halves


@dataclass(frozen=True)
class Plan:
    bm: int
    grid_x: int
    grid_y: int
    splits: int
    steps_per_split: int


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def plan(m: int, k: int, n: int, sms: int = 108) -> Plan:
    """The launch of one (m, k) x (k, n) product on a GPU with `sms` multiprocessors (cuda/plan.h)."""
    if m < 1 or k < 1 or n < 1 or sms < 1:
        raise ValueError(f"M={m}, K={k}, N={n}, sms={sms}: all must be >= 1")
    decode = m <= DECODE_BM
    bm = DECODE_BM if decode else PREFILL_BM
    gx, gy = _cdiv(_cdiv(n, 32) * 32, BN), _cdiv(m, bm)
    steps = _cdiv(k, BK)
    want = (DECODE_BLOCKS_PER_SM if decode else PREFILL_BLOCKS_PER_SM) * sms
    splits = min(steps, max(1, _cdiv(want, gx * gy)))
    per = _cdiv(steps, splits)
    return Plan(bm, gx, gy, _cdiv(steps, per), per)


def _u32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64) & 0xFFFFFFFF


def _halves(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two fp16 halves of 32-bit values (low, high), as a half2 register holds them."""
    def h(bits):
        return torch.where(bits >= 2 ** 15, bits - 2 ** 16, bits).to(torch.int16).view(torch.float16)
    return h(u & 0xFFFF), h(u >> 16)


def _fma16(a: torch.Tensor, b: float, c: torch.Tensor) -> torch.Tensor:
    """``__hfma2``: a * b + c with one rounding to fp16 (float64 holds the exact value here)."""
    return (a.double() * b + c.double()).half()


def _byte_perm(a: torch.Tensor, b: torch.Tensor, sel: int) -> torch.Tensor:
    """PTX ``prmt`` / ``__byte_perm``: byte j of the result is byte ``(sel >> 4j) & 7`` of (b:a)."""
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    return sum(src[(sel >> (4 * j)) & 7] << (8 * j) for j in range(4))


def _codes_minus_zero(w: torch.Tensor, zero: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """`codes_minus_zero` of the .cu: (q - zero) of each slot, fp16, from 32-bit words `w`."""
    zero = zero.double()
    if bits == 4:
        lo_off, hi_off = (1024 + zero).half(), (-(64 + zero)).half()
        w8 = w >> 8
        pairs = [_halves((w & 0x000F000F) | _EX), _halves((w & 0x00F000F0) | _EX),
                 _halves((w8 & 0x000F000F) | _EX), _halves((w8 & 0x00F000F0) | _EX)]
        out = []
        for i, (lo, hi) in enumerate(pairs):
            f = (lambda h: h - lo_off) if i % 2 == 0 else (lambda h: _fma16(h, 1 / 16, hi_off))
            out += [f(lo), f(hi)]
        return out
    off = (1024 + zero).half()
    out = []
    for lo, hi in (_halves((w & 0x00FF00FF) | _EX), _halves(((w >> 8) & 0x00FF00FF) | _EX)):
        out += [lo - off, hi - off]
    return out


def _b_tiles(packed: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """(Npad, K) the dequantized weights as the kernel stores them in shared memory: column n's run along k in
    slot order, in `dtype`."""
    bits, per = packed.bits, 32 // packed.bits
    nt, kw, _ = packed.qweight.shape
    k = kw * per
    group = k if packed.group_size == -1 else packed.group_size
    g = (torch.arange(kw) * per) // group                                    # group of each word row
    s = packed.scales[:, g, :]                                               # (Nt, KW, 32)
    z = packed.zeros[:, g, :].double() if packed.zeros is not None else torch.full(s.shape, 2.0 ** (bits - 1))
    d = _codes_minus_zero(_u32(packed.qweight), z, bits)                     # per slot: (Nt, KW, 32) fp16
    if dtype == torch.float16:
        v = [(di * s).half() for di in d]                                    # __hmul2: one rounding
    else:
        v = [(di.float() * s.float()).to(dtype) for di in d]                 # exact fp32 product, rounded once
    t = torch.stack(v, -1)                                                   # (Nt, KW, 32, slot)
    return t.permute(0, 2, 1, 3).reshape(nt * 32, k)


def _a_tiles(x: torch.Tensor, bits: int) -> torch.Tensor:
    """(M, K) x in slot order, as `to_slots` of the .cu leaves each 16-byte run of 8 k in shared memory."""
    m, k = x.shape
    u = _u32(x.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF).view(m, k // 8, 4, 2)
    words = u[..., 0] | (u[..., 1] << 16)                                    # (M, K/8, 4): v.x .. v.w
    vx, vy, vz, vw = words.unbind(-1)
    if bits == 4:
        out = [_byte_perm(vx, vz, 0x5410), _byte_perm(vx, vz, 0x7632), _byte_perm(vy, vw, 0x5410),
               _byte_perm(vy, vw, 0x7632)]
    else:
        out = [_byte_perm(vx, vy, 0x5410), _byte_perm(vx, vy, 0x7632), _byte_perm(vz, vw, 0x5410),
               _byte_perm(vz, vw, 0x7632)]
    halves = torch.stack([h for o in out for h in _halves(o)], -1)           # (M, K/8, 8) fp16 bit patterns
    return halves.view(torch.int16).view(x.dtype).reshape(m, k)


def _slot_order(k: int, bits: int) -> torch.Tensor:
    """k of each slot position of the shared tiles."""
    per = 32 // bits
    return (torch.arange(k // per).view(-1, 1) * per + torch.tensor(SLOTS[bits]).view(1, -1)).reshape(-1)


def dequantized(packed: PackedWeight, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """(N, K) the kernel's dequantized weight in `dtype`, k in packed order (the reference's order)."""
    k = packed.in_features
    b = _b_tiles(packed, dtype)
    out = torch.empty_like(b)
    out[:, _slot_order(k, packed.bits)] = b
    return out[: packed.out_features]


def emulate(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None, sms: int = 108) -> torch.Tensor:
    """(M, N) y in x's dtype as `dq_gemm` (and `finish_split`) leave it. x (M, K) fp16 or bf16."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x is {x.dtype}: the CUDA kernels take float16 or bfloat16")
    m, k = x.shape
    n, bits = packed.out_features, packed.bits
    if k % 8:
        raise ValueError(f"K={k}: the kernel reads x in runs of 8")
    p = plan(m, k, n, sms)
    if packed.perm is not None:
        x = x[:, packed.perm]                                                # the kernel's gathered loads
    a = _a_tiles(x, bits).float()                                            # exact
    b = _b_tiles(packed, x.dtype)[:n].float()
    y = torch.zeros(m, n, dtype=torch.float32)
    for split in range(p.splits):
        acc = torch.zeros(m, n, dtype=torch.float32)
        k0, k1 = split * p.steps_per_split * BK, min(k, (split + 1) * p.steps_per_split * BK)
        for kk in range(k0, k1, 16):                                         # one mma: 16 k, fp32 result
            acc = (acc.double() + a[:, kk:kk + 16].double() @ b[:, kk:kk + 16].double().t()).float()
        y = y + acc if p.splits > 1 else acc                                 # the last block, in split order
    if bias is not None:
        y = y + bias.to(x.dtype).float()
    return y.to(x.dtype)
