"""Multiple-choice log-likelihoods, computed as lm-evaluation-harness defines them, packed so each
context runs once.

The definition (lm-eval's `TemplateLM._encode_pair` and `loglikelihood`)
-----------------------------------------------------------------------
A choice's score is the sum of the log-probabilities of its continuation tokens given the context.
Context and continuation are encoded together and split at the context's own tokens:
``whole = enc(context + continuation)``, ``ctx = enc(context)``, ``cont = whole[len(ctx):]``; a
trailing space of the context first moves to the continuation. The model reads ``ctx + cont[:-1]``
and the scored positions are the last ``len(cont)``. No special tokens are added; an empty context
becomes the tokenizer's EOS (lm-eval's prefix token).

How it is computed fast
-----------------------
* **One row per item, its context once.** The choices of an item share ``ctx`` token for token (it
  is encoded alone), so a row holds ``ctx`` followed by every choice's ``cont[:-1]``, and a 4-D
  attention mask lets a choice's tokens see the context and the earlier tokens of their own choice
  only, with position ids that restart after the context for each choice. Each query sees exactly
  the keys it would in its own sequence, so the result equals scoring each choice alone (tested),
  and HellaSwag's ~4x repeated context costs one pass.
* **Rows sorted by length, batched to a token budget**, so padding stays small (reported).
* **The output head only on the scored positions**: the decoder's hidden states are gathered at the
  ~4 x 20 positions an item scores before the 49k-wide head and its log-softmax run, instead of at
  every position.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .data import Item

__all__ = ["Encoded", "encode_pair", "encode_item", "ScoreStats", "loglikelihoods"]


@dataclass(frozen=True)
class Encoded:
    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]

    @property
    def row_len(self) -> int:
        """Tokens of this item's packed row: the context, then every choice but its last token."""
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)


def _encode(tokenizer, s: str) -> list[int]:
    return tokenizer.encode(s, add_special_tokens=False)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as lm-eval's `_encode_pair` splits them."""
    if context == "":
        prefix = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
        return [prefix], _encode(tokenizer, continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def encode_item(tokenizer, item: Item) -> Encoded:
    ctx = None
    conts = []
    for choice in item.choices:
        c, cont = encode_pair(tokenizer, item.context, item.delimiter + choice)
        if not cont:
            raise ValueError(f"choice {choice!r} of context {item.context[:60]!r} encodes to no tokens")
        ctx = c if ctx is None else ctx
        conts.append(tuple(cont))
    return Encoded(tuple(ctx), tuple(conts))


@dataclass
class ScoreStats:
    tokens: int = 0          # real tokens run through the model
    padded: int = 0          # tokens of the padded batches
    unshared: int = 0        # tokens the same items would take with each choice as its own sequence
    seconds: float = 0.0

    @property
    def padding_pct(self) -> float:
        return 100 * (self.padded - self.tokens) / max(self.padded, 1)


def _batches(encoded: list[Encoded], budget: int) -> list[list[int]]:
    """Item indices in batches of rows of similar length, each at most `budget` padded tokens."""
    order = sorted(range(len(encoded)), key=lambda i: -encoded[i].row_len)
    out, cur, longest = [], [], 0
    for i in order:
        n = encoded[i].row_len
        longest_ = max(longest, n)
        if cur and longest_ * (len(cur) + 1) > budget:
            out.append(cur)
            cur, longest_ = [], n
        cur.append(i)
        longest = longest_
    if cur:
        out.append(cur)
    return out


def _pack(rows: list[Encoded], dtype: torch.dtype):
    """input ids, position ids and the additive 4-D mask of a batch; and per choice, the flat
    indices of its scored positions and its target tokens."""
    L = max(e.row_len for e in rows)
    B = len(rows)
    ids = torch.zeros(B, L, dtype=torch.long)
    pos = torch.zeros(B, L, dtype=torch.long)
    seg = torch.full((B, L), -1, dtype=torch.long)        # 0: context, i + 1: choice i, -1: padding
    where, targets, owner = [], [], []                     # flat (row * L + pos), token, choice number
    n_choice = 0
    for b, e in enumerate(rows):
        c = len(e.context)
        ids[b, :c] = torch.tensor(e.context)
        pos[b, :c] = torch.arange(c)
        seg[b, :c] = 0
        at = c
        for i, cont in enumerate(e.continuations):
            n = len(cont) - 1
            ids[b, at:at + n] = torch.tensor(cont[:-1], dtype=torch.long)
            pos[b, at:at + n] = torch.arange(c, c + n)
            seg[b, at:at + n] = i + 1
            where += [b * L + c - 1] + [b * L + at + j for j in range(n)]
            targets += cont
            owner += [n_choice] * len(cont)
            n_choice += 1
            at += n
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    sk, sq = seg[:, None, :], seg[:, :, None]
    allowed = causal & ((sk == 0) | (sk == sq))                           # (B, L, L)
    allowed |= torch.eye(L, dtype=torch.bool)                             # padding sees itself: no NaN
    mask = torch.zeros(B, 1, L, L, dtype=dtype).masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return ids, pos, mask, torch.tensor(where), torch.tensor(targets), torch.tensor(owner), n_choice


def _model_dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _check_fits(model, encoded: list[Encoded]) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None:
        return
    longest = max(len(e.context) + max(len(c) for c in e.continuations) - 1 for e in encoded)
    if longest > limit:
        raise ValueError(f"an item needs {longest} positions, more than the model's {limit}")


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether `device` multiplies bf16 natively (CUDA; CPUs with AVX512-BF16 or AMX)."""
    if torch.device(device).type == "cuda":
        return True
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def resolve_precision(precision: str, device="cpu") -> str:
    """``"auto"`` -> ``"bf16"`` where `native_bf16`, else ``"fp32"``; ``"fp32"``/``"bf16"`` pass through."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision={precision!r}: expected auto, fp32 or bf16")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


_HEAD_CHUNK = 128   # scored positions per head call: their (128 x vocab) logits stay in cache


def _target_logprobs(head, h: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
    """log p(target) at each row of `h`: the target's logit minus the logsumexp, in fp32."""
    logits = head(h).float() * scale
    return logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


@torch.inference_mode()
def loglikelihoods(model, tokenizer, items: list[Item], *, precision: str = "fp32", batch_tokens: int = 1024,
                   progress: bool = True, desc: str = "scoring",
                   stats: ScoreStats | None = None) -> list[tuple[float, ...]]:
    """For each item, the summed log-probability of each choice (lm-eval's ``loglikelihood``).

    precision: ``"fp32"`` runs the model as it is; ``"bf16"`` runs its matmuls under bf16 autocast
    (fp32 accumulation; norms, softmax and the log-softmax stay fp32), ~2.5x faster where the CPU
    multiplies bf16 natively; ``"auto"`` picks bf16 there and fp32 elsewhere.
    """
    import contextlib
    import time
    t0 = time.perf_counter()
    encoded = [encode_item(tokenizer, it) for it in items]
    _check_fits(model, encoded)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    dtype = _model_dtype(model)
    scale = getattr(model.config, "logit_scale", None) or 1.0
    out: list[tuple[float, ...] | None] = [None] * len(items)
    st = stats if stats is not None else ScoreStats()
    model.eval()
    device = next(model.parameters()).device
    prec = resolve_precision(precision, device)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if prec == "bf16" and dtype == torch.float32
           else contextlib.nullcontext())
    with amp, tqdm(total=len(items), desc=desc, unit="item", disable=not progress, leave=False) as bar:
        for batch in _batches(encoded, batch_tokens):
            rows = [encoded[i] for i in batch]
            ids, pos, mask, where, tgt, owner, n = _pack(rows, dtype)
            h = decoder(input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=mask.to(device),
                        use_cache=False).last_hidden_state
            h = h.reshape(-1, h.shape[-1])[where.to(device)]
            lp = torch.cat([_target_logprobs(head, h[i:i + _HEAD_CHUNK], tgt[i:i + _HEAD_CHUNK].to(device), scale)
                            for i in range(0, h.shape[0], _HEAD_CHUNK)]).double().cpu()
            sums = torch.zeros(n, dtype=torch.float64).index_add_(0, owner, lp)
            k = 0
            for i, e in zip(batch, rows):
                m = len(e.continuations)
                out[i] = tuple(sums[k:k + m].tolist())
                k += m
            st.tokens += sum(e.row_len for e in rows)
            st.padded += ids.numel()
            st.unshared += sum(len(e.context) + len(c) - 1 for e in rows for c in e.continuations)
            bar.update(len(batch))
    st.seconds += time.perf_counter() - t0
    return out
