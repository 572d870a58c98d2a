"""NF4: 4-bit NormalFloat base weights with double quantization, through bitsandbytes.

Dettmers, Pagnoni, Holtzman, Zettlemoyer. "QLoRA: Efficient Finetuning of Quantized LLMs",
NeurIPS 2023 (arXiv:2305.14314).

NF4 divides each weight by the absolute maximum of its block of `blocksize` consecutive weights and
rounds it to the nearest of 16 levels placed at quantiles of a standard normal, so that normally
distributed weights use every level about equally often. Double quantization stores the fp32 absmax
scales themselves as 8-bit values in blocks of 256 (0.127 instead of 0.5 bits of overhead per
weight at blocksize 64). The layers are bitsandbytes' own ``Linear4bit`` holding a ``Params4bit``;
the forward dequantizes the weight and multiplies in `compute_dtype`. This is the frozen base of
QLoRA; the ``lora`` pass trains adapters on top of it.

Blocks run over the flattened (out, in) weight, but the CPU dequantize kernel of bitsandbytes 0.50
walks each row on its own, so a block that straddles two rows comes back wrong (relative error 0.29
instead of 0.09 for a 96 x 96 weight at blocksize 64). `check_shapes` therefore requires `blocksize`
to divide every in_features.

Sample recipe::

    passes:
      - nf4: {blocksize: 64, double_quant: true, compute_dtype: float32}
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..quant.primitives import sqnr_db
from .base import FLOATS, Context, PassConfig, State, register_pass, require_packages

__all__ = ["NF4_LEVELS", "nf4_reference", "nf4_quantize", "nf4_dequantize", "import_bnb", "to_linear4bit", "linear4bit_kinds",
           "ComputeDtype", "NF4Config", "BLOCKSIZES"]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

# The 16 NF4 levels of QLoRA (appendix E; bitsandbytes' `get_4bit_type("nf4")`), ascending.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020725250244,
    0.24611230194568634, 0.33791524171447754, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])


# ------------------------------------------------------------------------------------------------
# the math: a plain-PyTorch reference, and the bitsandbytes calls
# ------------------------------------------------------------------------------------------------

def nf4_reference(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Fake-quantize `w` to NF4 without double quantization, in plain PyTorch (the test oracle).

    Args: w (N, K) float, with N * K divisible by `blocksize`.
    Returns: (N, K) float32, every value ``level * absmax`` of its flat block.
    """
    flat = w.float().reshape(-1, blocksize)                        # (N*K/blocksize, blocksize)
    absmax = flat.abs().amax(dim=1, keepdim=True).clamp(min=1e-38)
    x = (flat / absmax).clamp(-1, 1)
    mid = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2                   # decision boundaries between levels
    return (NF4_LEVELS[torch.bucketize(x, mid)] * absmax).reshape(w.shape)


def import_bnb():
    """bitsandbytes, imported without its import-time warning about an optional hub kernel for the
    CPU bf16 inference path, which `to_linear4bit` turns off anyway."""
    import logging
    lg = logging.getLogger("bitsandbytes")
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    finally:
        lg.setLevel(level)
    return bitsandbytes


def nf4_quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True):
    """bitsandbytes NF4: (N, K) float -> (packed uint8 (N*K/2, 1), QuantState)."""
    bnbF = import_bnb().functional
    return bnbF.quantize_4bit(w.contiguous().float(), blocksize=blocksize, compress_statistics=double_quant,
                              quant_type="nf4")


def nf4_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes NF4 back to the (N, K) float32 weight it stands for."""
    bnbF = import_bnb().functional
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError("this Linear4bit was repacked for bitsandbytes' CPU bf16 inference kernel; "
                         "layers made by the nf4 pass never are")
    return bnbF.dequantize_4bit(packed, state).float()


def linear4bit_kinds() -> tuple[type, ...]:
    """The module types that hold an NF4 base weight (bitsandbytes' Linear4bit)."""
    bnb = import_bnb()
    return (bnb.nn.Linear4bit,)


def to_linear4bit(linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                  compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` holding `linear`'s weight in NF4; the bias stays as it is."""
    bnb = import_bnb()
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type="nf4",
                          device="meta")
    w = linear.weight.data
    # Params4bit quantizes when moved to a real device (bitsandbytes' documented route).
    q.weight = bnb.nn.Params4bit(w, requires_grad=False, blocksize=blocksize, compress_statistics=double_quant,
                                 quant_type="nf4", module=q).to(w.device)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    # On AVX512-BF16 CPUs, Linear4bit repacks its weight on the first eval-mode no-grad forward into a
    # layout for a bf16 kernel: activations go through bf16 and the absmax is rounded to bf16 (its
    # inverse re-quantizes it). The model would then compute differently in evaluation and training
    # and its stored state would change; keep the dequantize-then-matmul path in `compute_dtype`.
    q.support_avx512bf16_for_cpu = False
    q.train(linear.training)
    return q


# ------------------------------------------------------------------------------------------------
# wiring
# ------------------------------------------------------------------------------------------------

class ComputeDtype(str, enum.Enum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"

    @property
    def torch(self) -> torch.dtype:
        return getattr(torch, self.value)


@register_pass("nf4")
@dataclass(frozen=True)
class NF4Config(PassConfig):
    """bitsandbytes NF4 with optional double quantization; see the module docstring for a sample recipe.

    The result has no checkpoint format of its own: follow this pass with ``lora`` (the adapter is
    saved and the base is re-made from the original weights on load), or keep it in memory.
    """
    accepts = FLOATS

    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: ComputeDtype = ComputeDtype.FLOAT32

    def __post_init__(self):
        super().__post_init__()
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"nf4.blocksize={self.blocksize!r} is not supported; allowed: {list(BLOCKSIZES)}")
        self.check_bools("double_quant")
        try:
            object.__setattr__(self, "compute_dtype", ComputeDtype(self.compute_dtype))
        except ValueError:
            raise ValueError(f"nf4.compute_dtype={self.compute_dtype!r} is not supported; allowed: "
                             f"{[d.value for d in ComputeDtype]}") from None

    def produces(self, state: State) -> State:
        return State.NF4

    def check(self, model: nn.Module, ctx: Context) -> None:
        require_packages("the nf4 pass", "bitsandbytes")
        mods = self.modules(model)
        if not mods:
            raise ValueError(f"nf4: no Linear layer matches targets={list(self.targets)} minus ignore={list(self.ignore)}")
        self.check_shapes({n: (m.in_features, m.out_features) for n, m in mods.items()})

    def check_shapes(self, shapes: dict[str, tuple[int, int]]) -> None:
        shapes = {n: shapes[n] for n in self.targeted(shapes)}
        bad = {n: k for n, (k, _) in shapes.items() if k % self.blocksize}
        if bad:
            widths = sorted({k for k, _ in shapes.values()})
            ok = [b for b in BLOCKSIZES if all(w % b == 0 for w in widths)]
            shown = ", ".join(f"{n} (in_features={k})" for n, k in list(bad.items())[:4])
            more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
            raise ValueError(f"nf4.blocksize={self.blocksize} does not divide in_features of {len(bad)} layers: "
                             f"{shown}{more} (bitsandbytes' CPU kernel needs whole blocks per row); "
                             f"block sizes that work here: {ok}")

    @torch.no_grad()
    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        mods = self.modules(model)
        for name, lin in tqdm(mods.items(), desc=f"nf4 b{self.blocksize}", unit="layer", disable=not ctx.progress):
            t0 = time.perf_counter()
            q = to_linear4bit(lin, self.blocksize, self.double_quant, self.compute_dtype.torch)
            w_hat = nf4_dequantize(q.weight.data, q.weight.quant_state)
            model.set_submodule(name, q)
            ctx.record(name, sqnr_db=round(sqnr_db(lin.weight.data, w_hat), 3),
                       seconds=round(time.perf_counter() - t0, 4))
        # transformers marks bitsandbytes-quantized models this way; peft reads it to wrap Linear4bit
        # layers with its 4-bit-aware LoRA layer.
        model.is_loaded_in_4bit = True
        return model
