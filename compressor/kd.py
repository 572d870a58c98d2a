"""The distillation objective, computed chunk by chunk over positions.

One training step of every pass that trains (``lora``, ``peqa``, ``distill``) goes through `step`:

* The student's decoder body runs once; its output head runs on `Loss.chunk` positions at a time,
  each chunk's loss is back-propagated into the head's input at once and freed, and the body is
  back-propagated last. So the (positions, vocab) logits never exist whole: at 4 x 256 tokens over
  SmolLM2's 49,152-token vocabulary they are 200 MB in fp32, and their softmax, log-softmax and
  gradient copies were most of a QLoRA step's 7.3 GB peak.
* The terms, each with its weight (`Loss`):
    - ``kl``: a divergence between the teacher's and the student's next-token distributions at
      temperature T, times T^2 (Hinton et al. 2015): ``forward`` KL(p_t || p_s), ``reverse``
      KL(p_s || p_t), or ``js`` (Jensen-Shannon);
    - ``ce``: next-token cross-entropy on the training text;
    - ``hidden``: relative MSE ``|h_s - h_t|^2 / |h_t|^2`` between chosen decoder blocks' outputs,
      after a trainable projection when the widths differ.
* The teacher either runs live at every step (the full distribution), or once, before training,
  on every window the run will visit (`teacher_targets`): it keeps, per position, the top-k
  log-probabilities and the tail's mass. The divergence is then taken over k + 1 buckets, the k
  tokens and "everything else", for the student as well (its tail is the logsumexp of the rest).
  At k = 64 a position costs 516 bytes instead of 196 KB, and the teacher can leave memory before
  the student trains.
"""
from __future__ import annotations

import enum
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["Divergence", "Recompute", "divergence", "bucket_logprobs", "Loss", "TeacherTargets", "teacher_targets",
           "split_head", "decoder_blocks", "recomputed", "step"]

TAIL_FLOOR = -80.0          # log-prob floor of an empty tail bucket (exp(-80) ~ 2e-35), keeps logs finite


class Recompute(str, enum.Enum):
    """What the student's decoder blocks keep for the backward pass (activation checkpointing)."""
    NONE = "none"           # everything autograd saves: about 1.1 GB for SmolLM2 at 4 x 256 tokens in bf16
    SELECTIVE = "selective" # the matmul and attention outputs; casts, norms and activations are recomputed
    FULL = "full"           # only each block's input; the whole block runs again in the backward pass


class Divergence(str, enum.Enum):
    FORWARD = "forward"     # KL(p_t || p_s): mass-covering, the classic distillation loss
    REVERSE = "reverse"     # KL(p_s || p_t): mode-seeking (MiniLLM)
    JS = "js"               # Jensen-Shannon, symmetric and bounded


# ------------------------------------------------------------------------------------------------
# the math: pure tensor functions
# ------------------------------------------------------------------------------------------------

def _kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """sum_j p_j (log p_j - log q_j) over the last dim, 0 where p_j = 0."""
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)


def divergence(ls: torch.Tensor, lt: torch.Tensor, kind: Divergence) -> torch.Tensor:
    """Per-position divergence between two distributions over the same buckets.

    Args: ls, lt (..., n) student and teacher log-probabilities. Returns (...,).
    """
    if kind is Divergence.FORWARD:
        return _kl(lt, ls)
    if kind is Divergence.REVERSE:
        return _kl(ls, lt)
    lm = torch.logaddexp(ls, lt) - math.log(2.0)
    return 0.5 * _kl(lt, lm) + 0.5 * _kl(ls, lm)


def bucket_logprobs(z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of softmax(z) over the buckets ``idx[:, 0], ..., idx[:, k-1], rest``.

    Args: z (c, V) float32 logits (already divided by T); idx (c, k) int64 token ids. Returns (c, k + 1).
    """
    lz = torch.logsumexp(z, dim=-1, keepdim=True)
    top = z.gather(1, idx) - lz
    rest = torch.logsumexp(z.scatter(1, idx, float("-inf")), dim=-1, keepdim=True) - lz
    return torch.cat([top, rest.clamp_min(TAIL_FLOOR)], dim=1)


@dataclass(frozen=True)
class Loss:
    """The weighted terms of one step (see the module docstring). chunk: positions per head call."""
    kl: float = 1.0
    kind: Divergence = Divergence.FORWARD
    temperature: float = 1.0
    ce: float = 0.0
    hidden: float = 0.0
    hidden_layers: tuple[int, ...] = ()
    chunk: int = 256
    recompute: Recompute = Recompute.SELECTIVE

    @property
    def needs_teacher(self) -> bool:
        return self.kl > 0 or (self.hidden > 0 and bool(self.hidden_layers))


# ------------------------------------------------------------------------------------------------
# model anatomy: the body, the head, the blocks
# ------------------------------------------------------------------------------------------------

def _unwrap(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model      # peft


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(body, head) of a causal LM: ``logits == head(body(ids).last_hidden_state)`` (tested for llama)."""
    m = _unwrap(model)
    body = m.get_decoder() if hasattr(m, "get_decoder") else getattr(m, "model", None)
    head = m.get_output_embeddings()
    if body is None or head is None:
        raise ValueError(f"{type(m).__name__}: cannot find the decoder body and the output head for distillation")
    return body, head


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    body, _ = split_head(model)
    blocks = getattr(body, "layers", None) or getattr(body, "h", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"{type(body).__name__}: no list of decoder blocks (.layers) for hidden-state distillation")
    return blocks


_SAVED_OPS = None


def _keep_matmuls(ctx, op, *args, **kwargs):
    """Selective-checkpoint policy: keep what the matmuls and attention computed, recompute the rest."""
    global _SAVED_OPS
    from torch.utils.checkpoint import CheckpointPolicy
    if _SAVED_OPS is None:
        aten = torch.ops.aten
        _SAVED_OPS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
                      *(getattr(aten, n).default for n in ("_scaled_dot_product_flash_attention_for_cpu",
                                                           "_scaled_dot_product_attention_math") if hasattr(aten, n))}
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _blocks_or_none(model: nn.Module) -> nn.ModuleList | None:
    try:
        return decoder_blocks(model)
    except ValueError:
        return None


@contextmanager
def recomputed(blocks: nn.ModuleList | None, how: Recompute):
    """Inside the context, each block's forward runs under activation checkpointing (`how`); the
    backward pass that follows, even after the context has ended, recomputes what was not kept.
    Forward hooks on the blocks still see their outputs. Without grad, or with NONE, it does nothing."""
    if blocks is None or how is Recompute.NONE or not torch.is_grad_enabled():
        yield
        return
    import functools
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts
    context_fn = (functools.partial(create_selective_checkpoint_contexts, _keep_matmuls)
                  if how is Recompute.SELECTIVE else None)
    for b in blocks:
        fwd = b.forward
        kw = {"context_fn": context_fn} if context_fn is not None else {}
        b.forward = functools.wraps(fwd)(
            lambda *a, _f=fwd, **k: checkpoint(_f, *a, use_reentrant=False, **kw, **k))
    try:
        yield
    finally:
        for b in blocks:
            del b.forward


@contextmanager
def _capture(blocks: nn.ModuleList, layers: tuple[int, ...]):
    """{layer: output tensor of that block} filled during the forward inside the context."""
    got: dict[int, torch.Tensor] = {}
    hooks = [blocks[i].register_forward_hook(
        lambda mod, args, out, i=i: got.__setitem__(i, out[0] if isinstance(out, tuple) else out)) for i in layers]
    try:
        yield got
    finally:
        for h in hooks:
            h.remove()


# ------------------------------------------------------------------------------------------------
# the teacher's targets, computed once
# ------------------------------------------------------------------------------------------------

@dataclass
class TeacherTargets:
    """The teacher's side of the loss for the windows the run visits, one row per visited window:
    ``slot[w]`` is window w's row (-1 if the run never visits it), ``idx[row]`` (L, k) int32 the top-k
    token ids, ``logp[row]`` (L, k + 1) float32 their log-probabilities at temperature T and the
    tail's, ``hidden[i][row]`` (L, D) float32 the output of decoder block i."""
    idx: torch.Tensor
    logp: torch.Tensor
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    slot: torch.Tensor | None = None

    @property
    def have(self) -> torch.Tensor:
        """(n,) bool: which windows have targets."""
        return self.slot >= 0

    def rows(self, windows: torch.Tensor) -> torch.Tensor:
        """The rows of `windows` (B,); KeyError-like ValueError if one was never computed."""
        r = self.slot[windows]
        if bool((r < 0).any()):
            raise ValueError(f"no teacher targets for windows {windows[r < 0].tolist()}")
        return r

    def state(self) -> dict:
        return {"idx": self.idx, "logp": self.logp, "hidden": {str(k): v for k, v in self.hidden.items()},
                "slot": self.slot}

    @classmethod
    def from_state(cls, st: dict) -> "TeacherTargets":
        return cls(st["idx"], st["logp"], {int(k): v for k, v in st["hidden"].items()}, st["slot"])


@torch.inference_mode()
def teacher_targets(teacher: nn.Module, windows: torch.Tensor, visit: torch.Tensor, loss: Loss, k: int,
                    batch_size: int, autocast: torch.dtype | None = None, progress: bool = True) -> TeacherTargets:
    """Run `teacher` once over the windows ``windows[visit]`` (windows (n, L) int64; visit (m,) long,
    unique) and keep what `step` needs: top-k + tail log-probs, and the hidden states of
    ``loss.hidden_layers``."""
    n, L = windows.shape
    body, head = split_head(teacher)
    blocks = decoder_blocks(teacher) if loss.hidden_layers else None
    V = head.out_features
    k = min(k, V - 1)
    m = len(visit)
    idx = torch.zeros(m, L, k, dtype=torch.int32)
    logp = torch.zeros(m, L, k + 1)
    hidden: dict[int, torch.Tensor] = {}
    slot = torch.full((n,), -1, dtype=torch.int64)
    slot[visit] = torch.arange(m)
    for s in tqdm(range(0, m, batch_size), desc="teacher", unit="batch", disable=not progress):
        w, r = visit[s:s + batch_size], slice(s, s + batch_size)
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None), \
                (_capture(blocks, loss.hidden_layers) if blocks is not None else _nothing()) as got:
            h = body(input_ids=windows[w], use_cache=False).last_hidden_state           # (b, L, D)
            flat = h.reshape(-1, h.shape[-1])
            tops, lps = [], []
            for c in range(0, flat.shape[0], loss.chunk):
                z = head(flat[c:c + loss.chunk]).float() / loss.temperature              # (c, V)
                top = z.topk(k, dim=-1).indices
                tops.append(top)
                lps.append(bucket_logprobs(z, top))
        idx[r] = torch.cat(tops).view(len(w), L, k).to(torch.int32)
        logp[r] = torch.cat(lps).view(len(w), L, k + 1)
        for i, t in (got or {}).items():
            hidden.setdefault(i, torch.zeros(m, L, t.shape[-1]))[r] = t.float()
    return TeacherTargets(idx, logp, hidden, slot)


@contextmanager
def _nothing():
    yield None


# ------------------------------------------------------------------------------------------------
# one step: forward, the chunked loss, backward
# ------------------------------------------------------------------------------------------------

def step(model: nn.Module, ids: torch.Tensor, loss: Loss, *, teacher: nn.Module | None = None,
         targets: TeacherTargets | None = None, windows: torch.Tensor | None = None,
         projections: nn.ModuleDict | None = None, autocast: torch.dtype | None = None) -> float:
    """Forward `model` on ids (B, L), back-propagate `loss`, return its value (gradients accumulate).

    The teacher's side comes from `targets` (rows `windows` (B,) of the cache) or, without targets,
    from `teacher` run now on the full vocabulary. `projections[str(i)]` maps the student's block-i
    output to the teacher's width where they differ.
    """
    def amp():
        # no cast cache: each weight is used once per forward, and the cache would hold a bf16 copy
        # of every trainable weight until the forward ends
        return torch.autocast("cpu", dtype=autocast, enabled=autocast is not None, cache_enabled=False)

    B, L = ids.shape
    N, T = B * L, loss.temperature
    body, head = split_head(model)
    layers = loss.hidden_layers if loss.hidden > 0 else ()
    blocks = decoder_blocks(model) if layers else _blocks_or_none(model) if loss.recompute is not Recompute.NONE else None
    with amp(), (_capture(blocks, layers) if layers else _nothing()) as got, recomputed(blocks, loss.recompute):
        h = body(input_ids=ids, use_cache=False).last_hidden_state                   # (B, L, D)
    t_flat, t_hidden = None, {}
    if loss.needs_teacher and targets is None:
        with torch.inference_mode(), amp(), \
                (_capture(decoder_blocks(teacher), layers) if layers else _nothing()) as t_got:
            t_body, t_head = split_head(teacher)
            t_flat = t_body(input_ids=ids, use_cache=False).last_hidden_state.reshape(N, -1)
        t_flat = t_flat.clone()                                  # an ordinary tensor, usable in autograd
        t_hidden = {i: t.float().clone() for i, t in (t_got or {}).items()}
    elif targets is not None:
        slots = targets.rows(windows)                                 # (B,) rows of the cache
        t_hidden = {i: targets.hidden[i][slots] for i in layers}
    hd = h.detach().requires_grad_(True)
    flat = hd.reshape(N, -1)
    nxt = torch.cat([ids[:, 1:], torch.full((B, 1), -100, dtype=ids.dtype)], dim=1).reshape(N)  # -100: no target
    n_tgt = B * (L - 1)
    total = 0.0
    for c in range(0, N, loss.chunk):
        e = min(c + loss.chunk, N)
        with amp():
            z = head(flat[c:e])
        z = z.float()
        part = z.new_zeros(())
        if loss.kl > 0:
            zs = z / T if T != 1 else z
            if targets is not None:
                rows = slots.repeat_interleave(L)[c:e], torch.arange(c, e) % L
                top = targets.idx[rows].long()
                ls, lt = bucket_logprobs(zs, top), targets.logp[rows]
            else:
                with amp():
                    zt = t_head(t_flat[c:e])
                zt = zt.float()
                ls, lt = F.log_softmax(zs, dim=-1), F.log_softmax(zt / T if T != 1 else zt, dim=-1)
            part = part + loss.kl * T * T * divergence(ls, lt, loss.kind).sum() / N
        if loss.ce > 0:
            part = part + loss.ce * F.cross_entropy(z, nxt[c:e], ignore_index=-100, reduction="sum") / n_tgt
        if part.requires_grad:
            part.backward()
        total += float(part.detach())
    roots, grads = [h], [hd.grad if hd.grad is not None else torch.zeros_like(h)]
    if layers:
        mse = h.new_zeros((), dtype=torch.float32)
        for i in layers:
            s = got[i].float()
            if projections is not None and str(i) in projections:
                s = projections[str(i)](s)
            t = t_hidden[i]
            mse = mse + ((s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)) / len(layers)
        roots.append(loss.hidden * mse)
        grads.append(None)
        total += float(loss.hidden * mse.detach())
    if h.requires_grad:
        torch.autograd.backward(roots, grads)
    return total
