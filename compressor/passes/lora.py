"""LoRA: low-rank adapters trained on a frozen base (QLoRA when the base is NF4), through peft.

Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang, Chen. "LoRA: Low-Rank Adaptation of Large Language
Models", ICLR 2022 (arXiv:2106.09685). Dettmers, Pagnoni, Holtzman, Zettlemoyer. "QLoRA: Efficient
Finetuning of Quantized LLMs", NeurIPS 2023 (arXiv:2305.14314).

Each targeted Linear ``y = W x`` gets a trainable path, ``y = W x + (alpha / r) B A x`` with A (r, K)
and B (N, r); B starts at zero, so training starts from the base model. Only A and B train, on
windows of `seqlen` tokens from the training text, with one of two losses (`compressor.train`):

* ``teacher: original`` (default): distillation. The loss is ``T^2 KL(p_teacher || p_student)`` per
  token, both softmaxes at temperature T, against the logits of the uncompressed float model
  (Hinton, Vinyals, Dean 2015). It needs no labels and aims at exactly what quantization lost.
* ``teacher: null``: next-token cross-entropy on the training text.

``save: adapter`` writes peft's adapter directory (``PeftModel.from_pretrained`` loads it onto the
NF4 base). ``save: merged`` dequantizes each base weight, adds ``(alpha / r) B A`` in float and gives
plain Linears back; a 4-bit base cannot take the merge in place (peft #2501), so the recipe then
names the quantization pass that re-quantizes the merged weights.

Training state (adapters, AdamW and scheduler state, RNG, step, loss curve) goes to
``ctx.work_dir`` every `checkpoint_every` steps; ``compress --resume`` continues from it exactly
(see `compressor.train`; the training fields are shared with other training passes in `training.py`).

Sample recipe::

    passes:
      - nf4: {blocksize: 64, double_quant: true}
      - lora: {r: 16, alpha: 32, steps: 64, lr: 1.0e-3, batch_size: 4, seqlen: 256,
               teacher: original, temperature: 1.0, save: adapter, checkpoint_every: 10}
"""
from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from .base import FLOAT_LINEARS, FLOATS, Context, State, register_pass, require_packages, select_linears
from .training import TrainingConfig, check_enum

__all__ = ["merge_lora_weight", "merge_to_float", "SaveAs", "LoRAConfig"]


# ------------------------------------------------------------------------------------------------
# the math: pure tensor functions
# ------------------------------------------------------------------------------------------------

def merge_lora_weight(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W + scaling * B @ A``: weight (N, K), A (r, K), B (N, r) -> (N, K) float32."""
    return weight.float() + scaling * (B.float() @ A.float())


# ------------------------------------------------------------------------------------------------
# merging a trained peft model back into plain float Linears
# ------------------------------------------------------------------------------------------------

def _float_weight(layer: nn.Module) -> torch.Tensor:
    """(N, K) float32 weight of a float Linear or of a bitsandbytes Linear4bit (dequantized)."""
    if type(layer) is nn.Linear:
        return layer.weight.data.float()
    from .nf4 import linear4bit_kinds, nf4_dequantize
    if isinstance(layer, linear4bit_kinds()):
        return nf4_dequantize(layer.weight.data, layer.weight.quant_state)
    raise TypeError(f"cannot read a float weight from {type(layer).__name__}")


def _as_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    N, K = weight.shape
    lin = nn.Linear(K, N, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
    return lin


@torch.no_grad()
def merge_to_float(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base weight and dequantize every NF4 layer: the underlying
    transformers model comes back with plain float ``nn.Linear`` layers only.

    For each adapted layer: ``W' = dequantize(W_nf4) + (alpha / r) B A`` (`merge_lora_weight`).
    `model` is a peft model (or a model with peft layers injected); it is consumed.
    """
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name, mod in list(base.named_modules()):
        if not isinstance(mod, LoraLayer):
            continue
        layer = mod.get_base_layer()
        W = _float_weight(layer)
        for a in mod.active_adapters:
            if a in mod.lora_A:
                W = merge_lora_weight(W, mod.lora_A[a].weight, mod.lora_B[a].weight, mod.scaling[a])
        base.set_submodule(name, _as_linear(W, layer.bias))
    try:
        from .nf4 import linear4bit_kinds
        kinds = linear4bit_kinds()
    except ImportError:
        kinds = ()
    for name, mod in list(base.named_modules()):
        if kinds and isinstance(mod, kinds):
            base.set_submodule(name, _as_linear(_float_weight(mod), mod.bias))
    if getattr(base, "is_loaded_in_4bit", False):
        base.is_loaded_in_4bit = False
    return base


# ------------------------------------------------------------------------------------------------
# wiring
# ------------------------------------------------------------------------------------------------

class SaveAs(str, enum.Enum):
    ADAPTER = "adapter"
    MERGED = "merged"


@register_pass("lora")
@dataclass(frozen=True)
class LoRAConfig(TrainingConfig):
    """LoRA adapters trained with AdamW; see the module docstring for the sample recipe.

    r, alpha, dropout: adapter rank, scale numerator (scaling = alpha / r) and input dropout.
    targets / ignore: regexes choosing the Linears (float or NF4) that get adapters.
    save: 'adapter' (peft directory) or 'merged' (float Linears, to be re-quantized by the next pass).
    The training fields (steps, lr, teacher, ...) are `TrainingConfig`'s.
    """
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    save: SaveAs = SaveAs.ADAPTER

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "save", check_enum(SaveAs, self.save, "lora.save"))
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) or not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout={self.dropout!r} must be in [0, 1)")
        object.__setattr__(self, "dropout", float(self.dropout))

    def _int_fields(self):
        return (*super()._int_fields(), ("r", 1))

    def _positive_fields(self):
        return (*super()._positive_fields(), "alpha")

    accepts = FLOATS | {State.NF4}

    def produces(self, state: State) -> State:
        return State.ADAPTER if self.save is SaveAs.ADAPTER else State.FLOAT

    def adapted(self, model: nn.Module) -> dict[str, nn.Module]:
        """The layers that get adapters: float Linears and NF4 Linear4bit layers matching targets/ignore."""
        try:
            from .nf4 import linear4bit_kinds
            kinds = (*FLOAT_LINEARS, *linear4bit_kinds())
        except ImportError:
            kinds = FLOAT_LINEARS
        return select_linears(model, self.targets, self.ignore, kinds=kinds)

    def check(self, model: nn.Module, ctx: Context) -> None:
        require_packages("the lora pass", "peft", "bitsandbytes")
        super().check(model, ctx)
        if not self.adapted(model):
            raise ValueError(f"lora: no Linear layer matches targets={list(self.targets)} minus ignore={list(self.ignore)}")

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        from .nf4 import import_bnb
        import_bnb()                                                # before peft imports it, quietly
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
        from peft.tuners.lora import LoraLayer

        targets = list(self.adapted(model))
        if not targets:
            raise ValueError("lora: no float or NF4 Linear left to adapt (integer-quantized layers take no "
                             "adapters; the peqa pass trains their scales instead)")
        if ctx.applied:
            ctx.measure(model, " + ".join(ctx.applied))           # the base before training, e.g. 'nf4'
        torch.manual_seed(self.seed)                                # adapter initialisation
        # An explicit list of full names: peft attaches exactly these layers and no others.
        pcfg = PeftLoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
                              bias="none", task_type="CAUSAL_LM")
        with warnings.catch_warnings():                             # transformers' deprecation notes, via peft
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(model, pcfg)
        attached = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                          if isinstance(m, LoraLayer))
        if attached != sorted(targets):
            raise RuntimeError(f"lora: peft attached adapters to {len(attached)} layers, expected {len(targets)}")
        self.fit(model, [p for p in model.parameters() if p.requires_grad], ctx)
        ctx.measure(model, " + ".join([*ctx.applied, self.name]))
        if self.save is SaveAs.MERGED:
            return merge_to_float(model)
        return model
