"""Distillation as a pass of its own: a short training run in which the compressed student learns
to match a teacher (by default the original float model), after any other pass.

What trains (`trainable`, keywords and regexes, combined):

* ``float``: the weights and biases of every float Linear left in the student (targets/ignore
  choose them; the tied head and the embeddings are ignored by default) and every norm. A pruned
  layer (`SparseLinear`) trains its kept values only (`_Kept`): its zeros are not parameters, so
  50% stays exactly 50%, 2:4 stays 2:4, and its gradient and optimizer state are half the size.
  Structurally pruned and low-rank layers keep their shapes.
* ``norms``: the weights of the normalization layers only.
* ``scales``: the per-group scales of the integer-quantized layers, as the ``peqa`` pass trains them
  (`peqa.swap_in_scale_tuned`): the integer codes stay, the checkpoint keeps its GPTQ layout.
* anything else is a regex over parameter names (``model.layers.*.mlp.down_proj.weight``).

The loss (`compressor.kd`): ``kl`` x a divergence (``forward``, ``reverse`` or ``js``) at
``temperature``, + ``ce`` x next-token cross-entropy, + ``hidden`` x the relative MSE of the
outputs of the decoder blocks ``hidden_layers``. With ``top_k`` > 0 the teacher runs once before
training over every window the run will see and keeps its top-k log-probabilities and tail mass,
and then leaves memory; ``top_k: 0`` runs it at every step on the full vocabulary.

The teacher is ``original`` (the uncompressed model the recipe started from) or the path of a
model or compressed checkpoint with the same vocabulary. It runs under `torch.inference_mode`,
in bf16 when ``autocast: bfloat16``. Training state goes to the work directory like ``lora``'s;
``compress --resume`` continues exactly. compression.json records the loss curve and the tokens.

Sample recipe (after structured pruning)::

    passes:
      - prune-structured: {mlp: 0.25}
      - distill: {trainable: [float], steps: 300, lr: 1.0e-4, batch_size: 4, seqlen: 256, top_k: 64}
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .. import kd
from ..nn.qlinear import QuantLinear
from ..nn.sparse import SparseLinear
from .base import FLOATS, Context, State, register_pass, select_linears
from .peqa import PEQAConfig, swap_back, swap_in_scale_tuned
from .training import Teacher, TrainingConfig, check_enum

__all__ = ["DistillConfig", "trainable_parameters", "KEYWORDS"]

KEYWORDS = ("float", "norms", "scales")


def trainable_parameters(model: nn.Module, spec: tuple[str, ...], targets, ignore) -> dict[str, nn.Parameter]:
    """{name: parameter} that `spec` (keywords and regexes, see the module docstring) selects in
    `model`, after `swap_in_scale_tuned` for ``scales``. Does not change requires_grad."""
    names = dict(model.named_parameters())
    ids = {id(p): n for n, p in names.items()}
    out: dict[str, nn.Parameter] = {}
    norms = PEQAConfig.norm_weights(model)
    for item in spec:
        if item in ("float", "norms"):
            out.update({ids[id(p)]: p for p in norms})
        if item == "float":
            for n, m in select_linears(model, targets, ignore).items():
                out.update({f"{n}.{k}": p for k, p in m.named_parameters(recurse=False)})
        elif item == "scales":
            from .peqa import ScaleTunedLinear
            picked = select_linears(model, targets, ignore, kinds=(ScaleTunedLinear,))
            out.update({f"{n}.log_gain": m.log_gain for n, m in picked.items()})
        elif item not in KEYWORDS:
            rx = re.compile(item)
            out.update({n: p for n, p in names.items() if rx.search(n)})
    return out


class _Kept(nn.Module):
    """Parametrization of a pruned layer's weight by its kept values alone: ``weight`` is the dense
    (out, in) matrix with `values` (nnz,) at the mask's positions (row-major) and zeros elsewhere.
    The pruned weights are not parameters at all, so they stay exactly zero, and the gradient and
    AdamW's two moments are nnz long: half the memory at 50%, for the same updates. The dense weight
    is built at each forward (and again when the backward pass recomputes the block): `index_put`
    with a bool mask, which on CPU is 1.7x faster than `masked_scatter` and 3x faster than unpacking
    a bit mask first."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", weight != 0, persistent=False)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(self.mask.shape).index_put((self.mask,), values)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight[self.mask]


def _train_kept_values(layer: SparseLinear) -> nn.Parameter:
    """Parametrize `layer.weight` by its kept values (`_Kept`); returns the new trainable parameter."""
    from torch.nn.utils import parametrize
    parametrize.register_parametrization(layer, "weight", _Kept(layer.weight.detach()), unsafe=True)
    values = layer.parametrizations.weight.original
    values.requires_grad_(True)
    return values


def _seal(layer: SparseLinear) -> None:
    """Back to a plain dense weight, its kept values rounded to fp16 (their stored form) without
    losing any to zero: a kept weight that would round to 0 is stored as +-2^-24, so the mask, and
    the sparsity, hold exactly."""
    from torch.nn.utils import parametrize
    mask = layer.parametrizations.weight[0].mask
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    with torch.no_grad():
        w = layer.weight.mul_(mask).to(torch.float16)
        tiny = torch.full_like(w, 2.0 ** -24) * torch.where(layer.weight < 0, -1.0, 1.0).to(w.dtype)
        w = torch.where(mask & (w == 0), tiny, w)
        layer.weight.copy_(w.to(layer.weight.dtype))
    layer.weight.requires_grad_(False)


@register_pass("distill")
@dataclass(frozen=True)
class DistillConfig(TrainingConfig):
    """Distillation after any pass; see the module docstring. The training fields (steps, lr, warmup,
    batch_size, seqlen, seed, temperature, checkpoint_every, autocast) are `TrainingConfig`'s.

    trainable: keywords ``float`` / ``norms`` / ``scales`` and regexes over parameter names.
    teacher: 'original', or the path of a model (HF directory, .gguf, compressed checkpoint).
    kl, divergence, ce, hidden, hidden_layers: the loss terms and their weights (`compressor.kd`).
    top_k: cache the teacher's top-k log-probs once (0: run it at every step on the full vocabulary).
    chunk: positions per output-head call.
    recompute: what the decoder blocks keep for backward (`kd.Recompute`): ``selective`` (default)
    keeps the matmul outputs and recomputes the rest, ``full`` keeps only block inputs, ``none`` all.
    """
    accepts = FLOATS | {State.INT, State.NF4}

    trainable: tuple[str, ...] = ("float",)
    lr: float = 1e-4
    kl: float = 1.0
    divergence: kd.Divergence = kd.Divergence.FORWARD
    ce: float = 0.0
    hidden: float = 0.0
    hidden_layers: tuple[int, ...] = ()
    top_k: int = 64
    chunk: int = 256
    recompute: kd.Recompute = kd.Recompute.SELECTIVE

    def __post_init__(self):
        super().__post_init__()
        t = (self.trainable,) if isinstance(self.trainable, str) else tuple(self.trainable or ())
        if not t:
            raise ValueError(f"distill.trainable is empty; give keywords {list(KEYWORDS)} or parameter-name regexes")
        for item in t:
            if not isinstance(item, str):
                raise ValueError(f"distill.trainable: {item!r} is not a keyword {list(KEYWORDS)} or a regex")
            if item not in KEYWORDS:
                try:
                    re.compile(item)
                except re.error as e:
                    raise ValueError(f"distill.trainable: {item!r} is neither a keyword {list(KEYWORDS)} "
                                     f"nor a valid regex ({e})") from None
        object.__setattr__(self, "trainable", t)
        object.__setattr__(self, "divergence", check_enum(kd.Divergence, self.divergence, "distill.divergence"))
        object.__setattr__(self, "recompute", check_enum(kd.Recompute, self.recompute, "distill.recompute"))
        hl = tuple(self.hidden_layers or ())
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in hl):
            raise ValueError(f"distill.hidden_layers={list(hl)!r} must be decoder block numbers (integers)")
        object.__setattr__(self, "hidden_layers", hl)
        for f in ("kl", "ce", "hidden"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ValueError(f"distill.{f}={v!r} must be a weight >= 0")
            object.__setattr__(self, f, float(v))
        if self.kl + self.ce + self.hidden == 0:
            raise ValueError("distill: kl, ce and hidden are all 0; give at least one loss a positive weight")
        if self.hidden > 0 and not hl:
            raise ValueError("distill.hidden > 0 needs hidden_layers (decoder block numbers, e.g. [10, 20])")
        if self.teacher is None and (self.kl > 0 or self.hidden > 0):
            raise ValueError("distill.teacher=null leaves nothing for kl / hidden to match; "
                             "use teacher: original, or kl: 0, hidden: 0 with ce > 0")

    def _teacher(self, value: Any) -> Any:
        if value is None or value == Teacher.ORIGINAL.value or isinstance(value, Teacher):
            return super()._teacher(value)
        if not isinstance(value, (str, Path)) or not str(value):
            raise ValueError(f"distill.teacher={value!r}: give 'original' or the path of a model")
        return str(value)

    def _int_fields(self):
        return (*super()._int_fields(), ("top_k", 0), ("chunk", 1))

    @property
    def loss(self) -> kd.Loss:
        return kd.Loss(kl=self.kl, kind=self.divergence, temperature=self.temperature, ce=self.ce,
                       hidden=self.hidden, hidden_layers=self.hidden_layers, chunk=self.chunk,
                       recompute=self.recompute)

    @property
    def teacher_path(self) -> str | None:
        return None if self.teacher is None or isinstance(self.teacher, Teacher) else self.teacher

    # --- checks, before any training -----------------------------------------------------
    def _teacher_config(self) -> dict[str, Any] | None:
        """vocab_size and num_hidden_layers of a path teacher, from its config.json (None if it has none)."""
        p = Path(self.teacher_path)
        if not p.exists():
            raise ValueError(f"distill.teacher={self.teacher_path!r}: no such file or directory")
        cfg = p / "config.json"
        return json.loads(cfg.read_text()) if p.is_dir() and cfg.is_file() else None

    def check(self, model: nn.Module, ctx: Context) -> None:
        super().check(model, ctx)
        blocks = len(kd.decoder_blocks(model)) if self.hidden_layers else 0
        bad = [i for i in self.hidden_layers if not 0 <= i < blocks]
        if bad:
            raise ValueError(f"distill.hidden_layers: {bad} do not exist; the student has decoder blocks 0..{blocks - 1}")
        if not self._selects(model):
            raise ValueError(f"distill.trainable={list(self.trainable)} matches no parameter of this model "
                             f"(after {' + '.join(ctx.applied) or 'no pass'}); 'scales' needs an integer-quantized "
                             f"model, 'float' float Linears or norms")
        if self.teacher_path is not None:
            cfg = self._teacher_config()
            vocab = kd.split_head(model)[1].out_features
            if cfg is not None and cfg.get("vocab_size") not in (None, vocab):
                raise ValueError(f"distill.teacher={self.teacher_path!r} has a vocabulary of {cfg['vocab_size']} "
                                 f"tokens, the student {vocab}; the teacher must share the student's tokenizer")

    def _selects(self, model: nn.Module) -> bool:
        """Whether `trainable` selects anything, without swapping layers."""
        if "scales" in self.trainable and select_linears(model, self.targets, self.ignore, kinds=(QuantLinear,)):
            return True
        return bool(trainable_parameters(model, self.trainable, self.targets, self.ignore))

    # --- the run ----------------------------------------------------------------------------
    def _load_teacher(self, ctx: Context) -> nn.Module:
        if self.teacher_path is None:
            return ctx.original()
        from ..checkpoint import is_checkpoint
        if is_checkpoint(self.teacher_path):
            import compressor
            return compressor.load(self.teacher_path, for_inference=False)
        from ..models import load_hf
        return load_hf(self.teacher_path, private=False)[0]

    def apply(self, model: nn.Module, ctx: Context) -> nn.Module:
        ctx.measure(model, " + ".join(ctx.applied) or "before distill")
        model.requires_grad_(False)
        swapped = swap_in_scale_tuned(model, trained=set()) if any(
            isinstance(m, QuantLinear) for m in model.modules()) else {}
        params = trainable_parameters(model, self.trainable, self.targets, self.ignore)
        scales = {n.removesuffix(".log_gain") for n in params if n.endswith(".log_gain")}
        by_id = {id(p): n for n, p in params.items()}
        sparse = [m for m in model.modules() if isinstance(m, SparseLinear) and id(m.weight) in by_id]
        for p in params.values():
            p.requires_grad_(True)
        for m in sparse:                     # a pruned layer trains its kept values only
            name = by_id[id(m.weight)]
            params[name] = _train_kept_values(m)
        teacher_fn = None
        if self.loss.needs_teacher:
            teacher_fn = self._teacher_once(ctx, model)
        extra = self._projections(model, ctx) if self.hidden_layers and self.hidden > 0 else None
        plist = list(params.values()) + (list(extra.parameters()) if extra is not None else [])
        self.fit(model, plist, ctx, loss=self.loss, top_k=self.top_k, extra=extra, teacher=teacher_fn)
        model.requires_grad_(False)
        for m in sparse:
            _seal(m)
        if swapped:
            swap_back(model, swapped, ctx, trained=scales)
        log_ = ctx.training[self.name]
        log_["trainable_parameters"] = sum(p.numel() for p in plist)
        ctx.measure(model, " + ".join([*ctx.applied, self.name]))
        return model

    def _teacher_once(self, ctx: Context, student: nn.Module):
        """A callable that loads the teacher, checks it against the student, and hands it over once
        (the caller's reference is the only one, so the teacher is freed when the caller drops it)."""
        def load():
            t = self._load_teacher(ctx)
            tv, sv = kd.split_head(t)[1].out_features, kd.split_head(student)[1].out_features
            if tv != sv:
                raise ValueError(f"distill.teacher: vocabulary of {tv} tokens, the student's {sv}; "
                                 f"the teacher must share the student's tokenizer")
            tb = len(kd.decoder_blocks(t)) if self.hidden_layers else 0
            bad = [i for i in self.hidden_layers if not 0 <= i < tb]
            if bad:
                raise ValueError(f"distill.hidden_layers: {bad} do not exist in the teacher (blocks 0..{tb - 1})")
            return t
        return load

    def _projections(self, model: nn.Module, ctx: Context) -> nn.ModuleDict | None:
        """A trainable Linear (identity-initialised where it can be) for each hidden layer whose
        student width differs from the teacher's; None when all widths agree."""
        s_width = model.config.hidden_size
        # The original's width is the student's: no pass changes the hidden size (width pruning
        # removes MLP channels and heads, not residual-stream channels).
        t_width = (self._teacher_config() or {}).get("hidden_size", s_width) if self.teacher_path else s_width
        if s_width == t_width:
            return None
        proj = nn.ModuleDict()
        for i in self.hidden_layers:
            lin = nn.Linear(s_width, t_width, bias=False)
            with torch.no_grad():
                lin.weight.zero_()
                n = min(s_width, t_width)
                lin.weight[:n, :n] = torch.eye(n)
            proj[str(i)] = lin
        return proj
