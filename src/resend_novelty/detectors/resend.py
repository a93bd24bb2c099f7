"""ReSeND (Cappio Borlino et al., ECCV 2022): relational similarities to class prototypes.

u_c = logit of the relational module r for the pair (test feature, prototype of class c);
normality = max_c softmax(u)_c (the paper) or max_c u_c (``normality="max-logit"``). The defaults
of the scoring policy (normality, neighbours) are those of the model
(:class:`~resend_novelty.models.ScoringConfig`, ``model.scoring``); the domain normalisation is
the one it was trained with (``model.config.domain_norm``).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
import torch.nn.functional as F

from ..models import NORMALITIES, RelationalModule, load_checkpoint
from .prototype import PrototypeDetector, leave_one_out_similarities

__all__ = ["ReSeNDDetector"]


class ReSeNDDetector(PrototypeDetector):
    """ReSeND: u = relational similarity logits to each prototype; normality = max(softmax(u)).

    ``model`` is a :class:`~resend_novelty.models.RelationalModule`, a checkpoint path, or None
    for the checkpoint shipped with the package. ``chunk_pairs``: (test, prototype) pairs scored
    per batch (default 65536 on GPU, 4096 on CPU); memory stays bounded whatever the number of
    test images. ``normality``: "softmax" (the paper's max(softmax(u))) or "max-logit" (max(u));
    default: the model's ``scoring.normality``. ``center``: domain normalisation; default: the
    one the checkpoint was trained with (``config.domain_norm``).

    ``neighbors=k`` (not in the paper; 0 = one prototype per class; default None = the model's
    ``scoring.neighbors``): also compare the test image with the ``k`` support images of class c
    nearest to it by cosine - several "prototypes" per class, which keeps the modes of a class
    that spans several domains. ``neighbor_weight=w`` (default: the model's
    ``scoring.neighbor_weight``) mixes the two: u_c = (1 - w) * logit(x, prototype_c) + w * mean
    logit(x, neighbour) over those k neighbours; w = 1 uses the neighbours only. Costs about
    ``k`` x more pairs. :meth:`calibrate` leaves each support image out of its own neighbours too.

    ``refine``: steps of test-time prototype refinement (:meth:`refine_prototypes`; not in the
    paper; default 0 = off, see its caveat). Needs a model with ``input_norm="l2"`` (the
    relational score then depends on the prototype's direction only) and class prototypes only
    (``neighbors=0``). :meth:`calibrate` scores the support with the unrefined prototypes.
    """

    name = "resend"
    description = "relational similarities to the class prototypes (the paper's method)"
    needs_two_classes = True
    supports_refinement = True

    def __init__(self, model: RelationalModule | str | os.PathLike | None = None,
                 chunk_pairs: int | None = None, normality: str | None = None,
                 neighbors: int | None = None, neighbor_weight: float | None = None,
                 refine: int = 0, **kwargs):
        self.model = model if isinstance(model, RelationalModule) else load_checkpoint(model)
        kwargs.setdefault("backbone", self.model.config.backbone)
        super().__init__(**kwargs)
        bb = kwargs["backbone"]
        bb_name = bb if isinstance(bb, str) or bb is None else bb.name
        if bb_name not in (None, "identity") and bb_name != self.model.config.backbone:
            raise ValueError(
                f"the relational model was trained on {self.model.config.backbone!r} features, "
                f"not {bb_name!r}"
            )
        self.chunk_pairs = chunk_pairs
        scoring = self.model.scoring
        self.normality = normality or scoring.normality
        if self.normality not in NORMALITIES:
            raise ValueError(f"normality must be one of {NORMALITIES}, got {self.normality!r}")
        if self.normality != "softmax":
            self.needs_two_classes = False  # max(u) is meaningful with a single class
        k = int(scoring.neighbors if neighbors is None else neighbors)
        if k < 0:
            raise ValueError(f"neighbors must be >= 1, or 0 for one prototype per class, got {k}")
        self.neighbors = k or None  # None: class prototypes only
        if neighbor_weight is not None and self.neighbors is None:
            raise ValueError("neighbor_weight mixes in the k nearest support images: it needs "
                             "neighbors=k (k >= 1)")
        w = float(scoring.neighbor_weight if neighbor_weight is None else neighbor_weight)
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"neighbor_weight must be in [0, 1], got {w}")
        self.neighbor_weight = w
        self.model.eval()
        if kwargs.get("center") is None:  # the model's training decides (config.domain_norm)
            self.domain_norm = self.model.config.domain_norm
        if refine and self.model.config.input_norm != "l2":
            raise ValueError("test-time prototype refinement (refine > 0) needs a relational "
                             "model with input_norm='l2' (direction-only prototypes)")
        if refine and self.neighbors is not None:
            raise ValueError("refine > 0 refines class prototypes: it cannot be combined with "
                             f"neighbors={self.neighbors}" + (
                                 " (the checkpoint's default; pass neighbors=0)"
                                 if neighbors is None else ""))
        self.refiner = self._make_refiner(refine, self.refine_fraction, self.refine_keep)

    def fit_features(self, features, labels, domains=None) -> "ReSeNDDetector":
        super().fit_features(features, labels, domains=domains)
        self._knn_members = None
        if self.neighbors is not None:  # the (normalised) support rows of each class, k-NN mode
            idx = np.searchsorted(self.classes_, np.asarray(labels))
            self._knn_members = [torch.as_tensor(np.flatnonzero(idx == k))
                                 for k in range(len(self.classes_))]
        return self

    def _on_fit(self) -> None:
        # fail at fit time, not at the first score, when the features come from another backbone
        want = self.model.config.feature_dim
        if self.prototypes_.shape[1] != want:
            got = self.prototypes_.shape[1]
            del self.prototypes_
            raise ValueError(
                f"support features have dimension {got}, the relational module expects {want} "
                f"(it was trained on {self.model.config.backbone!r} features)"
            )

    # ----------------------------------------------------------------- similarities
    @torch.inference_mode()
    def similarities_features(self, features, prototypes: torch.Tensor | None = None,
                              neighbors: int | None = None) -> torch.Tensor:
        """u ``(N, K)``: logits to the class ``prototypes`` (default ``prototypes_``), mixed
        with the mean logit to the ``neighbors`` nearest support images of each class (default
        ``self.neighbors``; 0 = class prototypes only)."""
        k = self.neighbors if neighbors is None else (int(neighbors) or None)
        if k is not None and getattr(self, "_knn_members", None) is not None:
            near = self._knn_similarities(features, k)
            w = self.neighbor_weight
            if w >= 1.0:
                return near
            return (1 - w) * self._prototype_similarities(features, prototypes) + w * near
        return self._prototype_similarities(features, prototypes)

    @torch.inference_mode()
    def _prototype_similarities(self, features, prototypes: torch.Tensor | None = None
                                ) -> torch.Tensor:
        """u_c = logit(x, prototype_c), every (test image, prototype) pair batched."""
        p = self.prototypes_ if prototypes is None else prototypes
        model = self.model.to(self.device)
        use_amp = self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
            # test features stay where they are: pairwise_logits moves them chunk by chunk
            # pairs per chunk: large on GPU; on CPU small chunks stay in cache, as fast and
            # without the GBs of activations of 65536 pairs (measured in benchmarks/speed.py)
            chunk = self.chunk_pairs or (65536 if self.device.type == "cuda" else 4096)
            u = model.pairwise_logits(features, p.to(self.device), chunk)
        return u.float().cpu()

    @torch.inference_mode()
    def _knn_similarities(self, features: torch.Tensor, k: int,
                          exclude: torch.Tensor | None = None) -> torch.Tensor:
        """u_c = mean logit over the ``k`` support images of class c nearest by cosine.

        Each support and test image is projected to its token once (eq. 2); only the blocks
        run per (test image, neighbour) pair. Same function as ``model(f_i, f_j)``.
        ``exclude``: for each row of ``features``, a support row that may not be one of its
        neighbours (leave-one-out: the row itself).
        """
        model = self.model.to(self.device)
        support = self.support_features_
        cos = F.normalize(features, dim=1) @ F.normalize(support, dim=1).T  # (N, M)
        if exclude is not None:
            cos[torch.arange(cos.shape[0]), exclude] = float("-inf")
        use_amp = self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
            z_support = model.encode(support.to(self.device))  # (M, dim), once
            z_test = model.encode(features.to(self.device))  # (N, dim), once for every class
        u = torch.empty(features.shape[0], len(self._knn_members))
        rows = max(1, (self.chunk_pairs or 4096) // k)
        for c, members in enumerate(self._knn_members):
            kc = min(k, len(members))
            top = cos[:, members].topk(kc, dim=1)
            nearest = members[top.indices]  # (N, kc) support rows
            valid = torch.isfinite(top.values)  # False: an excluded row (class of <= k images)
            for start in range(0, features.shape[0], rows):
                z_i = z_test[start:start + rows]
                near = nearest[start:start + rows]  # (n, kc)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
                    logits = model.relate(z_i.repeat_interleave(kc, 0),
                                          z_support[near.reshape(-1).to(self.device)])
                logits = logits.float().view(len(z_i), kc)
                if model.config.cosine_skip:  # the skip term of forward(), on the same cosines
                    rows_cos = cos[start:start + rows].gather(1, near).to(self.device)
                    logits = logits + model.cosine_term(rows_cos).float()
                ok = valid[start:start + rows].to(logits.device)
                mean = logits.where(ok, 0).sum(1) / ok.sum(1).clamp_min(1)
                u[start:start + len(z_i), c] = mean.cpu()
        return u

    def loo_similarities_features(self, features, labels, block: int = 16):
        """Leave-one-out similarities: the prototype part as in :class:`PrototypeDetector`;
        with ``neighbors=k`` each support image is also left out of its own class's nearest
        support images."""
        x, idx = self._loo_index(features, labels)
        u, used = leave_one_out_similarities(
            functools.partial(self.similarities_features, neighbors=0), self.prototypes_, x, idx,
            block, progress=self.progress)
        if self.neighbors is None:
            return u, used
        near = self._knn_similarities(x, self.neighbors, exclude=torch.arange(x.shape[0]))
        w = self.neighbor_weight
        return (1 - w) * u + w * near, used

    def normality_from_similarities(self, u: torch.Tensor) -> torch.Tensor:
        if self.normality == "max-logit":
            return u.max(dim=1).values
        return torch.softmax(u, dim=1).max(dim=1).values  # the paper's max(softmax(u))
