"""Exact pack/unpack round trips, and the GPTQ layout checked by an independent unpacker."""
import pytest
import torch

from compressor.quant.packing import pack_bits, pack_gptq, unpack_bits, unpack_gptq


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(32, 1), (64, 3), (96, 17), (320, 118), (256, 7)])
@pytest.mark.parametrize("dim", [0, 1])
def test_round_trip_exact(bits, shape, dim):
    g = torch.Generator().manual_seed(bits * 1000 + shape[1])
    if dim == 1:
        shape = shape[::-1]
    q = torch.randint(0, 2 ** bits, shape, generator=g, dtype=torch.int64)
    p = pack_bits(q, bits, dim=dim)
    assert p.dtype == torch.int32
    assert p.shape[dim] == q.shape[dim] * bits // 32
    assert torch.equal(unpack_bits(p, bits, dim=dim).to(torch.int64), q)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_extreme_codes(bits):
    for v in (0, 2 ** bits - 1):
        q = torch.full((64, 5), v)
        assert torch.equal(unpack_bits(pack_bits(q, bits), bits).long(), q)


def test_pack_refuses_bad_sizes_and_codes():
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_bits(torch.zeros(33, 2, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_bits(torch.zeros(12, 2, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="out of range"):
        pack_bits(torch.full((8, 2), 16), 4)


def _independent_unpack_qweight(qweight: torch.Tensor, bits: int) -> list[list[int]]:
    """From the format description: column n of qweight is a little-endian bit stream in which
    input channel k's code occupies bits [bits*k, bits*k + bits). Pure Python integers."""
    words, n_out = qweight.shape
    out = []
    for n in range(n_out):
        stream = 0
        for w in range(words):
            stream |= (int(qweight[w, n]) & 0xFFFFFFFF) << (32 * w)
        out.append([(stream >> (bits * k)) & (2 ** bits - 1) for k in range(words * 32 // bits)])
    return out  # (N, K)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_gptq_layout_matches_independent_unpacker(bits):
    n, k, group = 64, 128, 32
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2 ** bits, (n, k), generator=g).to(torch.uint8)
    scale = torch.rand(n, k // group, generator=g) + 0.1
    zero = torch.randint(1, 2 ** bits, (n, k // group), generator=g).float()
    t = pack_gptq(q, scale, zero, bits, torch.arange(k, dtype=torch.int32) // group)
    assert t["qweight"].shape == (k * bits // 32, n) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (k // group, n * bits // 32) and t["qzeros"].dtype == torch.int32
    assert t["scales"].shape == (k // group, n) and t["scales"].dtype == torch.float16
    assert torch.equal(torch.tensor(_independent_unpack_qweight(t["qweight"], bits)), q.long())
    # qzeros: row g is a bit stream over output channels holding zero - 1 (auto-gptq v1)
    zs = _independent_unpack_qweight(t["qzeros"].t().contiguous(), bits)  # (G, N) after transpose trick
    assert torch.equal(torch.tensor(zs), zero.t().long() - 1)
    q2, s2, z2, gi = unpack_gptq(t, bits)
    assert torch.equal(q2, q) and torch.equal(z2, zero) and torch.equal(s2, scale.half().float())


def test_sym_4bit_zeros_are_0x77777777():
    """auto-gptq sym 4-bit checkpoints store zero 8 as 7 in every nibble."""
    q = torch.zeros(8, 64, dtype=torch.uint8)
    t = pack_gptq(q, torch.ones(8, 1), torch.full((8, 1), 8.0), 4, torch.zeros(64, dtype=torch.int32))
    assert int(t["qzeros"][0, 0]) == 0x77777777


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape,dim", [((32, 1), 0), ((64, 17), 0), ((3, 64), 1), ((320, 118), 0), ((8,), 0),
                                       ((16, 7, 3), 0), ((5, 256, 2), 1)])
def test_byte_path_equals_the_word_path(monkeypatch, bits, shape, dim):
    """4/8 bits pack through uint8 bytes read as int32 words (little-endian hosts): the same words as the
    general int64 shift loop, and back."""
    import compressor.quant.packing as P
    q = torch.randint(0, 2 ** bits, shape, generator=torch.Generator().manual_seed(bits))
    fast = P.pack_bits(q, bits, dim)
    monkeypatch.setattr(P, "_LITTLE", False)
    slow = P.pack_bits(q, bits, dim)
    assert fast.dtype == slow.dtype == torch.int32 and torch.equal(fast, slow)
    assert torch.equal(P.unpack_bits(slow, bits, dim), q.to(torch.uint8))
    monkeypatch.setattr(P, "_LITTLE", True)
    assert torch.equal(P.unpack_bits(fast, bits, dim), q.to(torch.uint8))
