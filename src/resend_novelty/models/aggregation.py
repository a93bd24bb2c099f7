"""Ablations of the relational module (paper Table 5): hand-designed pair aggregation + MLP.

ReSeND's relational module r lets the two image tokens attend to each other through B
transformer blocks (:class:`~resend_novelty.models.relational.RelationalModule`). The ablation
replaces r by a fixed aggregation of the two projected tokens ``z_i = W_p f_i + b_p`` (eq. 2, unchanged)::

    a_ij = max(z_i, z_j)        (arch="max", element-wise; symmetric)
    a_ij = z_i + z_j            (arch="sum"; symmetric)
    a_ij = [z_i ; z_j]          (arch="concat"; order-dependent: (query, prototype) at test time,
                                 (anchor, partner) in training)

followed by an MLP of ``depth`` hidden layers (LayerNorm on the input, GELU, dropout) and the
same head (LayerNorm + one FC) giving the similarity logit. The hidden width is chosen so that
the MLP + head have about as many parameters as the transformer blocks + label token + head of
a :class:`RelationalModule` with the same config (:func:`mlp_width`), so the comparison is at a
similar parameter count.

Same interface as :class:`RelationalModule` (``encode``, ``relate``, ``forward``,
``pairwise_logits``, ``config`` with ``to_dict``/``from_dict``, ``scoring``): it *is* a subclass,
sharing the projection, input normalisation, optional cosine skip (``cosine_skip``) and chunked
pairwise evaluation, so checkpoints, training and :class:`~resend_novelty.detectors.ReSeNDDetector`
work unchanged. Build one with ``build_relational(RelationalConfig(arch="max", ...))``
(:mod:`resend_novelty.models.registry`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .config import RelationalConfig, ScoringConfig, resolve_configs
from .relational import RelationalModule

__all__ = ["AggregationModule", "mlp_width", "transformer_relation_params"]


def transformer_relation_params(config: RelationalConfig) -> int:
    """Parameters of the transformer's pair-dependent part (blocks, label token, norm, head)."""
    cfg = dataclasses.replace(config, arch="transformer")
    with torch.device("meta"):
        model = RelationalModule(cfg)
    total = sum(p.numel() for p in model.parameters())
    return total - sum(p.numel() for p in model.proj.parameters())


def _mlp_params(in_dim: int, width: int, depth: int) -> int:
    # LayerNorm(in) + Linear(in, w) + (depth - 1) x Linear(w, w) + LayerNorm(w) + Linear(w, 1)
    return 2 * in_dim + (in_dim * width + width) + (depth - 1) * (width * width + width) \
        + 2 * width + width + 1


def mlp_width(config: RelationalConfig) -> int:
    """Hidden width giving the aggregation MLP about the transformer's parameter count."""
    in_dim = 2 * config.dim if config.arch == "concat" else config.dim
    target = transformer_relation_params(config)
    depth = config.depth
    # (depth-1) w^2 + (in_dim + depth + 3) w + (2 in_dim + 1) = target
    a, b, c = depth - 1, in_dim + depth + 3, 2 * in_dim + 1 - target
    w = -c / b if a == 0 else (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    width = max(1, int(round(w)))
    # the closest integer by the exact count
    return min((width - 1, width, width + 1),
               key=lambda v: abs(_mlp_params(in_dim, max(v, 1), depth) - target)) or 1


class AggregationModule(RelationalModule):
    """Relational-module ablation: ``MLP(aggregate(z_i, z_j))`` instead of transformer blocks."""

    def __init__(
        self, config: RelationalConfig | None = None, scoring: ScoringConfig | None = None, **kwargs
    ):
        """``config``, ``scoring`` and ``kwargs`` as for :class:`RelationalModule`."""
        nn.Module.__init__(self)  # not RelationalModule.__init__: no transformer blocks
        config, scoring = resolve_configs(config, scoring, kwargs)
        if config.arch not in ("max", "sum", "concat"):
            raise ValueError(
                f"AggregationModule implements arch 'max', 'sum' or 'concat', not {config.arch!r}"
            )
        self.config = c = config
        self.scoring = scoring
        self.proj = nn.Linear(c.feature_dim, c.dim)  # eq. 2, as in the transformer model
        self.input_dropout = nn.Dropout(c.input_dropout)
        in_dim = 2 * c.dim if c.arch == "concat" else c.dim
        width = mlp_width(c)
        layers: list[nn.Module] = [nn.LayerNorm(in_dim)]
        for i in range(c.depth):
            layers += [nn.Linear(in_dim if i == 0 else width, width), nn.GELU(), nn.Dropout(c.dropout)]
        self.mlp = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 1)
        if c.cosine_skip:  # same optional cosine skip as the transformer
            self.cos_scale = nn.Parameter(torch.tensor(10.0))
            self.cos_shift = nn.Parameter(torch.tensor(0.5))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.config.cosine_skip:  # start at the cosine detector
            nn.init.zeros_(self.head.weight)

    def _fast_pairs(self) -> bool:
        # the transformer's shared-work path of pairwise_logits does not apply: use relate()
        return False

    def aggregate(self, z_i: torch.Tensor, z_j: torch.Tensor) -> torch.Tensor:
        arch = self.config.arch
        if arch == "max":
            return torch.maximum(z_i, z_j)
        if arch == "sum":
            return z_i + z_j
        return torch.cat([z_i, z_j], dim=-1)

    def relate(self, z_i: torch.Tensor, z_j: torch.Tensor) -> torch.Tensor:
        """Similarity logits ``(P,)`` of P pairs of tokens ``(P, dim)``."""
        return self.head(self.norm(self.mlp(self.aggregate(z_i, z_j)))).squeeze(-1)
