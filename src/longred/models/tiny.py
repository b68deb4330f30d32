"""A tiny random Llama teacher with a real (byte-level BPE) tokenizer, for tests and the smoke demo.

The tokenizer is trained in about a second on the standard library's pydoc topics, so it encodes real
text into a small vocabulary; the model is a randomly initialised ``LlamaForCausalLM`` from a config.
Nothing is downloaded. Deterministic for a given seed.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from longred.corpus.embedded import embedded_documents

__all__ = ["build_tiny_teacher"]


def build_tiny_teacher(
    folder: str | Path,
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    vocab_size: int = 512,
    max_position_embeddings: int = 512,
    rope_theta: float = 10000.0,
    seed: int = 0,
) -> Path:
    """Save a random Llama and a BPE tokenizer trained on stdlib prose into ``folder``; returns it."""
    folder = Path(folder)
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(itertools.islice(embedded_documents("prose"), 40), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
