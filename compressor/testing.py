"""Tiny models built here, for the tests and the benchmarks that need a real HF checkpoint but no hub."""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["make_tokenizer", "make_tiny_llama"]


def make_tokenizer(path: Path, vocab: int = 256):
    """A byte-level BPE tokenizer trained on a few sentences, saved as a HF fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog", "a model that is smaller and faster",
            "perplexity of the compressed model", "quantization rounds weights to a grid"] * 50
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return fast


def make_tiny_llama(path: Path, hidden: int = 64, inter: int = 128, layers: int = 2, seed: int = 0,
                    tie: bool = True, vocab: int = 256, dtype: torch.dtype = torch.float32,
                    max_shard_size: str | None = None) -> Path:
    """A random llama with a real tokenizer as an HF directory; `dtype` and `max_shard_size` (e.g. "200KB",
    several shards and an index, as large checkpoints come) as `save_pretrained` takes them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = make_tokenizer(path, vocab)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    model.to(dtype).save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return path
