"""compressor/kd.py: divergences against hand computation, the top-k + tail buckets, and the chunked
step against a whole-logits reference (same loss, same gradients)."""
import math

import pytest
import torch

from compressor import kd
from compressor.models import load_hf
from compressor.train import causal_lm_loss, distill_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _kl(p, q):
    return (p * (p.log() - q.log())).sum(-1)


def test_divergences_against_hand_computation():
    torch.manual_seed(0)
    a, b = torch.log_softmax(torch.randn(7, 13), -1), torch.log_softmax(torch.randn(7, 13), -1)
    p, q = a.exp(), b.exp()
    torch.testing.assert_close(kd.divergence(a, b, kd.Divergence.FORWARD), _kl(q, p))
    torch.testing.assert_close(kd.divergence(a, b, kd.Divergence.REVERSE), _kl(p, q))
    m = (p + q) / 2
    torch.testing.assert_close(kd.divergence(a, b, kd.Divergence.JS), 0.5 * _kl(p, m) + 0.5 * _kl(q, m))
    assert kd.divergence(a, b, kd.Divergence.JS).max() <= math.log(2)
    for kind in kd.Divergence:
        assert kd.divergence(a, a, kind).abs().max() < 1e-6
    zero = torch.tensor([[0.0, float("-inf")]])                      # p = (1, 0): the empty bucket adds 0
    assert torch.isfinite(kd.divergence(torch.log(torch.tensor([[0.5, 0.5]])), zero, kd.Divergence.FORWARD)).all()


def test_buckets_are_the_top_k_and_the_rest():
    torch.manual_seed(0)
    z = torch.randn(5, 40)
    idx = z.topk(6, dim=-1).indices
    b = kd.bucket_logprobs(z, idx)
    p = torch.softmax(z, -1)
    torch.testing.assert_close(b[:, :6].exp(), p.gather(1, idx))
    torch.testing.assert_close(b[:, 6].exp(), 1 - p.gather(1, idx).sum(-1))
    torch.testing.assert_close(b.exp().sum(-1), torch.ones(5))
    full = kd.bucket_logprobs(z, torch.arange(40).expand(5, 40))     # every token a bucket: the tail is empty
    assert torch.all(full[:, -1] == kd.TAIL_FLOOR)


def _ref_loss(model, teacher, ids, loss):
    """The same objective from whole (B, L, V) logits, with the reference losses of compressor.train."""
    s = model(input_ids=ids, use_cache=False).logits
    out = s.new_zeros(())
    if loss.kl:
        with torch.no_grad():
            t = teacher(input_ids=ids, use_cache=False).logits
        out = out + loss.kl * distill_loss(s, t, loss.temperature) * ids.shape[0] * ids.shape[1] / ids.numel()
    if loss.ce:
        out = out + loss.ce * causal_lm_loss(s, ids)
    return out


@pytest.mark.parametrize("chunk", [7, 1000])
def test_chunked_step_equals_whole_logits(tiny_llama, chunk):
    model, _ = load_hf(tiny_llama)
    teacher, _ = load_hf(tiny_llama)
    with torch.no_grad():                                            # a student that differs from the teacher
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    body, head = kd.split_head(model)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(head(body(input_ids=ids).last_hidden_state), model(input_ids=ids).logits)
    loss = kd.Loss(kl=1.0, temperature=2.0, ce=0.5, chunk=chunk)
    ref = _ref_loss(model, teacher, ids, loss)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got = kd.step(model, ids, loss, teacher=teacher)
    assert got == pytest.approx(float(ref), rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_cached_top_k_targets_match_the_live_teacher_when_k_covers_the_vocabulary(tiny_llama):
    model, _ = load_hf(tiny_llama)
    teacher, _ = load_hf(tiny_llama)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    windows = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(2))
    loss = kd.Loss(kl=1.0, temperature=1.5, chunk=10)
    w = torch.tensor([3, 1])
    small = kd.teacher_targets(teacher, windows, torch.tensor([1, 3]), loss, k=8, batch_size=2, progress=False)
    assert small.have.tolist() == [False, True, False, True, False] and small.idx.shape == (2, 12, 8)
    with torch.no_grad():
        t = teacher(input_ids=windows[w]).logits / 1.5
    assert torch.equal(small.idx[small.rows(w)].long(), t.topk(8, -1).indices)
    live = kd.step(model, windows[w], loss, teacher=teacher)
    model.zero_grad()
    cached_small = kd.step(model, windows[w], loss, targets=small, windows=w)
    assert 0 < cached_small <= live * (1 + 1e-5)                      # bucketing can only lose information
    model.zero_grad()
    V = teacher.lm_head.out_features
    full = kd.teacher_targets(teacher, windows, w, loss, k=V - 1, batch_size=2, progress=False)
    assert kd.step(model, windows[w], loss, targets=full, windows=w) == pytest.approx(live, rel=1e-4)


def test_hidden_state_loss_is_zero_for_the_teacher_itself_and_trains_the_blocks(tiny_llama):
    model, _ = load_hf(tiny_llama)
    teacher, _ = load_hf(tiny_llama)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(3))
    loss = kd.Loss(kl=0.0, hidden=1.0, hidden_layers=(0, 1))
    assert kd.step(model, ids, loss, teacher=teacher) == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    model.zero_grad()
    assert kd.step(model, ids, loss, teacher=teacher) > 1e-4
    assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0


def _saved_bytes_and_grads(model, ids, loss, autocast):
    """What autograd keeps for the backward pass of `kd.step`'s student forward (bytes, outside any
    recomputation), and the loss and gradients the step gives."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    model.zero_grad(set_to_none=True)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = kd.step(model, ids, loss, targets=None, teacher=None, autocast=autocast)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = sum(n for ptr, n in saved.items() if ptr not in params)
    return kept, value, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_recomputation_keeps_less_and_changes_nothing(tiny_llama, autocast):
    model, _ = load_hf(tiny_llama)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    runs = {how: _saved_bytes_and_grads(model, ids, kd.Loss(kl=0.0, ce=1.0, chunk=16, recompute=how), autocast)
            for how in kd.Recompute}
    none, sel, full = (runs[h] for h in (kd.Recompute.NONE, kd.Recompute.SELECTIVE, kd.Recompute.FULL))
    # (the matmul outputs that `selective` keeps live in the checkpoint's own cache, out of the hooks' sight)
    assert full[0] < none[0] / 2 and sel[0] < none[0] / 2
    for kept, value, grads in (sel, full):
        assert value == none[1]                                    # the same forward, bit for bit
        assert grads.keys() == none[2].keys()
        for n, g in grads.items():
            torch.testing.assert_close(g, none[2][n], rtol=0, atol=0, msg=n)
