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
or ``"none"``) and applies dropout to them during training (``input_dropout``), and can add a
learnable cosine *skip connection* to the logit (``cosine_skip``)::

    logit_ij = c( LN(s^B_0) ) + gamma * (cos(f_i, f_j) - delta)

With the head initialised at zero, training starts from the cosine-similarity detector and the
transformer learns corrections to it (e.g. invariance to the image domain). All options are part of
the config stored with the weights, so a checkpoint always rebuilds the same function; the default
config is exactly the paper's module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RelationalConfig", "RelationalModule", "TransformerBlock", "build_relational", "ARCHS"]

# "transformer": the paper's relational module; the others are the ablations of the paper's
# Table 5 (hand-designed aggregation of the two tokens + MLP, resend_novelty.models.aggregation)
ARCHS = ("transformer", "max", "sum", "concat")
NORMALITIES = ("softmax", "max-logit")


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
    cosine_skip: bool = False  # add gamma * (cos(f_i, f_j) - delta) to the logit (not in the paper)
    center_features: bool = False  # trained on per-domain centred features: detectors centre
    # support features on the support mean and test features on the test mean (not in the paper)
    arch: str = "transformer"  # relational module; "max"/"sum"/"concat": Table 5 ablations
    standardize_features: bool = False  # trained on per-domain standardised features (mean and
    # std per dimension, resend_novelty.transforms.domain_norm); detectors do the same (not in the paper)
    normality: str = "softmax"  # the detector's default normality: "softmax" = max(softmax(u))
    # (the paper), "max-logit" = max(u) (the similarity to the nearest prototype)
    neighbors: int = 0  # the detector's default support references: 0 = one prototype per class
    # (the paper); k = also the k support images of each class nearest to the test image
    neighbor_weight: float = 1.0  # with neighbors = k: u_c = (1 - w) * logit with the class
    # prototype + w * mean logit with the k nearest support images of class c (not in the paper)

    @property
    def domain_norm(self) -> str:
        """The per-domain feature normalisation the module was trained with (``domain_norm``)."""
        if self.standardize_features:
            return "standardize"
        return "center" if self.center_features else "none"

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.normality not in NORMALITIES:
            raise ValueError(f"normality must be one of {NORMALITIES}, got {self.normality!r}")
        if self.input_norm not in ("l2", "none"):
            raise ValueError(f"input_norm must be 'l2' or 'none', got {self.input_norm!r}")
        if int(self.neighbors) < 0:
            raise ValueError(f"neighbors must be >= 0 (0 = class prototypes), got {self.neighbors}")
        if not 0.0 <= float(self.neighbor_weight) <= 1.0:
            raise ValueError(f"neighbor_weight must be in [0, 1], got {self.neighbor_weight}")
        for name in ("feature_dim", "dim", "depth", "heads"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")

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

    # -- inference helpers of RelationalModule.pairwise_logits: the same function as forward()
    #    in eval mode, with the attention written out so that work can be skipped or shared
    def _qkv(self, s: torch.Tensor) -> torch.Tensor:
        """Packed ``[q, k, v]`` of each token (``(..., 3 dim)``): depends on that token only."""
        return F.linear(self.norm1(s), self.attn.in_proj_weight, self.attn.in_proj_bias)

    def _pair_forward(
        self, s: torch.Tensor, qkv: torch.Tensor | None = None, label_only: bool = False
    ) -> torch.Tensor:
        """Eval-mode forward of ``s`` ``(P, L, dim)`` given precomputed ``qkv`` (optional);
        ``label_only`` returns only the updated first (label) token, ``(P, 1, dim)``."""
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
            q, k, v = self._qkv(s).split(d, dim=-1)
        a = _short_attention(q, k, v, self.attn.num_heads)
        s = (s[:, :1] if label_only else s) + self.attn.out_proj(a)
        return s + self.mlp(self.norm2(s))


def _short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head softmax(q k^T / sqrt(d)) v for very short sequences (here 3 tokens).

    ``q`` ``(P, Lq, dim)``, ``k``/``v`` ``(P, L, dim)`` -> ``(P, Lq, dim)``. Written with broadcast
    products instead of ``scaled_dot_product_attention``: with L = 3 the attention is a handful of
    multiply-adds per pair, which SDPA's CPU kernel handles about 2x (Lq = 3) to 3.5x (Lq = 1)
    slower in a micro-benchmark of 4096 pairs; the whole batched scorer gets 5-10% faster
    (``benchmarks/speed.py`` part a, SDPA comparison row). Same result up to float rounding.
    Other devices keep SDPA (its fused kernels; the broadcast form was not measured there).
    """
    if q.device.type != "cpu":
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
    q, k, v = (t.unflatten(-1, (heads, -1)) for t in (q, k, v))  # (P, L, heads, d)
    scores = (q.unsqueeze(2) * k.unsqueeze(1)).sum(-1) * q.shape[-1] ** -0.5  # (P, Lq, L, heads)
    weights = scores.softmax(dim=2)
    return (weights.unsqueeze(-1) * v.unsqueeze(1)).sum(2).flatten(2)  # (P, Lq, dim)


class RelationalModule(nn.Module):
    """r + c: from two backbone features to the similarity logit (sigmoid gives sigma_ij)."""

    def __init__(self, config: RelationalConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = RelationalConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a config or keyword arguments, not both")
        if config.arch != "transformer":
            raise ValueError(
                f"arch={config.arch!r} is an ablation model: build it with build_relational(config)"
            )
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
        if c.cosine_skip:
            self.cos_scale = nn.Parameter(torch.tensor(10.0))  # gamma
            self.cos_shift = nn.Parameter(torch.tensor(0.5))  # delta
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.label_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.config.cosine_skip:  # start exactly at the cosine detector
            nn.init.zeros_(self.head.weight)

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

    def cosine_term(self, cos: torch.Tensor) -> torch.Tensor:
        return self.cos_scale * (cos - self.cos_shift)

    def forward(self, f_i: torch.Tensor, f_j: torch.Tensor) -> torch.Tensor:
        """Similarity logits of the pairs (f_i[p], f_j[p]); ``torch.sigmoid`` gives sigma in [0, 1]."""
        logits = self.relate(self.encode(f_i), self.encode(f_j))
        if self.config.cosine_skip:
            logits = logits + self.cosine_term(F.cosine_similarity(f_i, f_j, dim=-1))
        return logits

    def pairwise_logits(
        self, queries: torch.Tensor, keys: torch.Tensor, chunk_pairs: int = 65536
    ) -> torch.Tensor:
        """Logits of every (query, key) pair, ``(Nq, Nk)``, in chunks of at most ``chunk_pairs``.

        Each image is projected once (eq. 2); only the pair-dependent blocks run per pair.
        Queries are moved to the model's device and projected chunk by chunk, so memory stays
        bounded whatever the number of queries. In eval mode, work that does not depend on the
        pair is shared too: the first block's LayerNorm and q/k/v projection of each token are
        computed once per image, and the last block updates only the label token (the only one
        the head reads). Same function as :meth:`relate` (up to float rounding).
        """
        device = self.proj.weight.device
        zk = self.encode(keys.to(device))
        self.encode(queries[:0].to(device))  # dimension check, even without queries
        nq, nk = queries.shape[0], zk.shape[0]
        out = torch.empty(nq, nk, device=device, dtype=torch.float32)
        rows = max(1, chunk_pairs // max(nk, 1))
        fast = self._fast_pairs()
        if fast:
            first, last = self.blocks[0], len(self.blocks) - 1
            label = self.label_token.reshape(1, -1)
            qkv_label, qkv_k = first._qkv(label), first._qkv(zk)
        for start in range(0, nq, rows):
            zi = self.encode(queries[start : start + rows].to(device, non_blocking=True))
            n = zi.shape[0]

            def pairs(x_i, x_k):  # (n, c), (nk, c) -> (n * nk, c) each, query-major
                return (x_i.unsqueeze(1).expand(n, nk, -1).reshape(n * nk, -1),
                        x_k.unsqueeze(0).expand(n, nk, -1).reshape(n * nk, -1))

            if fast:
                p = n * nk
                s = torch.stack([label.expand(p, -1), *pairs(zi, zk)], dim=1)  # eq. 3
                qkv = torch.stack([qkv_label.expand(p, -1), *pairs(first._qkv(zi), qkv_k)], dim=1)
                s = first._pair_forward(s, qkv, label_only=last == 0)
                for b in range(1, last + 1):
                    s = self.blocks[b]._pair_forward(s, label_only=b == last)
                logits = self.head(self.norm(s[:, 0])).squeeze(-1)
            else:
                logits = self.relate(*pairs(zi, zk))
            out[start : start + n] = logits.float().view(n, nk)
        if self.config.cosine_skip:
            cos = (F.normalize(queries.to(device).float(), dim=-1)
                   @ F.normalize(keys.to(device).float(), dim=-1).T)
            out = out + self.cosine_term(cos).float()
        return out

    def _fast_pairs(self) -> bool:
        """Whether pairwise_logits may use the shared-work path (eval mode, this very relate)."""
        return (
            not self.training
            and type(self).relate is RelationalModule.relate
            and len(self.blocks) > 0
            and all(
                type(b) is TransformerBlock
                and b.attn.batch_first
                and b.attn._qkv_same_embed_dim
                and b.attn.in_proj_bias is not None
                and b.attn.bias_k is None
                and not b.attn.add_zero_attn
                for b in self.blocks
            )
        )


def build_relational(config: RelationalConfig) -> RelationalModule:
    """The relational model of ``config.arch``: the transformer of the paper or an ablation."""
    if config.arch == "transformer":
        return RelationalModule(config)
    from .aggregation import AggregationModule

    return AggregationModule(config)
