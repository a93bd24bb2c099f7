"""ReSeND (Cappio Borlino et al., ECCV 2022): relational similarities to class prototypes.

u_c = logit of the relational module r for the pair (test feature, prototype of class c);
normality = max_c softmax(u)_c (the paper) or max_c u_c (``normality="max-logit"``). The defaults
of the scoring policy (normality, neighbours) are those of the model
(:class:`~resend_novelty.models.ScoringConfig`, ``model.scoring``); the domain normalisation is
the one it was trained with (``model.config.domain_norm``).

Candidate classes (``candidates=M``, not in the paper) make the cost independent of the number
of known classes: each test image is scored by the relational module against its M classes
nearest by a cheap cosine similarity only; see :class:`ReSeNDDetector`.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
import torch.nn.functional as F

from ..models import NORMALITIES, RelationalModule, load_checkpoint
from .neighbors import SupportIndex, masked_mean
from .loo import leave_one_out_similarities
from .prototype import PrototypeDetector

__all__ = ["ReSeNDDetector"]


class ReSeNDDetector(PrototypeDetector):
    """ReSeND: u = relational similarity logits to each prototype; normality = max(softmax(u)).

    ``model`` is a :class:`~resend_novelty.models.RelationalModule`, a checkpoint path, or None
    for the checkpoint shipped with the package. ``chunk_pairs``: (test, prototype) pairs scored
    per batch (default 65536 on GPU, 4096 on CPU); memory stays bounded whatever the number of
    test images. ``normality``: "softmax" (the paper's max(softmax(u))) or "max-logit" (max(u));
    default: the model's ``scoring.normality``. ``center``: domain normalisation; default: the
    one the checkpoint was trained with (``config.domain_norm``). ``shift_threshold`` and
    ``raw_weight`` (:class:`~resend_novelty.detectors.PrototypeDetector`) default to the model's
    ``scoring.shift_threshold`` / ``scoring.raw_weight``.

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

    ``candidates=M`` (not in the paper; default None = the model's ``scoring.candidates`` under
    the ``max-logit`` normality and every class under ``softmax``, whose denominator the shortcut
    would change; 0 = every class): only the M classes nearest to the test image by a cheap similarity go through
    the relational module. The cheap similarity is u with the cosine in place of the relational
    logit, on the same normalised features: ``(1 - w) * cos(x, prototype_c) + w * mean cosine
    to the k nearest support images of c`` (``cos(x, prototype_c)`` without neighbours) - the
    same references and weights as u, and the shipped model's logit contains that cosine (its
    cosine skip term). The other classes get u = -inf: under ``max-logit`` the normality is the
    largest candidate logit (exact whenever the class of the exact maximum is a candidate);
    under ``softmax`` the denominator holds the M candidates only (exp(-inf) = 0), so the score
    is max softmax over the candidates, >= the exact one. M >= the number of classes (or 0)
    runs the exact code path: the same numbers bit for bit. :meth:`calibrate` uses the same
    shortcut on its leave-one-out scores (candidates chosen with the leave-one-out prototype and
    without the image among its own neighbours), so the threshold matches test-time scoring.
    Prototypes passed explicitly (test-time refinement) are scored exactly.

    Fitted attributes of the shortcut and of the neighbour search, all derived from the saved
    ones (``support_features_``, ``support_index_``, ``prototypes_``) at fit and load time:
    ``neighbor_index_`` (a :class:`~resend_novelty.detectors.neighbors.SupportIndex`: unit
    support rows, class of each row, padded class membership), ``z_support_`` (the module's
    token of each support image, with ``neighbors``) and ``z_prototypes_`` (of each prototype).
    """

    name = "resend"
    uses_model = True
    cli_params = {"normality": "normality", "neighbors": "neighbors",
                  "neighbor_weight": "neighbor_weight", "candidates": "candidates"}
    description = "relational similarities to the class prototypes (the paper's method)"
    needs_two_classes = True
    supports_refinement = True
    supports_shift_gate = True

    def __init__(self, model: RelationalModule | str | os.PathLike | None = None,
                 chunk_pairs: int | None = None, normality: str | None = None,
                 neighbors: int | None = None, neighbor_weight: float | None = None,
                 refine: int = 0, candidates: int | None = None,
                 shift_threshold: float | None = None, raw_weight: float | None = None,
                 backbone="checkpoint", center: bool | str | None = None, **kwargs):
        self.model = model if isinstance(model, RelationalModule) else load_checkpoint(model)
        # "checkpoint": the backbone the model was trained on; None: features only
        kwargs["backbone"] = self.model.config.backbone if backbone == "checkpoint" else backbone
        kwargs["center"] = center if center is not None else False
        kwargs["shift_threshold"] = (self.model.scoring.shift_threshold
                                     if shift_threshold is None else shift_threshold)
        kwargs["raw_weight"] = (self.model.scoring.raw_weight
                                if raw_weight is None else raw_weight)
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
        if center is None:  # the model's training decides (config.domain_norm)
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
        m = getattr(scoring, "candidates", 0) if candidates is None else candidates
        if candidates is None and self.normality == "softmax":
            m = 0  # the default shortcut is for max-logit only: softmax changes with the classes
        if isinstance(m, bool) or int(m) != m or int(m) < 0:
            raise ValueError(f"candidates must be an integer >= 1, or 0 for every class, got {m!r}")
        self.candidates = int(m) or None  # None: every class through the relational module

    def fit_features(self, features, labels, domains=None) -> "ReSeNDDetector":
        super().fit_features(features, labels, domains=domains)
        self._restore_fitted()
        return self

    def _restore_fitted(self) -> None:
        self._knn_members = None
        if self.neighbors is not None:  # the (normalised) support rows of each class, k-NN mode
            idx = self.support_index_
            self._knn_members = [torch.as_tensor(np.flatnonzero(idx == k))
                                 for k in range(len(self.classes_))]
        self.neighbor_index_ = SupportIndex(self.support_features_, self.support_index_,
                                            len(self.classes_)).to(self.device)
        model = self.model.to(self.device)
        with torch.inference_mode(), self._autocast():
            self.z_support_ = (model.encode(self.support_features_.to(self.device))
                               if self.neighbors is not None else None)
            self.z_prototypes_ = model.encode(self.prototypes_.to(self.device))

    def _chunk(self) -> int:
        """Pairs per relational batch: ``chunk_pairs``, else large on GPU, small on CPU."""
        return self.chunk_pairs or (65536 if self.device.type == "cuda" else 4096)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.device.type == "cuda")

    def _shortcut(self, prototypes: torch.Tensor | None = None) -> bool:
        """Whether the candidate shortcut applies (M < number of classes, fitted prototypes)."""
        return (self.candidates is not None and prototypes is None
                and self.candidates < len(self.classes_))

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
        if self._shortcut(prototypes):
            return self._candidate_similarities(features, k)
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
        index = self.neighbor_index_
        use_amp = self.device.type == "cuda"
        z_support = self.z_support_
        with self._autocast():
            z_test = model.encode(features.to(self.device))  # (N, dim), once for every class
        u = torch.empty(features.shape[0], len(self._knn_members))
        rows = max(1, (self.chunk_pairs or 4096) // k)
        block = index.rows_per_chunk(0)  # cosines of a block of test rows: bounded memory
        for b0 in range(0, features.shape[0], block):
            cos = index.cosines(features[b0:b0 + block],
                                None if exclude is None else exclude[b0:b0 + block]).cpu()
            nb = cos.shape[0]
            for c, members in enumerate(self._knn_members):
                kc = min(k, len(members))
                top = cos[:, members].topk(kc, dim=1)
                nearest = members[top.indices]  # (nb, kc) support rows
                valid = torch.isfinite(top.values)  # False: an excluded row (class of <= k images)
                for start in range(0, nb, rows):
                    z_i = z_test[b0 + start:b0 + min(start + rows, nb)]
                    near = nearest[start:start + rows]  # (n, kc)
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
                        logits = model.relate(z_i.repeat_interleave(kc, 0),
                                              z_support[near.reshape(-1).to(self.device)])
                    logits = logits.float().view(len(z_i), kc)
                    if model.config.cosine_skip:  # the skip term of forward(), same cosines
                        rows_cos = cos[start:start + rows].gather(1, near).to(self.device)
                        logits = logits + model.cosine_term(rows_cos).float()
                    ok = valid[start:start + rows].to(logits.device)
                    mean = logits.where(ok, 0).sum(1) / ok.sum(1).clamp_min(1)
                    u[b0 + start:b0 + start + len(z_i), c] = mean.cpu()
        return u

    # ----------------------------------------------------------------- candidate classes
    @torch.inference_mode()
    def _candidate_similarities(self, features: torch.Tensor, k: int | None,
                                loo_index: np.ndarray | None = None) -> torch.Tensor:
        """u ``(N, K)`` with the candidate shortcut: the relational logits of the
        ``candidates`` classes nearest by the cheap similarity, -inf for the others.

        ``loo_index``: ``features`` are the support rows (same order), of these classes:
        leave-one-out - the own prototype without the row (classes of >= 2 images), the row
        never one of its own neighbours.
        """
        model = self.model.to(self.device)
        index = self.neighbor_index_
        n_classes, m = len(self.classes_), self.candidates
        w = self.neighbor_weight if k is not None else 0.0
        protos_unit = F.normalize(self.prototypes_.to(self.device).float(), dim=1)
        u = torch.full((features.shape[0], n_classes), float("-inf"))
        block = index.rows_per_chunk(n_classes if k is not None else 0)
        for b0 in range(0, features.shape[0], block):
            x = features[b0:b0 + block].to(self.device)
            n = x.shape[0]
            rows = torch.arange(n, device=self.device)
            with self._autocast():
                z_x = model.encode(x)
            pcos = F.normalize(x.float(), dim=1) @ protos_unit.T  # (n, K)
            if loo_index is not None:  # own prototype without the row, where it has >= 2
                own = torch.as_tensor(loo_index[b0:b0 + n], device=self.device)
                cnt = index.counts.to(self.device)[own]
                loo = torch.where((cnt >= 2)[:, None],
                                  (cnt[:, None] * self.prototypes_.to(self.device).double()[own]
                                   - x.double()) / (cnt - 1).clamp_min(1)[:, None],
                                  self.prototypes_.to(self.device).double()[own]).float()
                pcos[rows, own] = F.cosine_similarity(x.float(), loo, dim=1)
                with self._autocast():
                    z_loo = model.encode(loo)
            cheap = pcos
            if k is not None:
                cos = index.cosines(x, None if loo_index is None
                                    else torch.arange(b0, b0 + n, device=self.device))
                vals, _ = index.class_topk(cos, k)  # (n, K, k')
                near_cos = masked_mean(vals, torch.isfinite(vals))
                cheap = (1 - w) * pcos + w * near_cos if w < 1.0 else near_cos
            cand = cheap.topk(m, dim=1).indices  # (n, M)
            score = torch.zeros(n, m, device=self.device)
            if w < 1.0:  # prototype part
                z_p = self.z_prototypes_[cand]  # (n, M, dim)
                if loo_index is not None:
                    is_own = cand == own[:, None]
                    z_p = torch.where(is_own[..., None], z_loo[:, None].to(z_p.dtype), z_p)
                with self._autocast():
                    logit = model.pair_logits(z_x.repeat_interleave(m, 0), z_p.flatten(0, 1),
                                              pcos.gather(1, cand).flatten(), self._chunk())
                score += (1 - w) * logit.view(n, m)
            if k is not None:  # mean logit over the k nearest support images of each candidate
                vals, near = index.class_topk(cos, k, cand)  # (n, M, k')
                kk = vals.shape[2]
                valid = torch.isfinite(vals)
                with self._autocast():
                    logit = model.pair_logits(z_x.repeat_interleave(m * kk, 0),
                                              self.z_support_[near.flatten().clamp_max(
                                                  self.z_support_.shape[0] - 1)],
                                              vals.flatten().nan_to_num(neginf=0.0),
                                              self._chunk())
                score += w * masked_mean(logit.view(n, m, kk), valid)
            u[torch.arange(b0, b0 + n)[:, None], cand.cpu()] = score.float().cpu()
        return u

    def loo_similarities_features(self, features, labels, block: int = 16):
        """Leave-one-out similarities: the prototype part as in :class:`PrototypeDetector`;
        with ``neighbors=k`` each support image is also left out of its own class's nearest
        support images."""
        x, idx = self._loo_index(features, labels)
        if self._shortcut():
            counts = np.bincount(idx, minlength=len(self.classes_))
            return self._candidate_similarities(x, self.neighbors, loo_index=idx), counts[idx] >= 2
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
