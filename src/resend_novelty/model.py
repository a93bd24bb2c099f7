"""The relational module r and head c of ReSeND (Cappio Borlino et al., ECCV 2022, Sec. 3.1).

Given backbone features f_i, f_j of two images::

    z_i = W_p f_i + b_p                                   (eq. 2: per-image projection to a token)
    s^0 = [ l, z_i, z_j ]                                 (eq. 3: learnable label token l, no
                                                           positional embedding)
    s'  = s^{b-1} + MSA(LN(s^{b-1}))                      (eq. 4: B pre-LayerNorm blocks,
    s^b = s' + MLP(LN(s'))                                 b = 1..B)
    sigma_ij = sigmoid( c( LN(s^B_0) ) )                  (eq. 5: LayerNorm on the label token,
                                                           one FC head)

Without positional embeddings the blocks are permutation-equivariant, so the label token - and
therefore sigma_ij - is symmetric in (i, j).

Beyond the paper, the module optionally normalises its input features (``input_norm``: ``"l2"``
or ``"none"``) and applies dropout to them during training (``input_dropout``); both are part of
the config stored with the weights, so a checkpoint always rebuilds the same function.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RelationalConfig", "RelationalModule", "TransformerBlock"]


@dataclass
class RelationalConfig:
    feature_dim: int = 1280  # backbone feature size (1280 EfficientNet-Lite0, 512 ResNet-18)
    dim: int = 256  # token width
    depth: int = 4  # B, number of transformer blocks (paper: 4)
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0  # dropout inside the blocks
    input_norm: str = "l2"  # "l2" | "none": normalisation of backbone features
    input_dropout: float = 0.0  # dropout on the (normalised) features while training
    backbone: str = "efficientnet_lite0"  # the backbone the module was trained on

    def __post_init__(self):
        if self.input_norm not in ("l2", "none"):
            raise ValueError(f"input_norm must be 'l2' or 'none', got {self.input_norm!r}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        for name in ("feature_dim", "dim", "depth", "heads"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RelationalConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown relational-config keys: {unknown}")
        return cls(**d)


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


class RelationalModule(nn.Module):
    """r + c: from two backbone features to the similarity logit (sigmoid gives sigma_ij)."""

    def __init__(self, config: RelationalConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = RelationalConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a config or keyword arguments, not both")
        self.config = config
        c = config
        self.proj = nn.Linear(c.feature_dim, c.dim)
        self.label_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.blocks = nn.ModuleList(
            TransformerBlock(c.dim, c.heads, c.mlp_ratio, c.dropout) for _ in range(c.depth)
        )
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, 1)
        self.input_dropout = nn.Dropout(c.input_dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.label_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def normalize(self, features: torch.Tensor) -> torch.Tensor:
        """Input normalisation of backbone features (part of the model's config)."""
        if self.config.input_norm == "l2":
            return F.normalize(features, dim=-1)
        return features

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """Eq. 2: one token per image. Independent of the pair, so computed once per image."""
        if features.shape[-1] != self.config.feature_dim:
            raise ValueError(
                f"features have dimension {features.shape[-1]}, the relational module expects "
                f"{self.config.feature_dim} (backbone {self.config.backbone!r})"
            )
        return self.proj(self.input_dropout(self.normalize(features)))

    def relate(self, z_i: torch.Tensor, z_j: torch.Tensor) -> torch.Tensor:
        """Eqs. 3-5 on tokens ``(P, dim)`` of P pairs: returns the similarity logits ``(P,)``."""
        label = self.label_token.expand(z_i.shape[0], -1, -1)
        s = torch.cat([label, z_i.unsqueeze(1), z_j.unsqueeze(1)], dim=1)  # eq. 3
        for block in self.blocks:  # eq. 4
            s = block(s)
        return self.head(self.norm(s[:, 0])).squeeze(-1)  # eq. 5 (logit; sigmoid -> sigma)

    def forward(self, f_i: torch.Tensor, f_j: torch.Tensor) -> torch.Tensor:
        """Similarity logits of the pairs (f_i[p], f_j[p]); ``torch.sigmoid`` gives sigma in [0, 1]."""
        return self.relate(self.encode(f_i), self.encode(f_j))

    def pairwise_logits(
        self, queries: torch.Tensor, keys: torch.Tensor, chunk_pairs: int = 65536
    ) -> torch.Tensor:
        """Logits of every (query, key) pair, ``(Nq, Nk)``, in chunks of at most ``chunk_pairs``.

        Each image is projected once (eq. 2); only the pair-dependent blocks run per pair, and
        memory stays bounded whatever the number of queries.
        """
        zq, zk = self.encode(queries), self.encode(keys)
        nq, nk = zq.shape[0], zk.shape[0]
        out = torch.empty(nq, nk, device=zq.device, dtype=torch.float32)
        rows = max(1, chunk_pairs // max(nk, 1))
        for start in range(0, nq, rows):
            zi = zq[start : start + rows]
            n = zi.shape[0]
            logits = self.relate(
                zi.unsqueeze(1).expand(n, nk, -1).reshape(n * nk, -1),
                zk.unsqueeze(0).expand(n, nk, -1).reshape(n * nk, -1),
            )
            out[start : start + n] = logits.float().view(n, nk)
        return out
