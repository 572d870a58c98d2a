"""``onnx``: the decoder as an ONNX graph for ONNX Runtime, its 4/8-bit layers as ``com.microsoft::MatMulNBits``.

    compressor.export_onnx("out/gptq-w4g64", "out/gptq-w4g64-onnx", accuracy_level=4)
    compress export onnx out/gptq-w4g64 -o out/gptq-w4g64-onnx [--option accuracy_level=4]

Our codes go into MatMulNBits' layout unchanged, so the weight ONNX Runtime dequantizes is ours bit for
bit (fp32 ``(q - zero) * scale``, the fp16 scale widened exactly):

  * ``B`` (N, K / block, block * bits / 8) uint8: the codes of each row, block after block, packed
    along K low bits first (two nibbles a byte for 4-bit: code 2j low, 2j + 1 high);
  * ``scales`` (N, K / block) in the activation dtype (float32);
  * ``zero_points`` (N, ceil(K / block * bits / 8)) uint8, packed the same way; a row's last byte is
    padded when the block count is odd (576 / 64 = 9). Omitted for symmetric layers (every zero
    2**(bits-1), ORT's default). Our GPTQ v1 ``qzeros`` hold zero - 1; `Source.codes` adds the 1 back;
  * ``block_size`` = our group size; a per-channel layer repeats its one scale over power-of-two blocks.

Act-order layers (a ``g_idx`` whose groups are not contiguous runs of K) are exported by permuting the
input channels into contiguous groups, ``perm = argsort(g_idx)``: once in the weight, and once on
the activation, one gather (``GatherElements``) per input that layers share (q/k/v, gate/up) and per permutation.
down_proj needs none: its input is SiLU(gate) * up, channel by channel, so gate's and up's output rows
are stored in down_proj's permuted order instead (3 gathers a block, not 4).
No ``g_idx`` is written: with one, ONNX Runtime 1.32's CPU kernel ignores packed uint8 zero points
(every block gets zero 8), and ``g_idx`` or float zero points send it to a path that dequantizes all
of B on every call. Layers that share an input and a layout are one node (q/k/v: N = 576 + 192 + 192),
split after it.

The tied embedding and head: ``head="fp16"`` (default) stores the table once, as fp16 when that is
exact (a checkpoint's is), transposed (hidden, vocab); ONNX Runtime widens it to fp32 at load (the
head's matmul accumulates in fp32, like `compressor.nn.HalfLinear`), and the embedding lookup
gathers its columns. ``head="int8"`` quantizes the head to 8-bit symmetric blocks (our RTN
primitives) for a MatMulNBits, and the embedding gathers and dequantizes the same codes. A head the
checkpoint already quantized (the ``head`` pass) is a MatMulNBits of its own codes (an explicit
``head`` is refused: it is for a float head), and an embedding tied to it gathers and dequantizes
those codes, unpacking nibbles for 4-bit: exact, and the table stored once. Norms are
fp32. ``accuracy_level`` is MatMulNBits' attribute for every layer: 0 accumulates the fp32 product
exactly; 4 quantizes the activations to int8 per block (ONNX Runtime's fastest CPU path).

The graph (`onnx_graph`) is written by hand rather than traced: see README "ONNX Runtime" for why.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import ONNX_ARTIFACT as ARTIFACT
from . import TIED, ExportError, Source, exact_float, register_export
from .onnx_graph import MS_OPSET, OPSET, Builder, llama_graph

__all__ = ["matmul_nbits_layout", "write_graph", "export_float", "MODEL_FILE", "DATA_FILE", "ARTIFACT"]

MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx_data"
_ARCHS = ("llama",)
_LEVELS = (0, 1, 2, 3, 4)
_HEADS = ("fp16", "int8")


def matmul_nbits_layout(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, block: int):
    """(N, K) codes and (N, K / block) scale, zero -> MatMulNBits' (B, scales, zero_points) as numpy.

    B (N, K/block, block*bits/8) uint8, scales (N, K/block) float32, zero_points
    (N, ceil(K/block * bits/8)) uint8 (None for `zero` None: ORT's default 2**(bits-1)); codes and
    zero points packed low bits first."""
    n, k = q.shape
    per = 8 // bits
    nb = k // block
    if k % block or block % per:
        raise ExportError(f"K={k} is not a whole number of blocks of {block}")
    shifts = torch.arange(per, dtype=torch.int32) * bits
    packed = (q.to(torch.int32).reshape(n, nb, block // per, per) << shifts).sum(-1).to(torch.uint8)
    if zero is None:
        return packed.numpy(), scale.to(torch.float32).numpy(), None
    z = zero.round().to(torch.int32)
    if z.numel() and (int(z.min()) < 0 or int(z.max()) > 2 ** bits - 1):
        raise ExportError(f"a zero point of {int(z.max())} does not fit {bits} bits")
    pad = -nb % per
    z = torch.nn.functional.pad(z, (0, pad)).reshape(n, (nb + pad) // per, per)
    zp = (z << shifts).sum(-1).to(torch.uint8)                            # (N, ceil(nb / per))
    return packed.numpy(), scale.to(torch.float32).numpy(), zp.numpy()


def _block(k: int, group: int, name: str) -> int:
    """MatMulNBits' block_size for a layer of `group` (-1 or K: per channel): a power of two >= 16."""
    if group in (-1, k):
        for b in (128, 64, 32, 16):
            if k % b == 0:
                return b
        raise ExportError(f"{name}: K={k} has no power-of-two block of 16-128 for a per-channel layer")
    if group < 16 or group & (group - 1):
        raise ExportError(f"{name}: group size {group} is not a power of two >= 16, which MatMulNBits needs")
    return group


class _Layers:
    """Each projection of the checkpoint as MatMulNBits fields (or a float weight), and the nodes they
    become. `emit` is `onnx_graph.llama_graph`'s `linears` callback."""

    def __init__(self, src: Source, accuracy_level: int):
        self.src, self.level = src, accuracy_level
        self.gathers: dict[tuple[str, bytes], str] = {}
        self.perm_of: dict[str, str] = {}          # a Gather's output -> the permutation initializer it reads
        self.folded: set[str] = set()              # act-order layers whose input arrives permuted (no Gather)
        self.shapes: dict[int, str] = {}           # width -> the (batch, seq, width) shape value
        self._perms: dict[str, torch.Tensor | None] = {}
        self.described: list[dict[str, Any]] = []

    def perm(self, name: str) -> torch.Tensor | None:
        """argsort(g_idx) of an act-order layer (its input channels in contiguous-group order), else None;
        once per layer (down_proj's is asked for by gate/up, then by itself)."""
        if name not in self._perms:
            self._perms[name] = self._argsort_groups(name)
        return self._perms[name]

    def _argsort_groups(self, name: str) -> torch.Tensor | None:
        spec = self.src.specs.get(name)
        if spec is None or spec["type"] != "gptq" or not self.src.desc_act(name):
            return None
        k = spec["in_features"]
        group = k if spec["group_size"] == -1 else spec["group_size"]
        g_idx = self.src.tensors[f"{name}.g_idx"].long()
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], torch.arange(k) // group):
            raise ExportError(f"{name}: its g_idx does not put {group} channels in every group")
        return perm

    def fields(self, name: str, rows: torch.Tensor | None = None) -> dict[str, Any]:
        """The layer's weight in MatMulNBits terms, its columns in `perm` order and its rows in `rows` order."""
        src = self.src
        spec = src.specs.get(name)
        bias = src.tensors.get(f"{name}.bias")
        bias = None if bias is None else bias.float()
        if rows is not None and bias is not None:
            bias = bias[rows]
        if spec is None or spec["type"] == "linear":
            w = src.tensors[f"{name}.weight"].float()
            return {"kind": "float", "w": w if rows is None else w[rows], "bias": bias, "perm": None}
        bits, k = spec["bits"], spec["in_features"]
        if bits not in (4, 8):
            raise ExportError(f"cannot export {name} to onnx: MatMulNBits on CPU takes 4 or 8 bits, it has {bits}")
        q, scale, zero, _ = src.codes(name)
        group = k if spec["group_size"] == -1 else spec["group_size"]
        block = _block(k, group, name)
        perm = self.perm(name)
        if perm is not None:
            q = q[:, perm]
        if rows is not None:
            q, scale, zero = q[rows], scale[rows], zero[rows]
        reps = group // block
        scale, zero = scale.repeat_interleave(reps, 1), zero.repeat_interleave(reps, 1)
        sym = bool((zero == 2 ** (bits - 1)).all())
        return {"kind": "nbits", "q": q, "scale": scale, "zero": None if sym else zero, "bits": bits,
                "block": block, "bias": bias, "perm": perm}

    def emit(self, b: Builder, x: str, names: list[str], feeds: str | None = None) -> list[str]:
        """The projections `names` of `x`, one output each. `feeds`: the layer their outputs reach through
        channelwise ops only (gate/up -> SiLU * up -> down): if it is act-order, their output rows are put in
        its input order here, so that it needs no Gather."""
        rows = self.perm(feeds) if feeds else None
        if rows is not None:
            self.folded.add(feeds)
        layers = {n: self.fields(n, rows) for n in names}
        runs: dict[tuple, list[str]] = {}
        for n, f in layers.items():
            perm = None if f["perm"] is None else f["perm"].numpy().tobytes()
            key = (f["kind"], f.get("bits"), f.get("block"), f.get("zero") is None, perm)
            runs.setdefault(key, []).append(n)
        out: dict[str, str] = {}
        for key, run in runs.items():
            fs = [layers[n] for n in run]
            xin = x if run[0] in self.folded else self._gather(b, x, fs[0]["perm"])
            y = self._nbits(b, xin, run, fs) if key[0] == "nbits" else self._matmul(b, xin, run, fs)
            if key[0] == "nbits":
                self.described[-1]["rows_permuted_as"] = feeds if rows is not None else None
            sizes = [(f["q"] if f["kind"] == "nbits" else f["w"]).shape[0] for f in fs]
            ys = [y] if len(run) == 1 else b.op("Split", [y, b.ints(f"/split/{run[0]}", sizes)], n_out=len(run),
                                                axis=-1)
            out.update(zip(run, ys))
        return [out[n] for n in names]

    def _gather(self, b: Builder, x: str, perm: torch.Tensor | None) -> str:
        """x[..., perm], once per (input, permutation). GatherElements on indices expanded to x's shape:
        ONNX Runtime 1.32's Gather on the last axis copies element by element (5.4 us for one 576-wide
        row, 315 us for 128 rows); this is 1.6 us / 72 us (benchmarks/ort_gather.py)."""
        if perm is None:
            return x
        key = (x, perm.numpy().tobytes())
        if key not in self.gathers:
            k = perm.numel()
            if k not in self.shapes:                                       # (batch, seq, k)
                self.shapes[k] = b.op("Concat", [b.op("Shape", ["input_ids"]), b.ints(f"/perm/k{k}", [k])], axis=0)
            p = b.ints(f"/perm/{len(self.gathers)}", perm.numpy().reshape(1, 1, k))
            idx = b.op("Expand", [p, self.shapes[k]])
            self.gathers[key] = b.op("GatherElements", [x, idx], axis=-1)
            self.perm_of[self.gathers[key]] = p
        return self.gathers[key]

    def _bias(self, b: Builder, run: list[str], fs: list[dict], sizes: list[int]) -> str:
        if all(f["bias"] is None for f in fs):
            return ""
        bias = torch.cat([f["bias"] if f["bias"] is not None else torch.zeros(s) for f, s in zip(fs, sizes)])
        return b.const(f"{run[0]}.bias", bias.numpy())

    def _nbits(self, b: Builder, x: str, run: list[str], fs: list[dict]) -> str:
        f0 = fs[0]
        parts = [matmul_nbits_layout(f["q"], f["scale"], f["zero"], f["bits"], f["block"]) for f in fs]
        sizes = [f["q"].shape[0] for f in fs]
        name = run[0] if len(run) == 1 else run[0].rsplit(".", 1)[0] + "." + "_".join(r.rsplit(".", 1)[1] for r in run)
        B = b.const(f"{name}.MatMulNBits.B", np.concatenate([p[0] for p in parts]))
        S = b.const(f"{name}.MatMulNBits.scales", np.concatenate([p[1] for p in parts]))
        Z = "" if f0["zero"] is None else b.const(f"{name}.MatMulNBits.zero_points", np.concatenate([p[2] for p in parts]))
        bias = self._bias(b, run, fs, sizes)
        inputs = [x, B, S, Z] + (["", bias] if bias else [])
        n, k = sum(sizes), f0["q"].shape[1]
        y = b.op("MatMulNBits", inputs, domain="com.microsoft", K=k, N=n, bits=f0["bits"], block_size=f0["block"],
                 accuracy_level=self.level)
        rows = np.cumsum([0] + sizes).tolist()
        self.described.append({"node": b.nodes[-1].name, "op": "MatMulNBits", "B": B, "scales": S,
                               "zero_points": Z or None, "bits": f0["bits"], "block_size": f0["block"],
                               "K": k, "N": n, "input_perm": self.perm_of.get(x),
                               "columns_permuted_as": run[0] if f0["perm"] is not None else None,
                               "modules": [[m, rows[i], rows[i + 1]] for i, m in enumerate(run)]})
        return y

    def _matmul(self, b: Builder, x: str, run: list[str], fs: list[dict]) -> str:
        wt = torch.cat([f["w"] for f in fs]).t().contiguous().numpy()                  # (K, N)
        y = b.op("MatMul", [x, b.const(f"{run[0]}.weight_t", wt)])
        bias = self._bias(b, run, fs, [f["w"].shape[0] for f in fs])
        return b.op("Add", [y, bias]) if bias else y


def _table(w: torch.Tensor) -> np.ndarray:
    """A float table stored as fp16 when that is exact (a checkpoint's embedding), else fp32."""
    return exact_float(w).numpy()


class _Head:
    """The embedding lookup and the head (`llama_graph`'s `embed` and `head` callbacks). Three heads: a float
    one stored as a table (``fp16``) or re-quantized to 8 bits (``int8``), or one the checkpoint quantized
    (``checkpoint``), whose codes go to MatMulNBits as stored."""

    def __init__(self, src: Source, kind: str | None, layers: _Layers):
        cfg, t = src.config, src.tensors
        self.level, self.layers = layers.level, layers
        spec = src.specs.get("lm_head", {})
        if spec.get("type") == "gptq":
            if kind is not None:
                raise ExportError(f"cannot export {src.path} to onnx with head={kind!r}: that option sets how a float "
                                  f"head is stored, and this checkpoint's lm_head is already {spec['bits']}-bit (its "
                                  f"recipe's head pass); it goes to MatMulNBits from its own codes. Drop the head "
                                  f"option, or export a checkpoint compressed without the head pass")
            self.kind, self.tied = "checkpoint", src.tied_embeddings().get("model.embed_tokens") == "lm_head"
            self.emb = None if self.tied else t["model.embed_tokens.weight"]
        else:
            self.kind = kind or "fp16"
            self.emb = t["model.embed_tokens.weight"]
            self.tied = cfg.get("tie_word_embeddings", True) or "lm_head.weight" not in t
            self.w = self.emb if self.tied else t["lm_head.weight"]
        self.described: dict[str, Any] = {"head": self.kind, "tied": self.tied}

    def _fp_table(self, b: Builder, w: torch.Tensor, name: str) -> str:
        """(hidden, vocab) fp32 table: stored fp16 if exact and widened by a Cast ONNX Runtime folds at load."""
        arr = _table(w).T
        t = b.const(name, arr)
        return b.op("Cast", [t], to=1) if arr.dtype == np.float16 else t

    def embed(self, b: Builder, ids: str) -> str:
        if self.tied and self.kind != "fp16":
            return self._embed_codes(b, ids, *self._nbits(b))
        if not hasattr(self, "table_fp"):
            self.table_fp = self._fp_table(b, self.emb, "model.embed_tokens.weight_t")
        cols = b.op("Gather", [self.table_fp, ids], axis=1)                     # (hidden, B, S)
        return b.op("Transpose", [cols], perm=[1, 2, 0])

    def head(self, b: Builder, h: str, out: str) -> None:
        if self.kind != "fp16":
            B, S, Z, bits, block, (n, k) = self._nbits(b)
            b.op("MatMulNBits", [h, B, S, Z or ""], domain="com.microsoft", outs=[out], K=k, N=n, bits=bits,
                 block_size=block, accuracy_level=self.level)
            return
        table = self.table_fp if self.tied else self._fp_table(b, self.w, "lm_head.weight_t")
        b.op("MatMul", [h, table], outs=[out])

    def _nbits(self, b: Builder):
        """(B, scales, zero_points or None, bits, block, (N, K)) of the head's MatMulNBits, made once: the
        checkpoint's codes, or for ``int8`` the float head as 8-bit symmetric blocks (RTN by
        `compressor.quant.primitives`, fp16-exact scales)."""
        if not hasattr(self, "nbits"):
            if self.kind == "checkpoint":
                f = self.layers.fields("lm_head")
                if f["perm"] is not None:
                    raise ExportError("lm_head was quantized in act-order, which the head's embedding gather does not "
                                      "undo; quantize the head with the head pass (static groups)")
                q, scale, zero, bits, block = f["q"], f["scale"], f["zero"], f["bits"], f["block"]
                scheme = f"the checkpoint's codes ({'a' if zero is not None else ''}symmetric)"
            else:
                from ..quant.primitives import choose_qparams, quantize
                w = self.w.float()
                bits, block = 8, _block(w.shape[1], -1, "lm_head")
                scale, zero = choose_qparams(w, 8, block, sym=True)
                q, scale = quantize(w, scale, zero, 8, block), scale.to(torch.float16).float()
                scheme = "symmetric RTN, fp16-exact scales"
            Bq, S, Z = matmul_nbits_layout(q, scale, zero, bits, block)
            self.nbits = (b.const("lm_head.MatMulNBits.B", Bq), b.const("lm_head.MatMulNBits.scales", S),
                          None if Z is None else b.const("lm_head.MatMulNBits.zero_points", Z), bits, block,
                          tuple(q.shape))
            self.described.update(bits=bits, block_size=block, scheme=scheme)
        return self.nbits

    def _embed_codes(self, b: Builder, ids: str, B: str, S: str, Z: str | None, bits: int, block: int,
                     shape: tuple[int, int]) -> str:
        """Rows `ids` of the head's MatMulNBits codes, gathered and dequantized: (codes - zero) * scale,
        fp32 (B, S, K), the head's weight exactly."""
        k = shape[1]
        nb = k // block
        codes = self._unpack(b, b.op("Gather", [B, ids], axis=0), bits, [0, 0, nb, block], "codes")  # (B, S, nb, block)
        scale = b.op("Unsqueeze", [b.op("Gather", [S, ids], axis=0), b.ints("/emb/ax", [-1])])      # (B, S, nb, 1)
        if Z is None:                                    # MatMulNBits' default zero point, 2**(bits-1)
            zero = b.const("/emb/zero", np.array(2 ** (bits - 1), np.float32))
        else:
            z = self._unpack(b, b.op("Gather", [Z, ids], axis=0), bits, [0, 0, -1], "zeros")     # (B, S, >= nb)
            if bits == 4 and nb % 2:                     # the row's last byte is padded
                z = b.op("Slice", [z, b.ints("/emb/z0", [0]), b.ints("/emb/z1", [nb]), b.ints("/emb/z2", [-1])])
            zero = b.op("Unsqueeze", [z, b.ints("/emb/ax2", [-1])])
        w = b.op("Mul", [b.op("Sub", [codes, zero]), scale])
        return b.op("Reshape", [w, b.ints("/emb/shape", [0, 0, k])])

    @staticmethod
    def _unpack(b: Builder, x: str, bits: int, shape: list[int], what: str) -> str:
        """Gathered uint8 bytes (..., m) -> float32 codes reshaped to `shape`; 4-bit bytes hold code 2j in the
        low nibble and 2j + 1 in the high one (`matmul_nbits_layout`)."""
        if bits == 4:
            lo = b.op("BitwiseAnd", [x, b.const(f"/emb/{what}/mask", np.array(15, np.uint8))])
            hi = b.op("BitShift", [x, b.const(f"/emb/{what}/four", np.array(4, np.uint8))], direction="RIGHT")
            ax = b.ints(f"/emb/{what}/ax", [-1])
            x = b.op("Concat", [b.op("Unsqueeze", [lo, ax]), b.op("Unsqueeze", [hi, ax])], axis=-1)  # (..., m, 2)
        return b.op("Cast", [b.op("Reshape", [x, b.ints(f"/emb/{what}/shape", shape)])], to=1)


def write_graph(src: Source, tmp: Path, accuracy_level: int = 0, head: str | None = None) -> dict[str, Any]:
    """Write ``model.onnx`` (+ ``model.onnx_data``) for `src` into `tmp`; what compression.json records.
    `head` (None: ``fp16``) is for a float head; a quantized one refuses it (`_Head`)."""
    import onnx
    from onnx import helper
    cfg = src.config
    if cfg.get("model_type") not in _ARCHS:
        raise ExportError(f"onnx export writes the {'/'.join(_ARCHS)} decoder; this model is {cfg.get('model_type')!r}")
    if accuracy_level not in _LEVELS:
        raise ExportError(f"accuracy_level={accuracy_level!r}: MatMulNBits takes one of {list(_LEVELS)} "
                          f"(0 exact fp32, 4 int8 activations)")
    if head is not None and head not in _HEADS:
        raise ExportError(f"head={head!r}: choose one of {list(_HEADS)}")
    src.require("onnx", types=("gptq", TIED))
    layers = _Layers(src, accuracy_level)
    hd = _Head(src, head, layers)
    b = Builder()
    inputs, outputs = llama_graph(cfg, b, lambda n: src.tensors[n].float().numpy(), layers.emit, hd.embed, hd.head)
    graph = helper.make_graph(b.nodes, "compressor-llama", inputs, outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.microsoft", MS_OPSET)],
                              producer_name="compressor", ir_version=10)
    onnx.save_model(model, str(tmp / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    umask = os.umask(0)
    os.umask(umask)
    for f in (MODEL_FILE, DATA_FILE):               # onnx writes its data file 0600; a checkpoint's files follow the umask
        os.chmod(tmp / f, 0o666 & ~umask)
    ops: dict[str, int] = {}
    for n in b.nodes:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"accuracy_level": accuracy_level, "opset": OPSET, "nodes": len(b.nodes), "ops": ops,
            "matmul_nbits": layers.described, "embedding_and_head": hd.described,
            "act_order_gathers": len(layers.gathers)}


def check_options(options: dict[str, Any]) -> None:
    """accuracy_level and head, checked when a recipe or command names them (before any work)."""
    level, head = options.get("accuracy_level", 0), options.get("head", "fp16")
    if str(level) not in tuple(map(str, _LEVELS)):
        raise ExportError(f"accuracy_level={level!r}: MatMulNBits takes one of {list(_LEVELS)} "
                          f"(0 exact fp32, 4 int8 activations)")
    if head not in _HEADS:
        raise ExportError(f"head={head!r}: choose one of {list(_HEADS)}")


@register_export("onnx", engines="ONNX Runtime (onnxruntime, onnxruntime-gpu; optimum's ORTModelForCausalLM)",
                 options=("accuracy_level", "head"), bits=(4, 8), archs=_ARCHS, meta_file="compression.json",
                 requires=("onnx", "onnx"), check=check_options)
def write(src: Source, tmp: Path, options: dict[str, Any]) -> dict[str, Any]:
    head = options.get("head")
    described = write_graph(src, tmp, int(options.get("accuracy_level", 0)), None if head is None else str(head))
    write_dir_files(src, tmp)
    return {"artifact": ARTIFACT, "files": [MODEL_FILE, DATA_FILE], **described}


def export_float(model_dir: str | Path, out: str | Path, *, overwrite: bool = False, accuracy_level: int = 0) -> Path:
    """An uncompressed HF llama directory as the same graph with float ``MatMul`` projections: the fp32
    reference in ONNX Runtime (`compress-bench --engine ort` on BASE) and the input of ONNX Runtime's own
    quantizer (``benchmarks/ort_peer.py``)."""
    from ..checkpoint import META, atomic_dir, versions
    src = Source.float_model(model_dir)
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        described = write_graph(src, tmp, accuracy_level)
        write_dir_files(src, tmp)
        meta = {"format": "onnx", "artifact": ARTIFACT, "options": {}, **described, "files": [MODEL_FILE, DATA_FILE],
                "source": {"model": str(Path(model_dir).resolve())}, "versions": versions(), "producer": "compressor"}
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
    return Path(out)


def write_dir_files(src: Source, tmp: Path) -> None:
    """config.json (without a quantization_config: the graph holds the layers) and the tokenizer."""
    cfg = {k: v for k, v in src.config.items() if k != "quantization_config"}
    cfg["use_cache"] = True
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    src.copy_tokenizer(tmp)
