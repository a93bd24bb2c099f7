"""The transformer block of the relational module (eq. 4) and its short-sequence attention.

:class:`TransformerBlock` is a pre-LayerNorm block, multi-head self-attention then an MLP, each
with a residual::

    s'  = s + MSA(LN(s))
    s^b = s' + MLP(LN(s'))

It has no positional embedding, so it is permutation-equivariant in its tokens. Besides
``forward`` it offers the same function in eval mode with the attention written out
(:meth:`TransformerBlock.qkv`, :meth:`TransformerBlock.pair_forward`), which
:meth:`~resend_novelty.models.relational.RelationalModule.pairwise_logits` uses to share the work
that does not depend on the pair.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TransformerBlock", "short_attention", "sdpa_attention", "Attention"]

# multi-head attention function: (q (P, Lq, dim), k (P, L, dim), v (P, L, dim), heads) -> (P, Lq, dim)
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head softmax(q k^T / sqrt(d)) v with ``scaled_dot_product_attention``.

    ``q`` ``(P, Lq, dim)``, ``k``/``v`` ``(P, L, dim)`` -> ``(P, Lq, dim)``.
    """
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head softmax(q k^T / sqrt(d)) v for very short sequences (here 3 tokens).

    ``q`` ``(P, Lq, dim)``, ``k``/``v`` ``(P, L, dim)`` -> ``(P, Lq, dim)``. Written with broadcast
    products instead of ``scaled_dot_product_attention``: with L = 3 the attention is a handful of
    multiply-adds per pair, which SDPA's CPU kernel handles about 2x (Lq = 3) to 3.5x (Lq = 1)
    slower in a micro-benchmark of 4096 pairs; the whole batched scorer gets 5-10% faster
    (``benchmarks/speed.py`` part a, SDPA comparison row). Same result up to float rounding.
    Other devices keep SDPA (:func:`sdpa_attention`: its fused kernels; the broadcast form was
    not measured there).
    """
    if q.device.type != "cpu":
        return sdpa_attention(q, k, v, heads)
    q, k, v = (t.unflatten(-1, (heads, -1)) for t in (q, k, v))  # (P, L, heads, d)
    scores = (q.unsqueeze(2) * k.unsqueeze(1)).sum(-1) * q.shape[-1] ** -0.5  # (P, Lq, L, heads)
    weights = scores.softmax(dim=2)
    return (weights.unsqueeze(-1) * v.unsqueeze(1)).sum(2).flatten(2)  # (P, Lq, dim)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: multi-head self-attention + MLP, each with a residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        h = self.norm1(s)
        s = s + self.attn(h, h, h, need_weights=False)[0]  # eq. 4, first line
        s = s + self.mlp(self.norm2(s))  # eq. 4, second line
        return s

    # -- inference helpers of RelationalModule.pairwise_logits: the same function as forward()
    #    in eval mode, with the attention written out so that work can be skipped or shared
    def qkv(self, s: torch.Tensor) -> torch.Tensor:
        """Packed ``[q, k, v]`` of each token (``(..., 3 dim)``): depends on that token only."""
        return F.linear(self.norm1(s), self.attn.in_proj_weight, self.attn.in_proj_bias)

    def pair_forward(
        self,
        s: torch.Tensor,
        qkv: torch.Tensor | None = None,
        label_only: bool = False,
        attention: Attention = short_attention,
    ) -> torch.Tensor:
        """Eval-mode forward of ``s`` ``(P, L, dim)`` given precomputed ``qkv`` (optional);
        ``label_only`` returns only the updated first (label) token, ``(P, 1, dim)``;
        ``attention`` computes the multi-head attention from q, k, v."""
        d = s.shape[-1]
        w, b = self.attn.in_proj_weight, self.attn.in_proj_bias
        if qkv is not None:
            q, k, v = qkv.split(d, dim=-1)
            if label_only:
                q = q[:, :1]
        elif label_only:
            h = self.norm1(s)
            q = F.linear(h[:, :1], w[:d], b[:d])
            k, v = F.linear(h, w[d:], b[d:]).split(d, dim=-1)
        else:
            q, k, v = self.qkv(s).split(d, dim=-1)
        a = attention(q, k, v, self.attn.num_heads)
        s = (s[:, :1] if label_only else s) + self.attn.out_proj(a)
        return s + self.mlp(self.norm2(s))
