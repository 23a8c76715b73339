"""A small GPT-style decoder: token and position embeddings, ``layers`` pre-LayerNorm blocks
of causal self-attention and an MLP, a final LayerNorm, and an output head tied to the token
embedding. Use it as ``--model bpmem.models.gpt:make_gpt --data bpmem.models.gpt:make_batch``.

Shapes (B batch, T context, C width, H heads, V vocabulary):
    tokens (B, T) int64 -> embeddings (B, T, C) -> layers -> logits (B, T, V)
    attention: q, k, v (B, H, T, C/H), through ``scaled_dot_product_attention(is_causal=True)``
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB, CONTEXT = 256, 64  # the data function's defaults: byte-level tokens, 64 positions


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)  # q, k and v in one matmul: (B, T, 3C)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        # (B, T, 3C) -> three (B, H, T, C/H)
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """x + attn(ln(x)), then x + mlp(ln(x)): the pre-LayerNorm residual block."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, context: int, width: int, heads: int, layers: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tokens.weight  # tied: one (V, C) parameter, counted once
        for embedding in (self.tokens, self.positions):  # GPT-2's scale keeps the first logits small
            nn.init.normal_(embedding.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tokens(tokens) + self.positions(positions)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))  # (B, T, V)


def make_gpt(vocab: int = VOCAB, context: int = CONTEXT, width: int = 128, heads: int = 4,
             layers: int = 4) -> GPT:
    """The factory for ``--model``; ``--model-kwargs '{"layers": 8}'`` changes any argument."""
    return GPT(vocab, context, width, heads, layers)


def make_batch(batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, next tokens): both (B, T) int64, the target shifted by one position."""
    stream = torch.randint(0, VOCAB, (batch_size, CONTEXT + 1)).to(device)
    return stream[:, :-1].contiguous(), stream[:, 1:].contiguous()
