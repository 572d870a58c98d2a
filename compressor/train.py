"""Training loops for passes that train (``lora``, ``peqa``, ``distill``): reference losses, deterministic data order,
the learning-rate schedule, the loop itself, and a training state that is written atomically and
restored exactly after a crash.

Resume is exact rather than approximate. The batch of step s is a pure function of (seed, s); the
state holds the trainable weights, the optimizer and scheduler states and the RNG states as of the
end of a step. A resumed run therefore computes the same steps, bit for bit, as an uninterrupted
one with the same seed on the same machine and thread count.
"""
from __future__ import annotations

import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import kd
from .machine import release_memory

__all__ = ["distill_loss", "causal_lm_loss", "TokenWindows", "warmup_cosine", "rng_state", "set_rng_state",
           "save_state", "load_state", "train", "step_loss"]

log = logging.getLogger("compressor")

STATE_VERSION = 1


# ------------------------------------------------------------------------------------------------
# losses: pure tensor functions
# ------------------------------------------------------------------------------------------------

def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))``, mean over tokens (Hinton et al. 2015).

    Args: student, teacher (B, L, V) logits. T^2 keeps gradient sizes comparable across temperatures.
    """
    V = student.shape[-1]
    s, t = student.float().reshape(-1, V), teacher.float().reshape(-1, V)
    if temperature != 1:                       # (B * L, V) is large: skip two passes over it at T = 1
        s, t = s / temperature, t / temperature
    s, t = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def causal_lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, L, V) at position i predict ids (B, L) at i + 1."""
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, V), ids[:, 1:].reshape(-1))


# ------------------------------------------------------------------------------------------------
# data, schedule, state
# ------------------------------------------------------------------------------------------------

class TokenWindows:
    """Non-overlapping windows of `seqlen` tokens cut from a tokenized text, visited in a seeded random
    order, one epoch after another.

    `batch(step, batch_size)` depends only on (seed, step, batch_size): the data position needs no state.
    """

    def __init__(self, ids: torch.Tensor, seqlen: int, seed: int = 0):
        n = ids.numel() // seqlen
        if n < 1:
            raise ValueError(f"training text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
        self.windows = ids[:n * seqlen].reshape(n, seqlen)        # (n, seqlen) int64
        self.seed = seed
        self._orders: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.windows.shape[0]

    def order(self, epoch: int) -> torch.Tensor:
        """(n,) permutation of the windows for `epoch`."""
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders[epoch] = torch.randperm(len(self), generator=g)
        return self._orders[epoch]

    def indices(self, step: int, batch_size: int) -> torch.Tensor:
        """(batch_size,) int64: the numbers of the windows of step `step`."""
        n = len(self)
        return torch.stack([self.order(i // n)[i % n] for i in range(step * batch_size, (step + 1) * batch_size)])

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        """(batch_size, seqlen) int64: the windows of step `step`."""
        return self.windows[self.indices(step, batch_size)]


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """LR multiplier: linear warm-up over `warmup` steps, then cosine decay to `floor` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically: a temporary file beside it, flushed, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"version": STATE_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a state written by `save_state`; ValueError if it is unreadable or from another version."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file: torch raises several types
        raise ValueError(f"{path}: unreadable training state ({e.__class__.__name__}); "
                         f"pass --overwrite to start over") from None
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: training state version {state.get('version')!r}, this compressor reads "
                         f"{STATE_VERSION}; pass --overwrite to start over")
    return state


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------

def train(model: nn.Module, params: list[nn.Parameter], data: TokenWindows, *, steps: int, lr: float, warmup: int,
          batch_size: int, teacher: Callable[[], nn.Module] | None = None, temperature: float = 1.0,
          loss: kd.Loss | None = None, top_k: int = 0, extra: nn.Module | None = None,
          state_file: Path | None = None, checkpoint_every: int = 0, fingerprint: dict | None = None,
          resume: bool = False, progress: bool = True, desc: str = "train",
          autocast: torch.dtype | None = None) -> dict[str, Any]:
    """Train `params` of `model` with AdamW (warm-up, cosine decay to lr/10, gradient norm clipped to 1).

    Each step is `compressor.kd.step`: `loss` (default: forward KL at `temperature` against the
    model that `teacher()` returns, or next-token cross-entropy without a teacher), chunked over
    positions. `teacher()` is called only if there is a step left to run. With `top_k` > 0 the teacher
    runs once, before the first step, over every window the run visits and keeps its top-k
    log-probabilities and tail mass (`kd.teacher_targets`, saved beside `state_file`); it is then
    released, so teacher and student are not in memory together while the student trains.
    `extra` holds trainable modules outside `model` (the hidden-state projections, in a ModuleDict).
    With `state_file`, the state is saved every `checkpoint_every` steps and after the last one; with
    `resume` and an existing `state_file` whose `fingerprint` matches, training continues from it.
    With `autocast` (torch.bfloat16), both forwards run under ``torch.autocast('cpu', autocast)``;
    the loss is computed in fp32 from the (upcast) logits either way.
    Returns the loss curve and timings. `model` is left in eval mode.
    """
    if loss is None:
        loss = kd.Loss(temperature=temperature) if teacher is not None else kd.Loss(kl=0.0, ce=1.0)
    if loss.needs_teacher and teacher is None:
        raise ValueError("a distillation loss needs a teacher")
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if extra is not None:
        named.update({f"extra.{n}": p for n, p in extra.named_parameters()})
    # one parameter at a time: the multi-tensor (foreach) update allocates temporaries as large as all the
    # trainable parameters together (345 MB for SmolLM2's float Linears), for no speed gain at this size
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, warmup))
    step, losses, seconds = 0, [], 0.0
    if resume and state_file is not None and state_file.exists():
        st = load_state(state_file)
        if st["fingerprint"] != fingerprint:
            raise ValueError(f"{state_file} was written by a different recipe, model or training text; "
                             f"pass --overwrite (without --resume) to start over")
        with torch.no_grad():
            for n, t in st["trainable"].items():
                named[n].copy_(t)
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        set_rng_state(st["rng"])
        step, losses, seconds = st["step"], list(st["losses"]), st["seconds"]
        log.info("%s: resuming from step %d of %d (%s)", desc, step, steps, state_file)
    resumed_at = step
    live, targets, t_seconds = None, None, 0.0
    if loss.needs_teacher and step < steps:
        t0 = time.perf_counter()
        if top_k > 0:
            targets = _teacher_targets(teacher, data, steps, batch_size, loss, top_k, autocast, progress,
                                       state_file, fingerprint)
        else:
            live = teacher().eval().requires_grad_(False)
        t_seconds = time.perf_counter() - t0

    def checkpoint() -> None:
        save_state(state_file, {
            "fingerprint": fingerprint, "step": step, "losses": losses, "seconds": seconds,
            "trainable": {n: _own(p.detach()) for n, p in named.items()},
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state()})

    tokens = batch_size * data.windows.shape[1]
    bar = tqdm(total=steps, initial=step, desc=desc, unit="step", disable=not progress)
    model.train()
    t_run = time.perf_counter()
    while step < steps:
        t0 = time.perf_counter()
        w = data.indices(step, batch_size)                           # (B,) window numbers
        value = step_loss(model, data.windows[w], loss, teacher=live, targets=targets, windows=w,
                          projections=extra, autocast=autocast)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        losses.append(round(value, 6))
        seconds += time.perf_counter() - t0
        if state_file is not None and (step == steps or (checkpoint_every and step % checkpoint_every == 0)):
            checkpoint()
        bar.update(1)
        tok_s = (step - resumed_at) * tokens / (time.perf_counter() - t_run)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tok_s:.0f}")
    bar.close()
    model.eval()
    tail = losses[-10:]
    run_s = time.perf_counter() - t_run
    return {"loss": losses, "steps": steps, "tokens": steps * tokens, "seconds": round(seconds, 1),
            "teacher_seconds": round(t_seconds, 1),
            "tokens_per_second": round((step - resumed_at) * tokens / run_s, 1) if step > resumed_at else None,
            "resumed_at_step": resumed_at or None, "final_loss_mean_last_10": round(sum(tail) / len(tail), 6)}


def _own(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when it owns its storage (torch.save writes it as it is now: no copy needed), else a
    copy, so that a view does not drag the whole storage into the file."""
    whole = t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    return t if whole else t.clone()


def step_loss(model, ids, loss, **kw) -> float:
    """One step's forward and backward (`kd.step`); a seam for tests that interrupt training."""
    return kd.step(model, ids, loss, **kw)


def _teacher_targets(teacher, data: TokenWindows, steps: int, batch_size: int, loss: kd.Loss, top_k: int,
                     autocast, progress: bool, state_file: Path | None, fingerprint) -> kd.TeacherTargets:
    """The teacher's cached targets for every window of steps 0..steps-1: read from beside
    `state_file` when a run with the same fingerprint wrote them, else computed (in the order the
    windows are first visited) and written there, so a resumed run uses the very same numbers."""
    cache = state_file.with_name(state_file.stem + "-teacher.pt") if state_file is not None else None
    key = {"fingerprint": fingerprint, "top_k": top_k, "steps": steps, "batch_size": batch_size}
    if cache is not None and cache.exists():
        st = load_state(cache)
        if st.get("key") == key and "slot" in st.get("targets", {}):      # (an older layout is recomputed)
            return kd.TeacherTargets.from_state(st["targets"])
    order = torch.cat([data.indices(s, batch_size) for s in range(steps)])
    first = torch.ones(len(order), dtype=torch.bool)
    seen = set()
    for i, w in enumerate(order.tolist()):
        first[i] = w not in seen
        seen.add(w)
    model = teacher().eval().requires_grad_(False)
    targets = kd.teacher_targets(model, data.windows, order[first], loss, top_k, batch_size, autocast, progress)
    del model
    release_memory()                    # the teacher's pages go back before the student's steps need them
    if cache is not None:
        save_state(cache, {"key": key, "targets": targets.state()})
    return targets
