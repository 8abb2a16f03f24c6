"""Small configs of the decoder families shadowfx is tested on, for the demo and the tests (random weights)."""

from __future__ import annotations

from typing import Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    Qwen2Config,
)

Family = Literal["opt", "llama", "gpt2", "mistral", "qwen2"]
FAMILIES: tuple[Family, ...] = ("opt", "llama", "gpt2", "mistral", "qwen2")


def small_config(family: Family, *, num_layers: int = 3, hidden: int = 64, heads: int = 4, vocab: int = 512) -> PretrainedConfig:
    """A tiny config of ``family``; GQA families get half as many KV heads as query heads."""
    if family == "opt":
        return OPTConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=num_layers, ffn_dim=4 * hidden,
                         num_attention_heads=heads, max_position_embeddings=256, word_embed_proj_dim=hidden)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=num_layers, n_head=heads, n_positions=256,
                          bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    gated = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=num_layers, intermediate_size=3 * hidden,
                 num_attention_heads=heads, max_position_embeddings=256)
    if family == "llama":
        return LlamaConfig(num_key_value_heads=heads // 2, **gated)
    if family == "mistral":
        return MistralConfig(num_key_value_heads=heads // 2, sliding_window=None, **gated)
    if family == "qwen2":
        return Qwen2Config(num_key_value_heads=heads // 2, **gated)
    raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")


def build_small(family: Family, *, attn_implementation: str = "sdpa", seed: int = 0, **config_overrides: int) -> torch.nn.Module:
    """A randomly initialised small model of ``family`` in eval mode."""
    torch.manual_seed(seed)
    config = small_config(family, **config_overrides)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()
