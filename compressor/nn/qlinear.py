"""`QuantLinear`: a Linear whose weight is stored packed in the GPTQ int32 layout.

Buffers (K = in_features, N = out_features, G = number of groups; see `compressor.quant.packing`):
  * ``qweight`` int32 (K*bits/32, N)   * ``qzeros`` int32 (G, N*bits/32)
  * ``scales``  fp16  (G, N)           * ``g_idx``  int32 (K,)        * ``bias`` (N,) optional

The state-dict names are exactly auto-gptq's, so the saved file is a GPTQ checkpoint; the module's
checkpoint spec (`spec`, registered as type ``gptq``) carries bits, group size, symmetry and
act-order, per module, so one model may mix 4- and 8-bit layers.

`forward` runs the dequant-matmul op of `compressor.kernels` on the kernel layout of the device the
buffers are on (`packed`: repacked once from the GPTQ buffers and cached per device, rebuilt when
the buffers are replaced or written). Where that device has no kernel layout, or for 2/3-bit, other
activation dtypes or act-order with unequal groups, it takes `reference_forward`: dequantize, then
``F.linear``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..quant.packing import pack_gptq, unpack_gptq
from .formats import register_module

__all__ = ["QuantLinear"]


class _KernelState:
    """One device's packed weight plus the buffers (and their versions) it was built from."""
    __slots__ = ("packed", "sources", "versions", "device")

    def __init__(self, packed, sources: tuple, versions: tuple, device: str):
        self.packed, self.sources, self.versions, self.device = packed, sources, versions, device


_ROWS = 512                 # rows per slice when dequantizing a whole weight

def _same(a: tuple, b: tuple) -> bool:
    return a[0] is b[0] and a[1] is b[1] and a[2] is b[2] and a[3] is b[3]


def _versions(sources) -> tuple:
    # load_state_dict copies into qweight and scales alongside the rest; inference tensors have
    # no version counter, so for them only replacing the tensor is noticed.
    return tuple(-1 if t.is_inference() else t._version for t in sources[:2])


def _codes_of(p, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`QuantLinear.codes` from a `PackedWeight` (exact: the layout holds the same codes and fp16 qparams)."""
    from ..kernels.ops import layout_codes
    q, scale, zero = layout_codes(p.qweight.cpu(), p.scales.cpu(), None if p.zeros is None else p.zeros.cpu(), bits,
                                  p.out_features)
    q = q.to(torch.uint8)
    k = q.shape[1]
    g_idx = (torch.arange(k) // (k // scale.shape[1])).to(torch.int32)
    if p.perm is not None:                       # packed order -> the checkpoint's channel order
        perm = p.perm.cpu()
        q_orig, g_orig = torch.empty_like(q), torch.empty_like(g_idx)
        q_orig[:, perm], g_orig[perm] = q, g_idx
        q, g_idx = q_orig, g_orig
    return q.contiguous(), scale.contiguous(), zero.contiguous(), g_idx


@register_module("gptq")
class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 bias: bool = False, device=None, dtype=torch.float32, sym: bool | None = None,
                 desc_act: bool | None = None):
        super().__init__()
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"bits={bits}: QuantLinear supports 2, 3, 4 and 8")
        if type(group_size) is not int or not (group_size == -1 or group_size > 0):
            raise ValueError(f"group_size={group_size!r}: must be -1 (per channel) or a positive integer")
        g = in_features if group_size == -1 else group_size
        if in_features % g:
            raise ValueError(f"group_size={group_size} does not divide in_features={in_features}")
        run = 32 if bits == 3 else 32 // bits
        if in_features % run or out_features % run:
            raise ValueError(f"{bits}-bit GPTQ packing needs in/out features divisible by {run}, "
                             f"got ({in_features}, {out_features})")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.sym = sym                # as quantized; None: read off the zero points when asked
        self._desc_act = desc_act     # as quantized (act-order); None: read off g_idx when asked
        n_groups = in_features // g
        self.register_buffer("qweight", torch.empty(in_features * bits // 32, out_features, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.empty(n_groups, out_features * bits // 32, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.empty(n_groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32, device=device))
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self._kernel_state: dict[str, _KernelState] = {}   # device type -> packed layout, built lazily
        self._last: _KernelState | None = None             # the one used last
        self._released = False                              # GPTQ buffers dropped for inference (`release_`)

    # --- checkpoint format -------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.is_sym(),
                "in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "desc_act": self.desc_act()}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "QuantLinear":
        return cls(spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"],
                   bias=spec.get("bias", False), sym=spec.get("sym"), desc_act=spec.get("desc_act"))

    def is_sym(self) -> bool:
        """Symmetric grid: every zero point at 2**(bits-1) (what `choose_qparams(sym=True)` gives)."""
        if self.sym is None:
            self.sym = bool((self.codes()[2] == 2 ** (self.bits - 1)).all())
        return self.sym

    def desc_act(self) -> bool:
        """Quantized in act-order (GPTQ's ``desc_act``); unless recorded, whether g_idx is not k // group."""
        if self._desc_act is None:
            g = self.in_features if self.group_size == -1 else self.group_size
            self._desc_act = not torch.equal(self.g_idx.cpu().long(), torch.arange(self.in_features) // g)
        return self._desc_act

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
                   g_idx: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   sym: bool | None = None, desc_act: bool | None = None) -> "QuantLinear":
        """Build from (N, K) codes and (N, G) qparams as returned by `compressor.quant.primitives`."""
        n, k = q.shape
        g = k if group_size == -1 else group_size
        if g_idx is None:
            g_idx = torch.arange(k, dtype=torch.int32) // g
        m = cls(k, n, bits, group_size, bias=bias is not None, device="cpu",
                dtype=bias.dtype if bias is not None else torch.float32, sym=sym, desc_act=desc_act)
        for name, t in pack_gptq(q, scale, zero, bits, g_idx).items():
            getattr(m, name).copy_(t)
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q (N, K), scale (N, G), zero (N, G), g_idx (K,)); after `release_`, read back from the kernel layout."""
        if self._released:
            return _codes_of(self._last.packed, self.bits)
        return unpack_gptq({"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales,
                            "g_idx": self.g_idx}, self.bits)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """(N, K) float weight: ``(q - zero[g_idx]) * scale[g_idx]``."""
        q, scale, zero, g_idx = self.codes()
        g = g_idx.long()
        n, k = q.shape
        size = k // scale.shape[1] if scale.shape[1] else k
        plain = scale.shape[1] * size == k and torch.equal(g, torch.arange(k, device=g.device) // size)
        w = torch.empty(q.shape, dtype=dtype)
        for lo in range(0, n, _ROWS):            # in row slices: a 7B MLP layer's temporaries stay ~10 MB
            hi = lo + _ROWS
            if plain:                            # contiguous groups: broadcast instead of gathering per column
                qs = q[lo:hi].float().view(-1, scale.shape[1], size)
                w[lo:hi] = ((qs - zero[lo:hi, :, None]) * scale[lo:hi, :, None]).view(-1, k)
            else:
                w[lo:hi] = (q[lo:hi].float() - zero[lo:hi, g]) * scale[lo:hi, g]
        return w

    # --- inference -----------------------------------------------------------------------------
    def packed(self):
        """This layer's `compressor.kernels.PackedWeight` for the device its buffers are on, or None
        where that device has no kernel layout for it. Built once per device and cached; rebuilt when
        the buffers were replaced (``load_state_dict(assign=True)``) or written (``copy_``)."""
        if self._released:
            return self._last.packed
        if torch.compiler.is_compiling():   # built eagerly by `prepare_` or an earlier call
            state = self._kernel_state.get(self.qweight.device.type)
            return None if state is None else state.packed
        src = (self.qweight, self.scales, self.qzeros, self.g_idx)
        state = self._last               # the per-token path: identity checks, no device lookup
        if state is None or not _same(src, state.sources):
            state = self._kernel_state.get(self.qweight.device.type)
            if state is not None and not _same(src, state.sources):
                state = None
        if state is not None and _versions(src) == state.versions:
            if state is not self._last:      # nn.Module.__setattr__ is slow: only on a change
                self._last = state
            return state.packed
        dev = self.qweight.device.type
        if dev in kernels.LAYOUTS and self.bits in kernels.OPS and not self.desc_act():
            # static groups: straight from the GPTQ words, no unpacking (`pack_gptq`)
            cpu = lambda t: t.cpu()  # noqa: E731
            packed = kernels.pack_gptq(cpu(self.qweight), cpu(self.qzeros), cpu(self.scales), self.bits,
                                       self.group_size, self.is_sym()).to(self.qweight.device)
        else:
            q, scale, zero, g_idx = self.codes()
            packed = kernels.pack_for(dev, q, scale, zero, self.bits, self.group_size, g_idx)
        self._last = self._kernel_state[dev] = _KernelState(packed, src, _versions(src), dev)
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):      # as nn.Linear does: x in the autocast dtype
            x = x.to(torch.get_autocast_dtype(x.device.type))
        # the kernels have no backward: training through this layer (lora, peqa) takes the reference
        if torch.is_grad_enabled() and (x.requires_grad or self.scales.requires_grad):
            return self.reference_forward(x)
        packed = self.packed()
        # the layout in `_last` is for the device type it was built on; x must be there too
        if packed is None or x.dtype not in kernels.DTYPES.get(x.device.type, ()) or x.device.type != self._last.device:
            return self.reference_forward(x)
        return packed(x, self.bias)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._released:        # the pure-PyTorch oracle on the kernel layout
            return kernels.reference(x, *self._last.packed.args(self.bias), bits=self.bits)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    # --- inference only --------------------------------------------------------------------------
    def use_packed_(self, packed) -> None:
        """Run on `packed` (the same weight in kernel layout, e.g. a view into a fused q/k/v weight)
        instead of the layout built from the buffers."""
        state = self._kernel_state.get(packed.qweight.device.type)
        if state is None:
            raise ValueError("use_packed_: build this layer's own layout first (packed())")
        state.packed = packed
        self._last = state

    def release_(self) -> "QuantLinear":
        """Drop the GPTQ checkpoint buffers and keep only the kernel layout (`compressor.load` does this
        for inference: otherwise every weight is held twice). The layer still runs, on the kernels or
        on their reference; its codes and its state dict are gone: saving refuses."""
        if self._released:
            return self
        if self.packed() is None:
            return self                       # no kernel layout here: the buffers are the weight
        self.is_sym(), self.desc_act()        # the spec reads them off the buffers unless recorded
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            setattr(self, name, torch.empty(0, dtype=getattr(self, name).dtype))
        self._last.sources = self._last.versions = ()       # the state must not keep the buffers alive
        self._kernel_state = {self._last.device: self._last}
        self._released = True
        return self

    def _check_not_released(self, what: str) -> None:
        if self._released:
            raise RuntimeError(f"{what}: this QuantLinear was loaded for inference and keeps only its kernel layout; "
                               f"load with compressor.load(..., for_inference=False) to read or save the checkpoint")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._check_not_released("state_dict")
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
