"""Training machinery: losses against hand computation, seeded data order, schedule, atomic state."""
import pytest
import torch
import torch.nn as nn

from compressor.train import (TokenWindows, causal_lm_loss, distill_loss, load_state, rng_state, save_state,
                              set_rng_state, warmup_cosine)


def test_losses_against_hand_computation():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    assert distill_loss(t, t).abs() < 1e-6
    p = torch.softmax(t / 2, -1)
    kl = (p * (p.log() - torch.log_softmax(s / 2, -1))).sum(-1).mean() * 4
    torch.testing.assert_close(distill_loss(s, t, temperature=2.0), kl)
    ids = torch.randint(0, 11, (2, 5))
    ref = nn.functional.cross_entropy(s[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(causal_lm_loss(s, ids), ref)


def test_token_windows_are_a_pure_function_of_seed_and_step():
    ids = torch.arange(1000)
    a, b = TokenWindows(ids, 17, seed=3), TokenWindows(ids, 17, seed=3)
    assert len(a) == 58
    assert torch.equal(a.batch(40, 4), b.batch(40, 4))            # no state: step 40 without steps 0..39
    assert not torch.equal(a.batch(0, 4), TokenWindows(ids, 17, seed=4).batch(0, 4))
    epoch = torch.cat([a.batch(s, 2) for s in range(29)])          # one epoch: every window exactly once
    assert sorted(epoch[:, 0].tolist()) == list(range(0, 58 * 17, 17))
    assert torch.equal(epoch[0, 1:] - epoch[0, :-1], torch.ones(16, dtype=torch.long))
    with pytest.raises(ValueError, match="fewer than one window of seqlen=2000"):
        TokenWindows(ids, 2000)


def test_warmup_cosine():
    f = [warmup_cosine(s, 20, 4) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == 1.0
    assert all(x >= y for x, y in zip(f[4:], f[5:])) and f[-1] > 0.1 and warmup_cosine(20, 20, 4) == pytest.approx(0.1)


def test_state_round_trip_and_rng(tmp_path):
    st = rng_state()
    a = torch.rand(3)
    set_rng_state(st)
    assert torch.equal(torch.rand(3), a)
    p = tmp_path / "w" / "s.pt"
    save_state(p, {"step": 3, "losses": [0.5], "rng": st, "t": torch.ones(2)})
    back = load_state(p)
    assert back["step"] == 3 and torch.equal(back["t"], torch.ones(2)) and [f.name for f in p.parent.iterdir()] == ["s.pt"]
    p.write_bytes(p.read_bytes()[:50])
    with pytest.raises(ValueError, match="unreadable training state"):
        load_state(p)
