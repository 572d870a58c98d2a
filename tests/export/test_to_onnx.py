"""The onnx export (`compressor.export.to_onnx`): MatMulNBits initializers against our dequantized weights
(exact, through an unpacker written here), the graph's logits in ONNX Runtime against compressor.load,
act-order without g_idx, the options, the refusals, and optimum's ORTModelForCausalLM on the result."""
from __future__ import annotations

import json
import os
import re
import subprocess

import numpy as np
import pytest
import torch

from compressor import compress, export_onnx
from compressor.export import ExportError, export_meta
from compressor.recipe import parse_recipe

onnx = pytest.importorskip("onnx", reason="onnx export needs the onnx extra: pip install '.[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="onnx export needs the onnx extra: pip install '.[onnx]'")

from compressor.export.ort import OrtDecoder  # noqa: E402
from compressor.export.to_onnx import matmul_nbits_layout  # noqa: E402

OPTIMUM_PYTHON = os.environ.get("COMPRESSOR_OPTIMUM_PYTHON")


def unpack_low_first(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Bytes -> codes, low bits first, by shifting each byte `8 / bits` times (independent of `to_onnx`)."""
    per = 8 // bits
    mask = (1 << bits) - 1
    cols = [(packed >> (bits * j)) & mask for j in range(per)]           # code j of each byte
    return np.stack(cols, axis=-1).reshape(*packed.shape[:-1], -1)[..., :count]


def dequantize_node(init: dict[str, np.ndarray], node: dict) -> torch.Tensor:
    """The (N, K) float32 weight ONNX Runtime's MatMulNBits computes from the initializers of `node`."""
    n, k, bits, block = node["N"], node["K"], node["bits"], node["block_size"]
    nb = k // block
    q = unpack_low_first(init[node["B"]].reshape(n, nb, -1), bits, block).astype(np.float32)   # (N, nb, block)
    scale = init[node["scales"]].reshape(n, nb, 1).astype(np.float32)
    if node["zero_points"]:
        zero = unpack_low_first(init[node["zero_points"]].reshape(n, -1), bits, nb).astype(np.float32)[..., None]
    else:
        zero = np.float32(2 ** (bits - 1))
    return torch.from_numpy(((q - zero) * scale).reshape(n, k))


def initializers(out) -> dict[str, np.ndarray]:
    model = onnx.load(str(out / "model.onnx"))
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def ours(ck) -> dict[str, torch.Tensor]:
    """module name -> its dequantized (N, K) fp32 weight as saved, in the model's channel order (a model loaded
    for inference has act-order MLPs folded: `compressor.nn.prepare.fold_act_order_`)."""
    import compressor
    from compressor.nn import QuantLinear
    model = compressor.load(ck, for_inference=False)
    return {name: m.dequantized_weight(torch.float32) for name, m in model.named_modules()
            if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k,block", [(576, 64), (96, 32), (64, 16), (128, 128)])
def test_layout_unpacks_to_the_codes(bits, k, block):
    g = torch.Generator().manual_seed(k + bits)
    n = 5
    q = torch.randint(0, 2 ** bits, (n, k), generator=g, dtype=torch.int64).to(torch.uint8)
    zero = torch.randint(0, 2 ** bits, (n, k // block), generator=g).float()
    scale = torch.rand(n, k // block, generator=g).to(torch.float16).float()
    B, S, Z = matmul_nbits_layout(q, scale, zero, bits, block)
    assert B.shape == (n, k // block, block * bits // 8) and B.dtype == np.uint8
    assert Z.shape == (n, -(-(k // block) * bits // 8)) and S.dtype == np.float32
    assert np.array_equal(unpack_low_first(B, bits, block).reshape(n, k), q.numpy())
    assert np.array_equal(unpack_low_first(Z, bits, k // block), zero.numpy().astype(np.uint8))


def _perm(ck, name) -> torch.Tensor:
    from safetensors.torch import load_file
    return torch.argsort(load_file(str(ck / "model.safetensors"))[f"{name}.g_idx"].long(), stable=True)


def _export_and_compare(ck, out, **opts):
    """Every MatMulNBits node's weight, put back in the model's row and column order, equals ours exactly."""
    export_onnx(ck, out, **opts)
    meta = export_meta(out)
    init = initializers(out)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    made_by = {n.output[0]: n for n in graph.node}
    gathers = {n.output[0]: made_by[n.input[1]].input[0] for n in graph.node if n.op_type == "GatherElements"}
    nodes = {n.name: n for n in graph.node}
    want = ours(ck)
    covered = set()
    for node in meta["matmul_nbits"]:
        w = dequantize_node(init, node)
        x = nodes[node["node"]].input[0]
        if node["columns_permuted_as"]:                   # columns in contiguous-group order: put them back
            perm = _perm(ck, node["columns_permuted_as"])
            w = torch.empty_like(w).index_copy_(1, perm, w)
            if x in gathers:                              # and the activation is gathered in the same order
                assert np.array_equal(init[gathers[x]].reshape(-1), perm.numpy())
            else:                                         # or arrives so: gate/up rows stored in this order
                assert any(n["rows_permuted_as"] == node["modules"][0][0] for n in meta["matmul_nbits"])
        else:
            assert x not in gathers
        for name, r0, r1 in node["modules"]:
            got = w[r0:r1]
            if node["rows_permuted_as"]:
                got = torch.empty_like(got).index_copy_(0, _perm(ck, node["rows_permuted_as"]), got)
            assert torch.equal(got, want[name]), name
            covered.add(name)
    assert covered == set(want)
    return meta, init


@pytest.mark.parametrize("setting", ["asym4g32", "sym4g32", "sym8", "asym4g64"])
def test_matmul_nbits_initializers_equal_our_dequantized_weights(quantized, tmp_path, setting):
    meta, _ = _export_and_compare(quantized(setting), tmp_path / "onnx")
    assert meta["format"] == "onnx" and meta["artifact"] == "onnx-export"
    assert meta["ops"]["MatMulNBits"] == 2 * 4                          # q/k/v, o, gate/up, down per block
    assert meta["ops"]["MatMul"] == 1                                   # the fp16 head only


def test_act_order_is_permuted_into_contiguous_groups_without_g_idx(act_order, tmp_path):
    meta, init = _export_and_compare(act_order, tmp_path / "onnx")
    assert meta["act_order_gathers"] == 2 * 3                            # q/k/v, o, gate/up; down's is folded
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(len(n.input) < 5 or n.input[4] == "" for n in nbits)       # no g_idx input
    assert not any("g_idx" in t.name for t in graph.initializer)
    shared = [n for n in meta["matmul_nbits"] if len(n["modules"]) > 1]
    assert shared and all(n["input_perm"] for n in shared)               # q/k/v: one permutation, one Gather
    assert sum(n["rows_permuted_as"] is not None for n in meta["matmul_nbits"]) == 2     # gate/up of each block
    _logits_match(act_order, tmp_path / "onnx")


def test_odd_block_count_pads_the_zero_points(tiny_llama_96, tmp_path):
    ck = tmp_path / "ck"
    compress(str(tiny_llama_96), parse_recipe({"passes": [{"rtn": {"bits": 4, "group_size": 32, "sym": False}}]}),
             ck, progress=False)
    meta, init = _export_and_compare(ck, tmp_path / "onnx")
    node = next(n for n in meta["matmul_nbits"] if n["K"] == 96)           # 3 blocks: 2 bytes of zero points a row
    assert init[node["zero_points"]].shape == (node["N"], 2)
    _logits_match(ck, tmp_path / "onnx")


def _logits_match(ck, out, atol=2e-4):
    """Prefill, then one cached step, in ONNX Runtime against compressor.load (fp32 both)."""
    import compressor
    model = compressor.load(ck)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    dec = OrtDecoder(out, threads=1)
    got, past = dec.forward(ids[:, :9].numpy(), None)
    got2, _ = dec.forward(ids[:, 9:].numpy(), past)
    scale = want.abs().max().item()
    torch.testing.assert_close(torch.from_numpy(got), want[:, :9], atol=atol * scale, rtol=0)
    torch.testing.assert_close(torch.from_numpy(got2), want[:, 9:], atol=atol * scale, rtol=0)


def test_logits_with_cache_and_padding_match_transformers(quantized, tmp_path):
    import compressor
    ck = quantized("asym4g64")
    out = export_onnx(ck, tmp_path / "onnx")
    _logits_match(ck, out)
    # left padding: row 0 starts 3 tokens late; its logits at real positions equal the unpadded row's
    model = compressor.load(ck)
    ids = torch.randint(3, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = model(ids, attention_mask=mask, position_ids=pos).logits
    dec = OrtDecoder(out, threads=1)
    empty = [np.zeros((2, dec.kv, 0, dec.hd), np.float32)] * (2 * dec.layers)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
    feed.update({f"past_key_values.{i // 2}.{'key' if i % 2 == 0 else 'value'}": e for i, e in enumerate(empty)})
    got = torch.from_numpy(dec.sess.run(["logits"], feed)[0])
    torch.testing.assert_close(got[:, 3:], want[:, 3:], atol=2e-4 * want.abs().max().item(), rtol=0)


def test_accuracy_level_4_and_int8_head(quantized, tmp_path):
    import compressor
    ck = quantized("asym4g64")
    model = compressor.load(ck)
    ids = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits[0]

    def sqnr(out):
        got = torch.from_numpy(OrtDecoder(out, threads=1).logits(ids[0].tolist()))
        return 10 * torch.log10(want.pow(2).mean() / (got - want).pow(2).mean()).item()
    a4 = export_onnx(ck, tmp_path / "a4", accuracy_level=4)
    head = export_onnx(ck, tmp_path / "h8", head="int8")
    assert export_meta(a4)["matmul_nbits"][0]["bits"] == 4
    graph = onnx.load(str(a4 / "model.onnx"), load_external_data=False).graph
    assert {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"} == {4}
    assert 20 < sqnr(a4) < 80                       # int8 activations: close, not exact
    assert sqnr(head) > 30
    assert export_meta(head)["ops"]["MatMulNBits"] == 2 * 4 + 1


@pytest.mark.parametrize("setting,bits", [("head8", 8), ("head4", 4), ("head8-untied", 8)])
def test_quantized_head_is_matmul_nbits_of_its_codes(quantized, tmp_path, setting, bits):
    """A head the checkpoint quantized is a MatMulNBits of its own codes (exact), and a tied embedding gathers
    and dequantizes the same initializers (4-bit: unpacking nibbles), so the table is stored once."""
    ck = quantized(setting)
    out = export_onnx(ck, tmp_path / "onnx")
    meta = export_meta(out)
    hd = meta["embedding_and_head"]
    assert hd["head"] == "checkpoint" and hd["bits"] == bits and hd["tied"] is ("untied" not in setting)
    init = initializers(out)
    n, k = 320, 64
    zp = "lm_head.MatMulNBits.zero_points"
    node = {"N": n, "K": k, "bits": bits, "block_size": hd["block_size"], "B": "lm_head.MatMulNBits.B",
            "scales": "lm_head.MatMulNBits.scales", "zero_points": zp if zp in init else None}
    assert torch.equal(dequantize_node(init, node), ours(ck)["lm_head"])
    assert meta["ops"]["MatMulNBits"] == 2 * 4 + 1 and "MatMul" not in meta["ops"]
    assert any("embed_tokens" in name for name in init) == (not hd["tied"])      # a float table only if untied
    _logits_match(ck, out)


def test_head_option_is_refused_for_a_quantized_head(quantized, tmp_path):
    ck = quantized("head8")
    with pytest.raises(ExportError, match=f"{re.escape(str(ck))}.*already 8-bit.*Drop the head option"):
        export_onnx(ck, tmp_path / "o", head="int8")
    assert not (tmp_path / "o").exists()


def test_float_model_exports_as_matmul(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from compressor.export import Source
    from compressor.export.to_onnx import write_graph
    out = tmp_path / "f"
    out.mkdir()
    (out / "config.json").write_text((tiny_llama / "config.json").read_text())
    meta = write_graph(Source.float_model(tiny_llama), out)
    assert meta["ops"]["MatMul"] == 2 * 4 + 1 and "MatMulNBits" not in meta["ops"]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = list(range(5, 25))
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0]
    got = torch.from_numpy(OrtDecoder(out, threads=1).logits(ids))
    torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=0)


def test_greedy_matches_torch(quantized, tmp_path):
    import compressor
    from compressor.bench.measure import greedy
    ck = quantized("asym4g32")
    out = export_onnx(ck, tmp_path / "onnx")
    prompt = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(4))
    want, _, _ = greedy(compressor.load(ck), prompt, 12)
    got, _, _ = OrtDecoder(out, threads=1).greedy(prompt.numpy(), 12)
    assert np.array_equal(got, want.numpy())


def test_refusals_leave_no_output(quantized, tiny_llama, tmp_path, monkeypatch, capsys):
    from compressor.checkpoint import CheckpointError
    from compressor.cli import main
    with pytest.raises(ExportError, match="not a compressed checkpoint"):
        export_onnx(tiny_llama, tmp_path / "a")
    lr = tmp_path / "lr"
    compress(str(tiny_llama), parse_recipe({"passes": [{"lowrank": {"method": "svd", "target": 0.7}}]}), lr,
             progress=False)
    with pytest.raises(ExportError, match="no onnx form"):
        export_onnx(lr, tmp_path / "b")
    ck = quantized("asym4g32")
    with pytest.raises(ExportError, match="accuracy_level=7"):
        export_onnx(ck, tmp_path / "c", accuracy_level=7)
    out = export_onnx(ck, tmp_path / "ok")
    with pytest.raises(ExportError, match="is an ONNX export"):
        export_onnx(out, tmp_path / "d")
    with pytest.raises(CheckpointError, match="ONNX export"):
        import compressor
        compressor.load(out)
    import builtins
    real = builtins.__import__

    def no_onnx(name, *a, **k):
        if name == "onnx" or name.startswith("onnx."):
            raise ImportError(name)
        return real(name, *a, **k)
    capsys.readouterr()
    monkeypatch.setattr(builtins, "__import__", no_onnx)
    assert main(["export", "onnx", str(ck), "-o", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'compressor[onnx]'" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="needs the onnx extra"):        # a recipe saving onnx: before any work
        parse_recipe({"passes": [{"rtn": {"bits": 4, "group_size": 32}}], "save": {"format": "onnx"}})
    monkeypatch.setattr(builtins, "__import__", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr", "ok"]


def test_adapter_directory_says_merge_first(tiny_llama, tmp_path, calib_text):
    out = tmp_path / "adapter"
    compress(str(tiny_llama), parse_recipe({"passes": [{"lora": {"r": 4, "steps": 1, "seqlen": 16, "batch_size": 1,
                                                                  "warmup": 0, "save": "adapter"}}]}), out,
             train_data=str(calib_text), progress=False)
    with pytest.raises(ExportError, match="merge it first"):
        export_onnx(out, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_compression_json_describes_the_export(quantized, tmp_path):
    ck = quantized("sym4g32")
    out = export_onnx(ck, tmp_path / "onnx", accuracy_level=4)
    meta = json.loads((out / "compression.json").read_text())
    assert meta["options"] == {"accuracy_level": 4} and meta["source"]["checkpoint"] == str(ck.resolve())
    assert meta["embedding_and_head"]["head"] == "fp16" and meta["opset"] == 23
    assert (out / "tokenizer.json").is_file() and "quantization_config" not in json.loads((out / "config.json").read_text())


def test_optimum_ort_model_for_causal_lm_generates_the_same_tokens(quantized, tmp_path):
    """optimum-onnx pins transformers < 4.58, so it runs under its own interpreter
    ($COMPRESSOR_OPTIMUM_PYTHON, made by scripts/install-optimum.sh)."""
    if not OPTIMUM_PYTHON:
        pytest.skip("set COMPRESSOR_OPTIMUM_PYTHON to a venv with optimum-onnx (scripts/install-optimum.sh VENV)")
    out = export_onnx(quantized("asym4g64"), tmp_path / "onnx")
    prompt = [[5, 9, 33, 70, 81, 100]]
    want, _, _ = OrtDecoder(out, threads=1).greedy(np.asarray(prompt), 10)
    code = ("import sys, json, torch; from optimum.onnxruntime import ORTModelForCausalLM; "
            "m = ORTModelForCausalLM.from_pretrained(sys.argv[1]); "
            "ids = torch.tensor(json.loads(sys.argv[2])); "
            "out = m.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10, "
            "min_new_tokens=10); print(json.dumps(out[:, ids.shape[1]:].tolist()))")
    r = subprocess.run([OPTIMUM_PYTHON, "-c", code, str(out), json.dumps(prompt)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == want.tolist()


def test_cuda_provider_is_chosen_when_onnxruntime_gpu_has_it(monkeypatch):
    from compressor.export import ort as ort_mod
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    assert ort_mod.providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert ort_mod.providers() == ["CPUExecutionProvider"]


def test_compress_with_format_onnx_writes_the_export(tiny_bpe_llama, tmp_path):
    out = tmp_path / "o"
    compress(str(tiny_bpe_llama), parse_recipe({"passes": [{"rtn": {"bits": 4, "group_size": 32}}],
                                                "save": {"format": "onnx", "accuracy_level": 4}}), out, progress=False)
    assert export_meta(out)["accuracy_level"] == 4 and (out / "model.onnx_data").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]          # the native checkpoint is removed
    with pytest.raises(ValueError, match="accuracy_level=5"):                # option values: when the recipe is read
        parse_recipe({"passes": [{"rtn": {"bits": 4, "group_size": 32}}], "save": {"format": "onnx", "accuracy_level": 5}})
    with pytest.raises(ValueError, match="no 3-bit layout"):
        parse_recipe({"passes": [{"rtn": {"bits": 3, "group_size": 32}}], "save": {"format": "onnx"}})
