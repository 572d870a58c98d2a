"""Repack at load time: GPTQ checkpoint layout -> the tile-major layout the CPU kernels read.

The on-disk format never changes; `QuantLinear` calls this once (on its first forward, or in
`compressor.nn.prepare_`) and caches the result per device. See `compressor.kernels.ops` for the
target layout. In short, the GPTQ int32 word (P = 32 / bits codes along in_features) is kept, and the output columns are cut
into tiles of `TILE_N` so each thread streams one contiguous block; scales and zeros follow the
same tiling; zeros are dropped for symmetric grids.

Act-order (``desc_act``) checkpoints have a non-monotone ``g_idx``. Input channels are sorted by
group once here (`perm`), the op gathers ``x[..., perm]``, and every group becomes a contiguous run
of channels again, which is what the kernel's per-group epilogue needs.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .ops import OPS, TILE_N

__all__ = ["PackedWeight", "pack", "pack_gptq", "channel_order", "fuse", "fusable", "select_rows"]


@dataclass(frozen=True)
class PackedWeight:
    """One linear layer's weight in kernel layout, callable as ``packed(x, bias)``."""
    bits: int
    qweight: torch.Tensor          # int32 (Nt, K / P, TILE_N)
    scales: torch.Tensor           # fp16  (Nt, G, TILE_N)
    zeros: torch.Tensor | None     # fp16  (Nt, G, TILE_N), None if symmetric
    perm: torch.Tensor | None      # int64 (K,), None unless act-order
    group_size: int
    in_features: int
    out_features: int

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
        """``x @ W.T + bias``. `backend` (None: `compressor.kernels.current_backend()`, by default ``auto``):
        ``auto`` the registered op (the fastest kernel of x's device), ``cuda``/``triton`` that kernel
        (ValueError if it is not there), ``reference`` the pure-PyTorch oracle."""
        from .dispatch import run
        return run(self, x, bias, backend)

    def to(self, device: str | torch.device) -> "PackedWeight":
        """The same layout on `device` (the layout is one for every device)."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PackedWeight(self.bits, mv(self.qweight), mv(self.scales), mv(self.zeros), mv(self.perm),
                            self.group_size, self.in_features, self.out_features)

    def args(self, bias: torch.Tensor | None = None) -> tuple:
        """The op's arguments after ``x``."""
        return (self.qweight, self.scales, self.zeros, self.perm, bias, self.group_size, self.out_features)


def channel_order(g_idx: torch.Tensor | None, k: int, group: int) -> torch.Tensor | None:
    """Permutation that makes every group a contiguous run of `group` channels; None if identity.

    Raises ValueError when no permutation can (groups of unequal size).
    """
    natural = torch.arange(k) // group
    if g_idx is None or torch.equal(g_idx.long(), natural):
        return None
    perm = torch.argsort(g_idx.long(), stable=True)
    if not torch.equal(g_idx.long()[perm], natural):
        counts = torch.bincount(g_idx.long()).tolist()
        raise ValueError(f"g_idx groups have sizes {sorted(set(counts))}, not all {group}: "
                         "the kernels need equal groups")
    return perm


def _words(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, K) codes -> (R, K / P) int32 words, code j of a word in bits [bits*j, bits*(j+1))."""
    per = 32 // bits
    r, k = q.shape
    shifts = torch.arange(per, dtype=torch.int64) * bits
    w = (q.to(torch.int64).view(r, k // per, per) << shifts).sum(-1)      # values in [0, 2**32)
    return torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32)


def _tiles(t: torch.Tensor, nt: int) -> torch.Tensor:
    """(Npad, X) -> (Nt, X, TILE_N): columns of one tile become the fastest dimension."""
    return t.view(nt, TILE_N, t.shape[1]).permute(0, 2, 1).contiguous()


def pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
         g_idx: torch.Tensor | None = None) -> PackedWeight:
    """Codes and qparams (as from `compressor.quant.primitives`) -> `PackedWeight`.

    Args:
        q: (N, K) integer codes in [0, 2**bits).
        scale, zero: (N, G) float; zero holds integers. Scales are stored as fp16 (exact for
            GPTQ checkpoints, whose scales are fp16 already).
        g_idx: (K,) group of each input channel, or None for ``k // group``.
    """
    if bits not in OPS:
        raise ValueError(f"bits={bits}: the kernels support {sorted(OPS)}")
    n, k = q.shape
    per = 32 // bits
    group = k if group_size == -1 else group_size
    if k % per or group <= 0 or k % group or group % per:
        raise ValueError(f"in_features={k} and group_size={group_size} must be multiples of {per}, "
                         "and the group must divide in_features")
    perm = channel_order(g_idx, k, group)
    nt = -(-n // TILE_N)
    pad = nt * TILE_N - n
    words = torch.zeros(nt * TILE_N, k // per, dtype=torch.int32)      # padded columns: codes 0
    for lo in range(0, n, 1024):   # in row slices: int64 temporaries of ~1024 rows, not of the layer
        rows = q[lo:lo + 1024]
        words[lo:lo + rows.shape[0]] = _words(rows if perm is None else rows[:, perm], bits)  # groups contiguous
    scale = torch.nn.functional.pad(scale.float(), (0, 0, 0, pad))       # (Npad, G), padded scale 0
    zero = zero.float()
    sym = bool((zero == 2 ** (bits - 1)).all())
    zeros = None if sym else _tiles(torch.nn.functional.pad(zero, (0, 0, 0, pad)).half(), nt)
    return PackedWeight(bits=bits, qweight=_tiles(words, nt), scales=_tiles(scale.half(), nt),
                        zeros=zeros, perm=perm, group_size=group_size, in_features=k, out_features=n)


def select_rows(p: PackedWeight, order: torch.Tensor) -> PackedWeight:
    """`p` with its output channels in `order` (output i of the result is output ``order[i]`` of `p`): the
    codes and qparams move whole, so the result is exact. For `compressor.nn.prepare`'s act-order fold."""
    n, nt = p.out_features, p.qweight.shape[0]
    order = order.long().cpu()
    if order.shape != (n,) or not torch.equal(order.sort().values, torch.arange(n)):
        raise ValueError(f"select_rows: order must be a permutation of the {n} output channels")

    def rows(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        flat = t.permute(0, 2, 1).reshape(nt * TILE_N, t.shape[1])[:n][order.to(t.device)]
        return _tiles(torch.nn.functional.pad(flat, (0, 0, 0, nt * TILE_N - n)), nt)   # padded columns: 0

    return replace(p, qweight=rows(p.qweight), scales=rows(p.scales), zeros=rows(p.zeros))


def fusable(parts: list[PackedWeight | None]) -> bool:
    """Whether `fuse` can join `parts` (the check alone, no copy)."""
    if not parts or any(p is None for p in parts):
        return False
    first = parts[0]
    for p in parts:
        if (p.bits, p.group_size, p.in_features) != (first.bits, first.group_size, first.in_features):
            return False
        if (p.perm is None) != (first.perm is None) or (p.perm is not None and not torch.equal(p.perm, first.perm)):
            return False
        if p.out_features % TILE_N and p is not parts[-1]:
            return False
    return True


def fuse(parts: list[PackedWeight | None]) -> PackedWeight | None:
    """Layers that read the same input (q/k/v, gate/up) as one `PackedWeight` whose outputs are theirs
    side by side, or None when they cannot be: a missing layout, different bits, group size, input
    width or act-order permutation, or a width that is not whole tiles (the join would pad inside).
    One call then streams x once and runs one parallel region for all of them."""
    if not fusable(parts):
        return None
    first = parts[0]
    if len(parts) == 1:
        return first
    if any(p.zeros is not None for p in parts):     # mixed symmetric / asymmetric: spell the zeros out
        zeros = torch.cat([p.zeros if p.zeros is not None else torch.full_like(p.scales, 2 ** (p.bits - 1))
                           for p in parts])
    else:
        zeros = None
    return PackedWeight(first.bits, torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]),
                        zeros, first.perm, first.group_size, first.in_features, sum(p.out_features for p in parts))


def pack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
              sym: bool) -> PackedWeight:
    """GPTQ checkpoint buffers (`compressor.quant.packing`, static groups: ``g_idx = k // group``) -> the
    same `PackedWeight` as `pack` on their codes, without unpacking them: a GPTQ word already holds P
    consecutive input channels of one output column, so the kernel layout is its (K / P, N) words cut
    into column tiles. Only the zero points (packed along N, stored minus one) are unpacked. Memory: the
    result plus one layer's scales, where `pack` goes through int64 codes (8 bytes per weight)."""
    if bits not in OPS:
        raise ValueError(f"bits={bits}: the kernels support {sorted(OPS)}")
    kw, n = qweight.shape
    per = 32 // bits
    k = kw * per
    group = k if group_size == -1 else group_size
    if group <= 0 or k % group or group % per:
        raise ValueError(f"in_features={k} and group_size={group_size} must be multiples of {per}, "
                         "and the group must divide in_features")
    nt = -(-n // TILE_N)
    pad = nt * TILE_N - n
    def tiles(t: torch.Tensor) -> torch.Tensor:      # one copy (no padded intermediate unless it needs padding)
        t = torch.nn.functional.pad(t, (0, pad)) if pad else t
        return t.view(t.shape[0], nt, TILE_N).transpose(0, 1).contiguous()

    zeros = None
    if not sym:
        shifts = torch.arange(per, dtype=torch.int32) * bits
        z = ((qzeros.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(qzeros.shape[0], -1)[:, :n] + 1
        zeros = tiles(z.to(torch.float16))
    return PackedWeight(bits=bits, qweight=tiles(qweight), scales=tiles(scales.to(torch.float16)), zeros=zeros,
                        perm=None, group_size=group_size, in_features=k, out_features=n)
