"""SparseLinear: dense-speed forward, compact state dict, exact reload."""
import torch
import torch.nn as nn

from compressor.nn.sparse import SparseLinear
from compressor.sparsity import row_mask


def _sparse(n=48, k=64, bias=True):
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=bias)
    return lin, SparseLinear.from_linear(lin, row_mask(lin.weight.abs(), 0.5))


def test_forward_is_the_masked_linear():
    lin, sp = _sparse()
    x = torch.randn(3, 64)
    w = (lin.weight * row_mask(lin.weight.abs(), 0.5)).half().float()
    torch.testing.assert_close(sp(x), nn.functional.linear(x, w, lin.bias), rtol=0, atol=0)
    assert float((sp.weight == 0).float().mean()) == 0.5


def test_state_dict_is_compact_and_reloads_exactly():
    _, sp = _sparse()
    sd = sp.state_dict()
    assert set(sd) == {"weight.bitmask", "weight.compressed", "weight.row_offsets", "bias"}
    assert sd["weight.compressed"].dtype == torch.float16 and sd["weight.compressed"].numel() == 48 * 32
    assert sd["weight.bitmask"].shape == (48, 8)
    fresh = SparseLinear.from_spec(sp.spec())
    fresh.load_state_dict(sd, assign=True)
    assert torch.equal(fresh.weight, sp.weight) and torch.equal(fresh.bias, sp.bias)
    assert fresh.spec() == sp.spec()


def test_meta_skeleton_state_dict_matches_shapes():
    _, sp = _sparse(bias=False)
    skel = SparseLinear.from_spec(sp.spec())
    want = {k: tuple(v.shape) for k, v in skel.state_dict().items()}
    assert want == {k: tuple(v.shape) for k, v in sp.state_dict().items()}


def test_missing_keys_are_reported():
    _, sp = _sparse()
    sd = sp.state_dict()
    del sd["weight.bitmask"]
    res = SparseLinear.from_spec(sp.spec()).load_state_dict(sd, strict=False, assign=True)
    assert "weight.bitmask" in res.missing_keys
