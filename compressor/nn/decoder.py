"""`FastDecoder`: generation for llama-architecture models whose blocks are all packed, one op per block.

HF's eager ``generate`` spends as long in Python as in the kernels on a small quantized model: per
token and block ~40 module, dispatcher and tensor calls (norms, seven projections, rotary, cache
update, mask, attention, residuals). Here the blocks are one call of ``compressor::llama_stack``
(`compressor.kernels.layer`; C++ on CPU, every block of a decode step in one parallel region), with
q/k/v and gate/up fused into one packed weight each and a static KV cache, so a token is ~5 calls in
all: embedding, the blocks, final norm, head. No per-model compilation is involved (the engine below is
compiled once per machine, on first use, and cached), so there is no first-call compile time per model.

`generate` runs each step as one C call of `compressor.runtime.engine` (the code of the op, with the
embedding, final norm and head) over this decoder's own tensors (`engine`): ~0.35 ms less per batch-1 step
and ~0.6 ms less per batch-8 one than `forward`'s five calls from Python. `forward` (the op path) stays for
callers that hold the caches, and serves generate where the engine cannot (no C++ compiler for it, a head
it cannot run, positions past its rotary tables).

`compressor.load` (``for_inference=True``, the default) installs it as the model's ``generate``
through `prepare_`. It takes the requests it can serve exactly like HF's greedy search: batches
whose rows share one length (no padding), greedy decoding, ``max_new_tokens`` / ``max_length``,
``min_new_tokens``, ``eos_token_id`` / ``pad_token_id``. Anything else (sampling, beams, padding,
logits processors, streamers, ...) goes to HF's own ``generate`` on the same packed kernels,
and `fast_path_refusal` says why.

Batch 1 is exact (fp32 rounding against HF's forward on the same weights). Steps of several rows
(one new token each) run their projections with int8 activations (`compressor.kernels.int8_activations`,
AVX-512 VNNI): at 2-31 rows the exact kernel is bound by its multiply-adds, not by the weights, and
this gives ~3x its speed for ~36 dB of logit SQNR, as llama.cpp's Q8 activations do.
Batches also keep their KV cache in fp16 (`caches`): half the bytes attention reads and half the memory.
``COMPRESSOR_EXACT_DECODE=1`` keeps batches exact too. Prompts (prefill) are always exact: a prompt attends to
its own keys and values before they are rounded.

Act-order layers: `compressor.nn.prepare.fold_act_order_` (run by `compressor.load`) moves down_proj's
permutation into gate/up's output order, so a block gathers its activations three times, not four.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from ..kernels.repack import PackedWeight, fusable
from .qlinear import QuantLinear

__all__ = ["FastDecoder", "unsupported", "install"]

log = logging.getLogger("compressor")

MODEL_TYPES = ("llama", "mistral", "qwen2")
# generation settings the fast path honours; any other value that differs from HF's default refuses it
_HONOURED = {"max_new_tokens", "min_new_tokens", "max_length", "min_length", "eos_token_id", "pad_token_id",
             "bos_token_id", "do_sample", "temperature", "top_k", "top_p", "use_cache", "num_beams",
             "cache_implementation", "transformers_version", "_from_model_config"}
_NEUTRAL = (None, False, 0, 1, 1.0, "", [], {})


def _packed(m) -> PackedWeight | None:
    return m.packed() if isinstance(m, QuantLinear) else None


def unsupported(model: torch.nn.Module) -> str | None:
    """Why `FastDecoder` cannot run `model`, or None when it can."""
    from .. import kernels
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in MODEL_TYPES:
        return f"model_type {kind!r} (the fast path runs {', '.join(MODEL_TYPES)})"
    if kernels.extension is None:
        return "the CPU kernels are not loaded"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r}"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) and kind != "llama":
        return "sliding-window attention"
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(inner, "rotary_emb"):
        return "no model.layers / rotary_emb"
    for i, layer in enumerate(layers):
        a, m = layer.self_attn, layer.mlp
        for name, lin in (("q_proj", a.q_proj), ("k_proj", a.k_proj), ("v_proj", a.v_proj), ("o_proj", a.o_proj),
                          ("gate_proj", m.gate_proj), ("up_proj", m.up_proj), ("down_proj", m.down_proj)):
            if _packed(lin) is None:
                return f"layers.{i}.{name} is {type(lin).__name__}, not a packed 4/8-bit QuantLinear"
        if not fusable([_packed(a.q_proj), _packed(a.k_proj), _packed(a.v_proj)]):
            return f"layers.{i}: q/k/v projections differ in bits, group size or act-order permutation"
        if not fusable([_packed(m.gate_proj), _packed(m.up_proj)]):
            return f"layers.{i}: gate/up projections differ in bits, group size or act-order permutation"
    return None


class FastDecoder:
    """A llama-architecture model with packed projections, its blocks run by ``compressor::llama_stack``."""

    def __init__(self, model: torch.nn.Module):
        why = unsupported(model)
        if why is not None:
            raise ValueError(f"FastDecoder cannot run this model: {why}")
        cfg = model.config
        self.model = model
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = float(cfg.rms_norm_eps)
        self.layers = []
        groups = [g for layer in model.model.layers for g in _groups(layer)]
        head = model.lm_head if isinstance(model.lm_head, QuantLinear) and _packed(model.lm_head) is not None else None
        arena = _Arena(sum(_nbytes(g) for g in groups) + (_nbytes([head]) if head is not None else 0))
        from ..machine import trim_heap
        placed = {}
        for i, g in enumerate(groups):
            placed[id(g[0])] = arena.place(g)
            if i % 8 == 7:
                trim_heap()      # the layouts just copied are free now: glibc keeps their pages otherwise
        if head is not None:
            arena.place([head])
        trim_heap()
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            projs = [placed[id(a.q_proj)], placed[id(a.o_proj)], placed[id(m.gate_proj)], placed[id(m.down_proj)]]
            biases = [_cat([a.q_proj, a.k_proj, a.v_proj]), a.o_proj.bias, _cat([m.gate_proj, m.up_proj]), m.down_proj.bias]
            w, meta = [], []
            for p, b in zip(projs, biases):
                w += [p.qweight, p.scales, p.zeros, p.perm, None if b is None else b.float()]
                meta += [p.bits, p.group_size, p.out_features]
            meta += [self.heads, self.kv_heads, self.head_dim]
            scale = getattr(a, "scaling", self.head_dim ** -0.5)
            self.layers.append((layer.input_layernorm.weight.float().contiguous(),
                                layer.post_attention_layernorm.weight.float().contiguous(), w, meta, float(scale)))
        # llama_stack's arguments: every block's in one list each
        self._norms = [t for ln1, ln2, *_ in self.layers for t in (ln1, ln2)]
        self._w = [t for _, _, w, _, _ in self.layers for t in w]
        self._meta = [i for *_, meta, _ in self.layers for i in meta]
        self._scales = [scale for *_, scale in self.layers]
        self._tables = (torch.empty(0, self.head_dim), torch.empty(0, self.head_dim))
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._engine, self._engine_why, self._engine_arrays = None, None, {}

    # --- pieces --------------------------------------------------------------------------------
    def rope_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) float32 (>= length, head_dim) from the model's own rotary module (any scaling)."""
        if self._tables[0].shape[0] < length:
            n = max(length, 2 * self._tables[0].shape[0], 256)
            pos = torch.arange(n).unsqueeze(0)
            cos, sin = self.model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)
            self._tables = (cos[0].float().contiguous(), sin[0].float().contiguous())
        return self._tables

    def caches(self, batch: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per block (k, v) (batch, kv_heads, >= length, head_dim); reused while they fit. float32 for one
        row (exact); float16 for several unless ``COMPRESSOR_EXACT_DECODE=1``: batched steps are not exact
        anyway (int8 activations), and attention then reads half the bytes (the cache is ~1 MB per block
        at 8 rows and 96 positions, from DRAM every step), in half the memory. One allocation for all, not
        zeroed (as the engine's, csrc/engine/engine.cpp): a step reads only the positions written before it,
        and the pages become resident as positions are written (zeroing 18 MB at 8 rows took ~4 ms of the
        call)."""
        from ..greedy import approximate_batches
        dtype = torch.float16 if approximate_batches(batch) else torch.float32
        have = self._cache[0][0] if self._cache else None
        if have is None or have.shape[0] != batch or have.shape[2] < length or have.dtype != dtype:
            from ..machine import trim_heap
            self._cache = []                       # free the old ones first: peak RSS is one set
            trim_heap()
            shape = (batch, self.kv_heads, length, self.head_dim)
            whole = torch.empty((len(self.layers), 2, *shape), dtype=dtype)
            self._cache = [(whole[i, 0], whole[i, 1]) for i in range(len(self.layers))]
        return self._cache

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos: int, caches) -> torch.Tensor:
        """Logits (B, vocab) float32 at the last of `ids` (B, T), whose tokens sit at positions pos..pos+T-1."""
        from ..kernels import int8_activations
        inner = self.model.model
        x = inner.embed_tokens(ids).float().contiguous()
        cos, sin = self.rope_tables(pos + ids.shape[1])
        from ..greedy import approximate_batches
        batched_step = ids.shape[1] == 1 and approximate_batches(ids.shape[0])
        with int8_activations(batched_step):
            x = torch.ops.compressor.llama_stack.default(x, [k for k, _ in caches], [v for _, v in caches], pos, cos,
                                                         sin, self._norms, self._w, self._meta, self.eps,
                                                         self._scales)
            return self.model.lm_head(inner.norm(x[:, -1:]))[:, -1].float()

    # --- generation ----------------------------------------------------------------------------
    def engine(self):
        """`compressor.runtime.engine.Engine` over this decoder's own tensors (no copy), built on first use, or None
        where it cannot run (``_engine_why`` says why; logged once). A step
        there is one C call (embedding, blocks, final norm, head), where `forward` makes five calls from Python
        and converts the op's ~600 tensor arguments each time: ~0.35 ms of a batch-1 step and ~0.6 ms of a
        batch-8 one on SmolLM2-135M."""
        if self._engine is None and self._engine_why is None:
            from ..runtime.engine import Engine, Resident
            from ..runtime.pack import describe

            def add(name: str, t: torch.Tensor | None) -> str | None:
                if t is None:
                    return None
                self._engine_arrays[name] = t.detach().contiguous()      # kept: the engine reads this memory
                return name

            try:
                index = describe(self.model, self, add)
                arrays = {n: t.numpy() for n, t in self._engine_arrays.items()}
                self._engine = Engine(Resident(index, arrays), torch.get_num_threads())
            except (ValueError, OSError, RuntimeError) as e:     # a head the engine cannot run; no compiler
                self._engine_why, self._engine_arrays = f"{type(e).__name__}: {e}", {}
                log.info("generate(): the op path, not the engine (%s)", self._engine_why)
        return self._engine

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, min_new_tokens: int = 0,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> torch.Tensor:
        """Greedy decoding, as HF's ``generate(do_sample=False)``: (B, T + new) token ids; rows that
        met an end-of-sequence token are padded with `pad_token_id` until every row has. On the engine
        (`engine`) where it runs and the positions fit its rotary tables, else on `forward`."""
        from ..greedy import greedy
        ids = input_ids.long().numpy()
        step = self.stepper(ids.shape[0], ids.shape[1] + max_new_tokens)
        return torch.from_numpy(greedy(step, ids, max_new_tokens, min_new_tokens, eos_token_id, pad_token_id))

    def stepper(self, batch: int, length: int):
        """``step(tokens (B, t) int64 numpy, pos)`` -> (B, vocab) float32 numpy logits for `batch` rows of up to
        `length` positions, on the path `generate` takes: the engine (`engine`, on torch's thread count now, as the
        op path) where it runs and the positions fit its rotary tables, else `forward` over fresh `caches`."""
        eng = self.engine()
        if eng is not None and length <= eng.rope_rows:
            eng.set_threads(torch.get_num_threads())
            return eng.stepper(batch, length)
        caches = self.caches(batch, length)
        return lambda tokens, pos: self.forward(torch.from_numpy(tokens), pos, caches).numpy()


def _groups(layer) -> list[list[QuantLinear]]:
    """A block's projections by shared input: q/k/v, o, gate/up, down (each group one packed weight)."""
    a, m = layer.self_attn, layer.mlp
    return [[a.q_proj, a.k_proj, a.v_proj], [a.o_proj], [m.gate_proj, m.up_proj], [m.down_proj]]


def _nbytes(linears: list) -> int:
    parts = [_packed(m) for m in linears]
    with_zeros = any(p.zeros is not None for p in parts)
    per = sum(_align(p.qweight.nbytes) + _align(p.scales.nbytes) * (2 if with_zeros else 1) for p in parts)
    return per + 3 * _ALIGN


_ALIGN = 64                   # each tensor in the arena starts on a cache line
_HUGE = 2 << 20               # transparent huge page size (x86-64)


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class _Arena:
    """One buffer for all the packed weights a token streams, on transparent huge pages where the kernel
    allows (``madvise(MADV_HUGEPAGE)``; Linux's default THP mode is madvise): ~90 MB read per token through
    4 KB pages costs a TLB miss every 64 cache lines. Measured on SmolLM2-135M (Zen 4): 5-9% less time per
    token. Elsewhere it is a plain buffer."""

    def __init__(self, nbytes: int):
        self.buf = torch.empty(nbytes + _HUGE, dtype=torch.uint8)
        self.off = (-self.buf.data_ptr()) % _HUGE
        _advise_huge(self.buf.data_ptr() + self.off, nbytes)

    def take(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        n = dtype.itemsize * int(torch.Size(shape).numel())
        t = self.buf[self.off:self.off + n].view(dtype).view(shape)
        self.off += _align(n)
        return t

    def place(self, linears: list) -> PackedWeight:
        """What `fuse` makes of the linears' layouts, written straight into the arena (the parts side by side
        along the tiles, no intermediate copy); each linear then runs on its slice."""
        parts = [_packed(m) for m in linears]
        if not fusable(parts):
            raise ValueError("these layers cannot share one packed weight")
        first, nt_all = parts[0], sum(p.qweight.shape[0] for p in parts)
        out = {}
        for name in ("qweight", "scales", "zeros"):
            if name == "zeros" and all(p.zeros is None for p in parts):
                out[name] = None
                continue
            like = first.qweight if name == "qweight" else first.scales
            dst = self.take((nt_all, *like.shape[1:]), like.dtype)
            t0 = 0
            for p in parts:
                src = getattr(p, name)
                nt = p.qweight.shape[0]
                if src is None:                              # a symmetric part beside asymmetric ones
                    dst.narrow(0, t0, nt).fill_(2 ** (p.bits - 1))
                else:
                    dst.narrow(0, t0, nt).copy_(src)
                t0 += nt
            out[name] = dst
        placed = PackedWeight(first.bits, out["qweight"], out["scales"], out["zeros"], first.perm, first.group_size,
                              first.in_features, sum(p.out_features for p in parts))
        t0 = 0
        for m, p in zip(linears, parts):
            nt = p.qweight.shape[0]
            view = lambda x: None if x is None else x.narrow(0, t0, nt)  # noqa: E731
            m.use_packed_(PackedWeight(p.bits, view(placed.qweight), view(placed.scales), view(placed.zeros), p.perm,
                                       p.group_size, p.in_features, p.out_features))
            t0 += nt
        return placed


def _advise_huge(addr: int, nbytes: int) -> None:
    import ctypes
    import sys
    if not sys.platform.startswith("linux") or nbytes < _HUGE:
        return
    try:
        ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(addr), ctypes.c_size_t(nbytes // _HUGE * _HUGE),
                                                  14)   # MADV_HUGEPAGE
    except (OSError, AttributeError):
        pass


def _cat(linears: list) -> torch.Tensor | None:
    """The fused bias of `linears` (zeros where one has none), or None when none has a bias."""
    if all(m.bias is None for m in linears):
        return None
    return torch.cat([torch.zeros(m.out_features) if m.bias is None else m.bias.float() for m in linears])


def fast_path_refusal(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> str | None:
    """Why a ``generate(*args, **kwargs)`` call goes to HF's generate rather than `FastDecoder`, or None."""
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if len(args) > 1:
        return "positional arguments after the input ids"
    if not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point()
            and ids.device.type == "cpu" and ids.shape[1] > 0):
        return "input ids that are not a (batch, length) CPU tensor"
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool((mask == 1).all()):
        return "an attention mask with padding"
    rest = {k: v for k, v in kwargs.items() if k not in ("input_ids", "inputs", "attention_mask")}
    gc = _generation_config(model, rest)
    if isinstance(gc, str):
        return gc
    diff = gc.to_diff_dict()
    # neutral values (False, None, 0, a penalty of 1.0, ...) change nothing greedy search does
    other = sorted(k for k, v in diff.items() if k not in _HONOURED and v not in _NEUTRAL)
    if other:
        return f"generation settings {', '.join(other)}"
    if gc.do_sample:
        return "sampling (do_sample=True)"
    if (gc.num_beams or 1) != 1:
        return "beam search"
    return None


def _generation_config(model, kwargs: dict[str, Any]):
    """The effective GenerationConfig of a call (model's config updated by kwargs), or why not."""
    import copy
    gc = copy.deepcopy(getattr(model, "generation_config", None))
    if gc is None:
        from transformers import GenerationConfig
        gc = GenerationConfig()
    extra = dict(kwargs)
    if "generation_config" in extra:
        gc = copy.deepcopy(extra.pop("generation_config"))
    unused = gc.update(**extra)
    if unused:
        return f"arguments {', '.join(sorted(unused))}"
    return gc


def install(model: torch.nn.Module) -> bool:
    """Make ``model.generate`` take the fast path where it can (`fast_path_refusal`), HF's otherwise.
    Returns whether the model can take it at all (`unsupported`); logs why not."""
    why = unsupported(model)
    if why is not None:
        log.info("fast generation path off: %s; generate() is HF's, on the packed kernels", why)
        return False
    fast = FastDecoder(model)
    hf_generate = model.generate

    def generate(*args, **kwargs):
        refusal = fast_path_refusal(model, args, kwargs)
        if refusal is not None:
            log.debug("generate(): HF's path for %s", refusal)
            return hf_generate(*args, **kwargs)
        ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
        gc = _generation_config(model, {k: v for k, v in kwargs.items()
                                        if k not in ("input_ids", "inputs", "attention_mask")})
        new = gc.max_new_tokens if gc.max_new_tokens is not None else max(0, gc.max_length - ids.shape[1])
        min_new = max(gc.min_new_tokens or 0, (gc.min_length or 0) - ids.shape[1])
        return fast.generate(ids, new, min_new, gc.eos_token_id, gc.pad_token_id)

    generate.fast = fast
    generate.hf_generate = hf_generate
    model.generate = generate
    return True
