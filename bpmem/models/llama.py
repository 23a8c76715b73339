"""A Llama-style decoder: RMSNorm, rotary position embeddings (RoPE), grouped-query attention
(GQA) and a SwiGLU MLP, the parts in which today's open models differ from GPT-2. Use it as
``--model bpmem.models.llama:make_llama --data bpmem.models.llama:make_batch``, or with
``--input 'int64[B,T]<V' --target 'int64[B,T]<V'`` for another context T.

Shapes (B batch, T context, C width, H query heads, K key/value heads, D = C/H head width,
F the MLP's hidden width, V vocabulary):
    tokens (B, T) int64 -> embeddings (B, T, C) -> layers -> RMSNorm -> logits (B, T, V)
    attention: q (B, H, T, D); k, v (B, K, T, D), each repeated H/K times to (B, H, T, D)
    MLP: down(silu(gate(x)) * up(x)), gate and up (C -> F), down (F -> C)

What the memory sees: RoPE's cos and sin tables are buffers (T, D/2) made once, not per step;
the key and value projections are K/H the size of the query's, but ``repeat_interleave`` makes
full-size copies for the attention, which autograd saves; SwiGLU keeps three (B, T, F)
tensors (gate, its silu, up) where GPT's GELU MLP keeps two. ``make_llama_1b`` is the shape of
Llama 3.2 1B (16 layers, width 2048, 32 query and 8 key/value heads, F = 8192, V = 128,256,
tied embeddings): 1.24 billion parameters.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB, CONTEXT = 256, 64  # the data function's defaults: byte-level tokens, 64 positions


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without the mean or the bias."""

    def __init__(self, width: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in float32 whatever x is, as Llama does: the mean of squares overflows bfloat16's precision
        scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (x.float() * scale).type_as(x) * self.weight


def rope_tables(context: int, head_width: int, base: float = 500_000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, (T, D/2) each: frequency i is base^(-2i/D)."""
    frequencies = base ** (-torch.arange(0, head_width, 2, dtype=torch.float32) / head_width)
    angles = torch.outer(torch.arange(context, dtype=torch.float32), frequencies)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (even, odd) pair of x's last dimension by its position's angle; x (B, H, T, D)."""
    t = x.shape[-2]
    even, odd = x[..., 0::2], x[..., 1::2]  # (B, H, T, D/2) each
    c, s = cos[:t].to(x.dtype), sin[:t].to(x.dtype)
    return torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2)


class GroupedQueryAttention(nn.Module):
    def __init__(self, width: int, heads: int, kv_heads: int, context: int) -> None:
        super().__init__()
        assert width % heads == 0 and heads % kv_heads == 0, (width, heads, kv_heads)
        self.heads, self.kv_heads, self.head_width = heads, kv_heads, width // heads
        self.q = nn.Linear(width, width, bias=False)
        self.kv = nn.Linear(width, 2 * kv_heads * self.head_width, bias=False)  # k and v in one matmul
        self.out = nn.Linear(width, width, bias=False)
        cos, sin = rope_tables(context, self.head_width)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_width).transpose(1, 2)  # (B, H, T, D)
        k, v = self.kv(x).view(b, t, 2, self.kv_heads, self.head_width).permute(2, 0, 3, 1, 4)  # (B, K, T, D)
        q, k = apply_rope(q, self.cos, self.sin), apply_rope(k, self.cos, self.sin)
        group = self.heads // self.kv_heads  # each key/value head serves this many query heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, T, D)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(width, hidden, bias=False)
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class DecoderLayer(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, width: int, heads: int, kv_heads: int, hidden: int, context: int) -> None:
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(width), RMSNorm(width)
        self.attn = GroupedQueryAttention(width, heads, kv_heads, context)
        self.mlp = SwiGLU(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, vocab: int, context: int, width: int, heads: int, kv_heads: int, hidden: int,
                 layers: int, tied: bool) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(DecoderLayer(width, heads, kv_heads, hidden, context) for _ in range(layers))
        self.norm = RMSNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        if tied:
            self.head.weight = self.tokens.weight  # one (V, C) parameter, counted once
        nn.init.normal_(self.tokens.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tokens(tokens)  # (B, T, C): no position embedding, RoPE places the tokens
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))  # (B, T, V)


def make_llama(vocab: int = VOCAB, context: int = CONTEXT, width: int = 128, heads: int = 4, kv_heads: int = 2,
               hidden: int = 344, layers: int = 4, tied: bool = False) -> Llama:
    """The factory for ``--model``: a small Llama (F = 344 is about 8/3 C, as Llama sizes it).
    ``context`` is the longest sequence RoPE's tables cover; ``--model-kwargs`` changes any argument."""
    return Llama(vocab, context, width, heads, kv_heads, hidden, layers, tied)


def make_llama_1b(context: int = 2048) -> Llama:
    """Llama 3.2 1B's shape, with its tied embeddings: use with ``--input 'int64[B,2048]<128256'``."""
    return Llama(128_256, context, 2048, 32, 8, 8192, 16, tied=True)


def make_batch(batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, next tokens): both (B, T) int64, the target shifted by one position."""
    stream = torch.randint(0, VOCAB, (batch_size, CONTEXT + 1)).to(device)
    return stream[:, :-1].contiguous(), stream[:, 1:].contiguous()
