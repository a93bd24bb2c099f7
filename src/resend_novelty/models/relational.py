"""The relational module r and head c of ReSeND (Cappio Borlino et al., ECCV 2022, Sec. 3.1).

Given backbone features f_i, f_j of two images::

    z_i = W_p f_i + b_p                                   (eq. 2: per-image projection to a token)
    s^0 = [ l, z_i, z_j ]                                 (eq. 3: learnable label token l, no
                                                           positional embedding)
    s'  = s^{b-1} + MSA(LN(s^{b-1}))                      (eq. 4: B pre-LayerNorm blocks,
    s^b = s' + MLP(LN(s'))                                 b = 1..B; resend_novelty.models.blocks)
    sigma_ij = sigmoid( c( LN(s^B_0) ) )                  (eq. 5: LayerNorm on the label token,
                                                           one FC head)

Without positional embeddings the blocks are permutation-equivariant, so the label token - and
therefore sigma_ij - is symmetric in (i, j).

Beyond the paper, the module optionally normalises its input features (``input_norm``: ``"l2"``
or ``"none"``) and applies dropout to them during training (``input_dropout``), and can add a
learnable cosine *skip connection* to the logit (``cosine_skip``)::

    logit_ij = c( LN(s^B_0) ) + gamma * (cos(f_i, f_j) - delta)

With the head initialised at zero, training starts from the cosine-similarity detector and the
transformer learns corrections to it (e.g. invariance to the image domain). All options are part
of the architecture config (:class:`~resend_novelty.models.config.RelationalConfig`) stored with
the weights, so a checkpoint always rebuilds the same function; the default config is exactly the
paper's module. The module also carries the default scoring policy of detectors built on it
(``scoring``, a :class:`~resend_novelty.models.config.ScoringConfig`), which changes no weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Attention, TransformerBlock, short_attention
from .config import RelationalConfig, ScoringConfig, resolve_configs

__all__ = ["RelationalModule"]


class RelationalModule(nn.Module):
    """r + c: from two backbone features to the similarity logit (sigmoid gives sigma_ij)."""

    def __init__(
        self,
        config: RelationalConfig | None = None,
        scoring: ScoringConfig | None = None,
        attention: Attention = short_attention,
        **kwargs,
    ):
        """``config``: the architecture (default: the fields given in ``kwargs``, others the
        paper's); ``scoring``: the default scoring of detectors (default: the scoring fields in
        ``kwargs``, others :class:`ScoringConfig`'s); ``attention``: the attention function of
        the eval-mode shared-work path of :meth:`pairwise_logits`."""
        super().__init__()
        config, scoring = resolve_configs(config, scoring, kwargs)
        if config.arch != "transformer":
            raise ValueError(
                f"arch={config.arch!r} is an ablation model: build it with build_relational(config)"
            )
        self.config = config
        self.scoring = scoring
        self.attention = attention
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
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        chunk_pairs: int = 65536,
        shared_work: bool = True,
        attention: Attention | None = None,
    ) -> torch.Tensor:
        """Logits of every (query, key) pair, ``(Nq, Nk)``, in chunks of at most ``chunk_pairs``.

        Each image is projected once (eq. 2); only the pair-dependent blocks run per pair.
        Queries are moved to the model's device and projected chunk by chunk, so memory stays
        bounded whatever the number of queries. In eval mode, work that does not depend on the
        pair is shared too: the first block's LayerNorm and q/k/v projection of each token are
        computed once per image, and the last block updates only the label token (the only one
        the head reads). Same function as :meth:`relate` (up to float rounding).
        ``shared_work=False`` takes the generic path (:meth:`relate` on every pair) in any mode;
        ``attention`` replaces the module's ``attention`` function on the shared-work path.
        """
        device = self.proj.weight.device
        zk = self.encode(keys.to(device))
        self.encode(queries[:0].to(device))  # dimension check, even without queries
        nq, nk = queries.shape[0], zk.shape[0]
        out = torch.empty(nq, nk, device=device, dtype=torch.float32)
        rows = max(1, chunk_pairs // max(nk, 1))
        fast = shared_work and self._fast_pairs()
        if fast:
            attend = attention or self.attention
            first, last = self.blocks[0], len(self.blocks) - 1
            label = self.label_token.reshape(1, -1)
            qkv_label, qkv_k = first.qkv(label), first.qkv(zk)
        for start in range(0, nq, rows):
            zi = self.encode(queries[start : start + rows].to(device, non_blocking=True))
            n = zi.shape[0]

            def pairs(x_i, x_k):  # (n, c), (nk, c) -> (n * nk, c) each, query-major
                return (x_i.unsqueeze(1).expand(n, nk, -1).reshape(n * nk, -1),
                        x_k.unsqueeze(0).expand(n, nk, -1).reshape(n * nk, -1))

            if fast:
                p = n * nk
                s = torch.stack([label.expand(p, -1), *pairs(zi, zk)], dim=1)  # eq. 3
                qkv = torch.stack([qkv_label.expand(p, -1), *pairs(first.qkv(zi), qkv_k)], dim=1)
                s = first.pair_forward(s, qkv, label_only=last == 0, attention=attend)
                for b in range(1, last + 1):
                    s = self.blocks[b].pair_forward(s, label_only=b == last,
                                                    attention=attend)
                logits = self.head(self.norm(s[:, 0])).squeeze(-1)
            else:
                logits = self.relate(*pairs(zi, zk))
            out[start : start + n] = logits.float().view(n, nk)
        if self.config.cosine_skip:
            cos = (F.normalize(queries.to(device).float(), dim=-1)
                   @ F.normalize(keys.to(device).float(), dim=-1).T)
            out = out + self.cosine_term(cos).float()
        return out

    def pair_logits(self, z_i: torch.Tensor, z_j: torch.Tensor, cos: torch.Tensor | None = None,
                    chunk_pairs: int = 65536) -> torch.Tensor:
        """Logits ``(P,)`` of the token pairs ``(z_i[p], z_j[p])`` (tokens from :meth:`encode`),
        in chunks of ``chunk_pairs``, plus the cosine skip term from ``cos[p]`` (the cosines of
        the pairs' features) where the model has one. In eval mode the shared-work path of
        :meth:`pairwise_logits` (the label token's q/k/v once, the last block on the label
        token only): the same function as :meth:`relate` up to float rounding. Run it inside
        the caller's autocast context for mixed precision."""
        out = torch.empty(z_i.shape[0], device=z_i.device, dtype=torch.float32)
        fast = self._fast_pairs()
        if fast:
            first, last = self.blocks[0], len(self.blocks) - 1
            label = self.label_token.reshape(1, -1)
            qkv_label = first.qkv(label)
        for s in range(0, z_i.shape[0], chunk_pairs):
            zi, zj = z_i[s:s + chunk_pairs], z_j[s:s + chunk_pairs]
            if not fast:
                out[s:s + chunk_pairs] = self.relate(zi, zj).float()
                continue
            p = zi.shape[0]
            x = torch.stack([label.expand(p, -1), zi, zj], dim=1)
            qkv = torch.stack([qkv_label.expand(p, -1), first.qkv(zi), first.qkv(zj)], dim=1)
            x = first.pair_forward(x, qkv, label_only=last == 0, attention=self.attention)
            for b in range(1, last + 1):
                x = self.blocks[b].pair_forward(x, label_only=b == last, attention=self.attention)
            out[s:s + chunk_pairs] = self.head(self.norm(x[:, 0])).squeeze(-1).float()
        if self.config.cosine_skip:
            if cos is None:
                raise ValueError("this model has a cosine skip term: pass the pairs' cosines")
            out = out + self.cosine_term(cos.to(out.device)).float()
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
