"""Group-wise affine quantization primitives: the one place where rounding is defined.

Every pass (RTN, GPTQ, AWQ, ...) calls these and never rewrites rounding.

Conventions (match the GPTQ / auto-gptq checkpoint layout):
  * A weight ``W`` is ``(out_features, in_features)``; groups run along ``in_features``.
    ``group_size = -1`` means one group per output row (per-channel).
  * ``scale`` and ``zero`` are ``(out_features, n_groups)``.
  * Integer codes ``q`` lie in ``[0, 2**bits - 1]`` and ``W ~= (q - zero) * scale``.
  * Symmetric: ``zero = 2**(bits-1)`` and ``scale = 2 max|w| / maxq`` (the GPTQ reference choice).
  * Scales are rounded to fp16 here, because the checkpoint stores them in fp16: codes are chosen
    against the scale that will actually be used at inference.
  * Asymmetric: ``scale = (max - min) / maxq``, ``zero = round(-min / scale)`` clamped to
    ``[1, maxq]``. Zero 0 is excluded because the auto-gptq v1 format stores ``zero - 1`` and
    several public kernels add the 1 back without masking; clamping costs nothing measurable on real
    weights (a group whose values are all >= 0 is rare) and keeps every GPTQ loader exact.
"""
from __future__ import annotations

import torch

__all__ = ["choose_qparams", "quantize", "dequantize", "fake_quantize", "sqnr_db", "group_view", "mse_clip_search"]


def _check(w: torch.Tensor, bits: int, group_size: int) -> int:
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits={bits} is not supported; use one of 2, 3, 4, 8")
    k = w.shape[1]
    if group_size == -1:
        return k
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={k}")
    return group_size


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) -> (out, n_groups, group) view."""
    g = w.shape[1] if group_size == -1 else group_size
    return w.reshape(w.shape[0], w.shape[1] // g, g)


def _qparams_from_range(wmin: torch.Tensor, wmax: torch.Tensor, bits: int, sym: bool):
    """Scale and zero from a group's (clipped) range; any shape, elementwise."""
    maxq = 2 ** bits - 1
    if sym:
        scale = torch.maximum(wmax, -wmin) * 2 / maxq
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        scale = (wmax - wmin) / maxq
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-wmin / scale).clamp(1, maxq)
    return scale.clamp(min=1e-6).half().float(), zero


def choose_qparams(w: torch.Tensor, bits: int, group_size: int, sym: bool,
                   clip: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for each (row, group).

    Args:
        w: (out, in) float weight.
        clip: optional shrink factor in (0, 1] applied to the group range (MSE clipping search
            passes a scalar or an (out, n_groups) tensor).
    Returns:
        scale (out, n_groups) float32, zero (out, n_groups) float32 holding integers.
    """
    _check(w, bits, group_size)
    wg = group_view(w.float(), group_size)
    wmin = wg.amin(dim=-1).clamp(max=0)
    wmax = wg.amax(dim=-1).clamp(min=0)
    if clip is not None:
        wmin, wmax = wmin * clip, wmax * clip
    return _qparams_from_range(wmin, wmax, bits, sym)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Integer codes (out, in) uint8 in [0, 2**bits - 1]."""
    maxq = 2 ** bits - 1
    wg = group_view(w.float(), group_size)
    q = torch.clamp(torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, maxq)
    return q.reshape(w.shape).to(torch.uint8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(out, in) codes -> (out, in) float: ``(q - zero) * scale`` per group."""
    qg = group_view(q.to(torch.float32), group_size)
    w = (qg - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
    return w.reshape(q.shape).to(dtype)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool, clip=None) -> torch.Tensor:
    """Round-trip through the grid (used by searches and as a test oracle)."""
    scale, zero = choose_qparams(w, bits, group_size, sym, clip)
    return dequantize(quantize(w, scale, zero, bits, group_size), scale, zero, group_size, w.dtype)


def mse_clip_search(w: torch.Tensor, bits: int, group_size: int, sym: bool, grid: int = 100,
                    maxshrink: float = 0.8, norm: float = 2.4, chunk: int = 16) -> torch.Tensor:
    """Per-(row, group) range shrink factor minimising ``sum |w - Q(w)|^norm`` (GPTQ's ``mse`` option).

    Tries ``p = 1, 1 - 1/grid, ..., 1 - maxshrink`` (`chunk` candidates at a time, vectorised) and
    keeps the best per group. Returns (out, n_groups) float32 factors for ``choose_qparams(clip=)``.
    """
    maxq = 2 ** bits - 1
    wg = group_view(w.float(), group_size)                        # (N, G, g)
    wmin, wmax = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    ps = 1 - torch.arange(int(maxshrink * grid) + 1, dtype=torch.float32) / grid
    best = torch.full(wg.shape[:2], float("inf"))
    best_p = torch.ones(wg.shape[:2])
    for c in range(0, ps.numel(), chunk):
        p = ps[c:c + chunk].view(-1, 1, 1)                        # (P, 1, 1)
        scale, zero = _qparams_from_range(wmin * p, wmax * p, bits, sym)   # (P, N, G)
        q = torch.clamp(torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, maxq)
        err = ((q - zero.unsqueeze(-1)) * scale.unsqueeze(-1) - wg).abs_().pow_(norm).sum(-1)
        e, i = err.min(0)                                        # first (largest p) wins ties
        better = e < best
        best = torch.where(better, e, best)
        best_p = torch.where(better, p.view(-1)[i], best_p)
    return best_p


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|^2 / |ref - approx|^2)."""
    sig = noise = 0.0
    r2, a2 = ref.reshape(ref.shape[0], -1) if ref.dim() else ref.reshape(1, 1), approx.reshape(ref.shape[0], -1) if ref.dim() else approx.reshape(1, 1)
    for lo in range(0, r2.shape[0], 256):      # float64 in row slices: no whole-weight float64 copies
        r = r2[lo:lo + 256].double()
        sig += float(r.pow(2).sum())
        noise += float((r - a2[lo:lo + 256].double()).pow(2).sum())
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(torch.tensor(sig / noise, dtype=torch.float64)))
