"""End to end on the real SmolLM2-135M: compress through the CLI, reload, compare logits."""
import pytest
import torch

import compressor
from compressor.cli import main


@pytest.mark.slow
def test_compress_smollm2_rtn_w4g64_reload_matches(tmp_path):
    from compressor.api import compress
    out = tmp_path / "rtn"
    res = compress("smollm2-135m", "rtn-w4g64", out, progress=False)
    assert res.out_bytes <= 0.25 * res.source_bytes
    loaded = compressor.load(out)
    ids = res.tokenizer("The tower is 324 metres tall, about the same height as an 81-storey building.",
                        return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = res.model(ids).logits, loaded(ids).logits
    assert torch.equal(a, b)


@pytest.mark.slow
def test_cli_smollm2_refuses_group_128(capsys, tmp_path):
    r = tmp_path / "g128.yaml"
    r.write_text("passes:\n  - rtn: {bits: 4, group_size: 128}\n")
    assert main(["--recipe", str(r), "smollm2-135m", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "group_size=128 does not divide in_features of 180 layers" in err and "[-1, 32, 64]" in err
