"""The scorer against lm-eval's definitions: the tokenization split, the leading-space rule, acc and
acc_norm on stubbed log-likelihoods, and the packed rows against scoring each choice on its own."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaForCausalLM

from compressor.tasks import Item, TaskResult, encode_pair, loglikelihoods
from compressor.tasks.scoring import _batches, encode_item


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return LlamaForCausalLM.from_pretrained(tiny_llama).eval(), AutoTokenizer.from_pretrained(tiny_llama)


def test_split_is_at_the_context_tokens(tiny):
    _, tok = tiny
    ctx, cont = encode_pair(tok, "the quick brown", " fox jumps")
    whole = tok.encode("the quick brown fox jumps", add_special_tokens=False)
    assert ctx == tok.encode("the quick brown", add_special_tokens=False)
    assert ctx + cont == ctx + whole[len(ctx):] and cont == whole[len(ctx):]


def test_trailing_space_of_the_context_moves_to_the_continuation(tiny):
    _, tok = tiny
    a = encode_pair(tok, "Answer: ", "yes")           # the space belongs to the continuation
    b = encode_pair(tok, "Answer:", " yes")
    assert a == b
    assert a[0] == tok.encode("Answer:", add_special_tokens=False)


def test_empty_context_is_the_prefix_token(tiny):
    _, tok = tiny
    ctx, cont = encode_pair(tok, "", "the fox")
    assert ctx == [tok.eos_token_id] and cont == tok.encode("the fox", add_special_tokens=False)


def test_acc_and_acc_norm_as_lm_eval_defines_them():
    """3 handcrafted items with known log-likelihoods: acc is the argmax of the sum, acc_norm the
    argmax of the sum over the choice's length in characters (without the separating space)."""
    items = [Item("q1", ("aa", "bbbbbbbb"), gold=1),        # sums -2, -4: acc picks 0; per char -1, -0.5 -> 1
             Item("q2", ("x", "yy", "zzz"), gold=0),        # sums -1, -3, -3.3 (per char -1, -1.5, -1.1): both 0
             Item("q3", ("long answer", "no"), gold=0)]     # -5.5 / 11 = -0.5 vs -1.2 / 2 = -0.6: norm 0, acc 1
    lls = [(-2.0, -4.0), (-1.0, -3.0, -3.3), (-5.5, -1.2)]
    r = TaskResult.from_scores("stub", lls, items)
    assert r.correct == [0, 1, 0] and r.correct_norm == [1, 1, 1]
    assert r.acc == pytest.approx(1 / 3) and r.acc_norm == 1.0


def _one_by_one(model, tok, item: Item) -> list[float]:
    """The plain implementation: every choice its own sequence, full log-softmax."""
    out = []
    for ch in item.choices:
        ctx, cont = encode_pair(tok, item.context, item.delimiter + ch)
        x = torch.tensor([ctx + cont[:-1]])
        with torch.no_grad():
            logp = F.log_softmax(model(x).logits[0].double(), -1)
        out.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
    return out


def test_packed_rows_equal_each_choice_alone(tiny):
    model, tok = tiny
    items = [Item("the quick brown fox", ("jumps over", "is lazy", "a model that is smaller", "dog"), 0),
             Item("perplexity of the", ("compressed model", "fox"), 1),
             Item("quantization rounds", ("weights to a grid and more words here", "x"), 0),
             Item("a", ("b",), 0)]
    got = loglikelihoods(model, tok, items, precision="fp32", batch_tokens=40, progress=False)
    assert len(_batches([encode_item(tok, it) for it in items], 40)) > 1       # several padded batches ran
    for it, g in zip(items, got):
        ref = _one_by_one(model, tok, it)
        assert g == pytest.approx(ref, abs=1e-4), it
        assert all(math.isfinite(x) and x < 0 for x in g)


def test_bf16_stays_close_to_fp32(tiny):
    model, tok = tiny
    items = [Item("the quick brown fox", ("jumps over", "is lazy"), 0)]
    a = loglikelihoods(model, tok, items, precision="fp32", progress=False)[0]
    b = loglikelihoods(model, tok, items, precision="bf16", progress=False)[0]
    assert b == pytest.approx(a, rel=0.05, abs=0.05)
    assert next(model.parameters()).dtype == torch.float32        # autocast: the model is untouched


def test_bad_precision_is_refused(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="precision='fp8'"):
        loglikelihoods(model, tok, [Item("a", ("b",), 0)], precision="fp8", progress=False)
