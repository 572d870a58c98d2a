"""`compressor.hessian`: the accumulators against sums written out by hand."""
import pytest
import torch

from compressor.hessian import Hessian, InputStats


def test_hessian_and_reference_terms_by_hand():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 5, 8, generator=g) for _ in range(3)]        # three batches of (batch, seq, K)
    refs = [x + 0.1 * torch.randn(x.shape, generator=g) for x in xs[:2]]   # a reference for the first two
    h = Hessian(8, reference=True)
    for i, x in enumerate(xs):
        h.add(x, refs[i] if i < 2 else None)
    h.finish()
    X = torch.cat([x.reshape(-1, 8) for x in xs]).double()
    torch.testing.assert_close(h.H.double(), 2 * X.T @ X / X.shape[0], rtol=1e-5, atol=1e-6)
    X1 = X[:20]
    R1 = torch.cat([r.reshape(-1, 8) for r in refs]).double()
    cross, h_ref = h.reference_terms()
    torch.testing.assert_close(cross.double(), 2 * (R1 - X1).T @ X1 / 20, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_ref.double(), 2 * X1.T @ X1 / 20, rtol=1e-5, atol=1e-6)
    assert (h.n, h.n_ref) == (30, 20)


def test_hessian_errors():
    h = Hessian(4)
    with pytest.raises(ValueError, match="no inputs"):
        h.finish()
    with pytest.raises(ValueError, match="reference=True"):
        h.add(torch.randn(3, 4), torch.randn(3, 4))
    h.add(torch.randn(3, 4))
    h.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        h.add(torch.randn(3, 4))
    with pytest.raises(ValueError, match="no reference"):
        h.reference_terms()


def test_input_stats_by_hand():
    x = torch.randn(4, 7, 6)
    s = InputStats(6)
    s.add(x[:2])
    s.add(x[2:].bfloat16().float())
    X = torch.cat([x[:2].reshape(-1, 6), x[2:].bfloat16().float().reshape(-1, 6)])
    torch.testing.assert_close(s.norm, X.norm(dim=0))
    torch.testing.assert_close(s.mean_abs, X.abs().mean(0))


def test_wide_hessian_blocked_upper_half_equals_full_product():
    """From K = 1024 on, XᵀX is accumulated over block rows of the upper half and mirrored at the end:
    the result must be the full, symmetric product (to fp32 summation tolerance), also for the
    reference snapshot taken mid-way."""
    g = torch.Generator().manual_seed(3)
    x = [torch.randn(40, 1030, generator=g) for _ in range(3)]
    h = Hessian(1030, reference=True)
    h.add(x[0], x[0] * 1.1)
    h.add(x[1])
    h.add(x[2])
    h.finish()
    X = torch.cat(x).double()
    torch.testing.assert_close(h.H.double(), 2 * X.t() @ X / X.shape[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(h.H, h.H.t())
    _, H_ref = h.reference_terms()
    torch.testing.assert_close(H_ref.double(), 2 * x[0].double().t() @ x[0].double() / 40, rtol=1e-5, atol=1e-5)


def test_inverse_cholesky_is_the_upper_factor_of_the_inverse():
    from compressor.hessian import inverse_cholesky
    torch.manual_seed(0)
    X = torch.randn(400, 96)
    H = X.T @ X / 400 + 0.01 * torch.eye(96)
    U = inverse_cholesky(H)
    assert torch.equal(U, torch.triu(U))
    torch.testing.assert_close(U.T @ U @ H, torch.eye(96), rtol=0, atol=1e-4)
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    torch.testing.assert_close(U, ref, rtol=1e-4, atol=1e-5)
