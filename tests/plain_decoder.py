"""A causal LM written with plain torch.nn (no transformers), to show the passes do not depend on HF classes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden)
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.expand = nn.Linear(hidden, ffn)
        self.contract = nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        h = self.norm1(x)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, -1).transpose(1, 2)

        context = F.scaled_dot_product_attention(split(self.query(h)), split(self.key(h)), split(self.value(h)),
                                                 attn_mask=mask)
        x = x + self.out(context.transpose(1, 2).reshape(batch, length, hidden))
        return x + self.contract(F.gelu(self.expand(self.norm2(x))))


class PlainDecoder(nn.Module):
    def __init__(self, vocab: int = 128, hidden: int = 32, heads: int = 4, ffn: int = 96, layers: int = 3,
                 positions: int = 64) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, hidden)
        self.positions = nn.Embedding(positions, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads, ffn) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        position = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        x = self.tokens(input_ids) + self.positions(position)
        index = torch.arange(length, device=input_ids.device)
        causal = index[None, :] <= index[:, None]
        # a query always sees itself, so left-padded rows never have an empty softmax
        mask = (causal[None] & attention_mask[:, None, :].bool()) | torch.eye(length, dtype=torch.bool)[None]
        for block in self.blocks:
            x = block(x, mask[:, None])
        return self.head(self.norm(x))
