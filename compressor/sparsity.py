"""Sparsity primitives: the one place where masks, N:M patterns, bitmasks and per-block allocation live.

Conventions (every pruning pass uses these and never rewrites them):
  * A weight ``W`` is ``(out_features, in_features)``. A mask is a bool tensor of the same shape,
    ``True`` where a weight is **kept**.
  * Unstructured sparsity ``s`` prunes exactly ``round(s * in_features)`` weights of every output row
    (`row_mask`), so every layer holds exactly ``s`` zeros whenever ``s * in_features`` is whole.
  * A pattern ``"N:M"`` keeps at most N weights of every M consecutive ones along ``in_features``
    (`nm_mask`): 2:4 is the pattern sparse tensor cores (and our future kernels) exploit.
  * The bitmask layout is compressed-tensors' ``sparse-bitmask``: ``bitmask`` is
    ``numpy.packbits(mask, axis=-1, bitorder="little")`` (out, ceil(in / 8)) uint8, ``values``
    the kept weights in row-major order (1-D), ``row_offsets`` (out,) int64 the index in ``values``
    of each row's first kept weight.
  * Per-block allocation turns one score per decoder block into a keep fraction per block whose mean
    is ``1 - s``, spread linearly over ``[1 - s - lam, 1 - s + lam]`` (OWL's rule, Yin et al. 2024):
    higher score, more weights kept.
"""
from __future__ import annotations

import re

import torch

__all__ = ["parse_pattern", "row_mask", "nm_mask", "pack_bitmask", "unpack_bitmask", "allocate",
           "outlier_ratio", "removed_fraction", "zero_fraction", "max_nonzeros_per_group"]

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4); ValueError unless it reads N:M with 1 <= N < M."""
    m = _PATTERN.match(str(pattern))
    if not m:
        raise ValueError(f"pattern={pattern!r} must look like 'N:M' (keep N of every M), e.g. '2:4' or '4:8'")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 1 <= n < mm:
        raise ValueError(f"pattern={pattern!r}: need 1 <= N < M (N kept of every M weights)")
    return n, mm


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask pruning the ``round(sparsity * K)`` lowest scores of every row (ties: lower index pruned)."""
    n, k = score.shape
    prune = int(round(sparsity * k))
    mask = torch.ones(n, k, dtype=torch.bool, device=score.device)
    if prune:
        idx = torch.topk(score, prune, dim=1, largest=False, sorted=False).indices
        mask.scatter_(1, idx, False)
    return mask


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask with the N highest scores of every M consecutive columns of each row."""
    rows, k = score.shape
    if k % m:
        raise ValueError(f"pattern {n}:{m} needs in_features divisible by {m}, got {k}")
    s = score.reshape(rows, k // m, m)
    idx = torch.topk(s, n, dim=-1).indices
    mask = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(rows, k)


def mask_to_bits(mask: torch.Tensor) -> torch.Tensor:
    """(N, K) bool -> (N, ceil(K/8)) uint8, bit j % 8 of byte j // 8 set where mask[:, j]."""
    n, k = mask.shape
    bits = torch.nn.functional.pad(mask, (0, (-k) % 8)).reshape(n, -1, 8).to(torch.uint8)
    weights = (1 << torch.arange(8, dtype=torch.uint8, device=mask.device))     # little bit order
    return (bits * weights).sum(-1, dtype=torch.uint8)


def bits_to_mask(bitmask: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of `mask_to_bits`: the (N, K) bool mask."""
    n, k = shape
    if bitmask.shape != (n, (k + 7) // 8):
        raise ValueError(f"bitmask shape {tuple(bitmask.shape)} does not match weight shape {tuple(shape)}")
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    return ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().reshape(n, -1)[:, :k]


def pack_bitmask(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bitmask (N, ceil(K/8)) uint8, values (nnz,), row_offsets (N,) int64) of the nonzeros of `w`."""
    mask = w != 0
    bitmask = mask_to_bits(mask)
    counts = mask.sum(1)
    row_offsets = torch.cumsum(counts, 0) - counts
    return bitmask, w[mask], row_offsets.to(torch.int64)


def unpack_bitmask(bitmask: torch.Tensor, values: torch.Tensor, shape: tuple[int, int],
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of `pack_bitmask`: the dense (N, K) tensor."""
    n, k = shape
    mask = bits_to_mask(bitmask, shape)
    if int(mask.sum()) != values.numel():
        raise ValueError(f"bitmask marks {int(mask.sum())} weights but {values.numel()} values are stored")
    out = torch.zeros(n, k, dtype=dtype or values.dtype, device=values.device)
    out[mask] = values.to(out.dtype)
    return out


def allocate(scores: list[float], sparsity: float, lam: float) -> list[float]:
    """Per-block sparsity from one score per block (see the module docstring); mean = `sparsity`."""
    t = torch.tensor(scores, dtype=torch.float64)
    span = float(t.max() - t.min())
    if span == 0 or lam == 0:
        return [float(sparsity)] * len(scores)
    keep = (t - t.min()) / span * (2 * lam)
    keep = keep - keep.mean() + (1 - sparsity)
    return [float(min(max(1 - k, 0.0), 0.99)) for k in keep]


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """OWL's layerwise outlier distribution: the fraction of a block's scores above ``m`` x their mean."""
    flat = torch.cat([s.flatten().float() for s in scores])
    return float((flat > m * flat.mean()).float().mean())


def removed_fraction(scores: list[torch.Tensor], sparsity: float) -> float:
    """Fraction of a block's summed squared score that per-row pruning at `sparsity` removes
    (with Wanda's score |W|·‖X‖ this is the diagonal-Hessian estimate of the output error)."""
    gone = tot = 0.0
    for s in scores:
        sq = s.float().square()
        gone += float(sq[~row_mask(s, sparsity)].sum())
        tot += float(sq.sum())
    return gone / max(tot, 1e-30)


def zero_fraction(w: torch.Tensor) -> float:
    return float((w == 0).float().mean())


def max_nonzeros_per_group(w: torch.Tensor, m: int) -> int:
    """The largest count of nonzeros in any M consecutive weights of a row (<= N for an N:M layer)."""
    n, k = w.shape
    return int((w != 0).reshape(n, k // m, m).sum(-1).max())
