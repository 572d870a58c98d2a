"""The kernel sets' decode attention (AttendFn / AttendF16Fn in csrc/cpu/kernels.h) through the ``_attend`` hook:
G query heads over one KV head's first L cached rows, fp32 or an fp16 cache."""
import pytest
import torch

from compressor.kernels import extension

pytestmark = pytest.mark.skipif(extension is None, reason="the C++ extension is not built")


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v in float64, over the values the kernel reads (fp16 widened exactly)."""
    if k.dtype == torch.int16:
        k, v = k.view(torch.float16), v.view(torch.float16)
    q, k, v = q.double(), k.double(), v.double()
    return (torch.softmax(q @ k.T * scale, -1) @ v).float()


def case(G: int, L: int, hd: int, half: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, hd, generator=g) for n in (G, L, L))
    k[L // 2] *= 8                                                  # one position that dominates the softmax
    if half:
        k, v = k.half().view(torch.int16), v.half().view(torch.int16)
    return q, k, v


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("hd", [32, 64, 80, 96, 128, 48])
def test_attend_matches_the_float64_reference(isa, half, hd):
    """Every head size with its own code (32, 64, 80, 96, 128 in AVX-512) and one without (48), G = 1 (batch 1's
    items), 3 (SmolLM2's query heads per KV head) and 4, L across AVX-512's blocks of 16 positions and pairs."""
    for G in (1, 3, 4):
        for L in (1, 2, 15, 16, 17, 63, 64, 65, 130):
            q, k, v = case(G, L, hd, half, seed=L)
            out = extension._attend(q, k, v, hd ** -0.5)
            ref = reference(q, k, v, hd ** -0.5)
            assert out.shape == (G, hd)
            assert float((out - ref).norm() / ref.norm()) <= 1e-6, (G, L)


def test_attend_refuses_bad_input():
    q, k, v = case(3, 8, 64, half=False)
    with pytest.raises(RuntimeError, match="k and v contiguous"):
        extension._attend(q, k, v.double(), 0.1)
    with pytest.raises(RuntimeError, match="k and v contiguous"):
        extension._attend(q, k[:, :32].contiguous(), v[:, :32].contiguous(), 0.1)
    with pytest.raises(RuntimeError, match="q a contiguous float32"):
        extension._attend(q.double(), k, v, 0.1)
