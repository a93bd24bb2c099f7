"""A synthetic domain-shift novelty benchmark on held-out reference classes, for model selection.

The real benchmarks (PACS, ...) must not be used to choose a model or a scoring rule. This module
builds their stand-in from the *reference* set only: the classes held out of pretraining
(:func:`resend_novelty.data.split_validation`, the same seed and count as the training run) are
rendered in four "domains" - the photo itself and its deterministic sketch, cartoon and painting
views (:mod:`resend_novelty.data.augment`). Image ``i`` of a class (natural file order) appears in one
domain only, ``i % 4``, so that no test image is the stylised twin of a support image.

Episodes copy the PACS protocol: ``n_known`` known and ``n_unknown`` unknown classes drawn from the
held-out ones; *multi-source*: support = the known classes in three domains, test = all episode
classes in the fourth (each domain in turn); *single-source*: support = photos, test = each
stylised domain. The result is the mean AUROC over episodes per target, as in
:func:`resend_novelty.evaluation.run_benchmark`.

Usage::

    ps = load_proxy_set("DATA/tiny_imagenet_200/train", val_classes=30, seed=0)
    res = evaluate_proxy(lambda: build_detector("cosine", backbone=None), ps)
    res["multi"]["avg"], res["single"]["avg"]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..backbones import build_backbone
from ..data import STYLE_ORDER, DomainShiftView, reference_records, split_validation
from ..detectors import fit_support
from ..features import extract_features
from .metrics import auroc, fpr_at_tpr

__all__ = ["PROXY_DOMAINS", "ProxySet", "load_proxy_set", "proxy_records", "proxy_episodes",
           "evaluate_proxy"]

# domain 0 = the photo; domain d > 0 = DomainShiftView(d - 1) with data.STYLE_ORDER
PROXY_DOMAINS = ("photo", "sketch", "cartoon", "painting")


@dataclass
class ProxySet:
    features: torch.Tensor  # (N, D) backbone features
    labels: np.ndarray  # (N,) reference class ids (held-out classes only)
    domain: np.ndarray  # (N,) index into PROXY_DOMAINS
    classes: np.ndarray  # the held-out class ids
    rank: np.ndarray | None = None  # (N,) position of the source image in its class (file
    # order); None: image i appears in domain i % 4 only, so rank % 4 == domain

    @property
    def split(self) -> np.ndarray:
        """rank % 4: the domain in which an image may be a *test* image (support otherwise)."""
        return self.domain if self.rank is None else self.rank % len(PROXY_DOMAINS)


def load_proxy_set(data: str, val_classes: int = 30, seed: int = 0, per_class: int = 100,
                   backbone="efficientnet_lite0", progress: bool = True,
                   workers: int = 0, renderings: str = "one") -> ProxySet:
    """Features of the held-out classes of ``data`` in the four proxy domains (cached).

    ``renderings="one"`` (the default, used for model selection): image ``i`` of a class appears
    in domain ``i % 4`` only. ``"all"``: every image in all four domains (4x the features), so
    that supports reach PACS-like sizes: in an episode with target domain t the test images are
    those with ``i % 4 == t`` (rendered in t) and the support is *every other* image of the known
    classes rendered in each source domain (75 images, 225 renderings per class multi-source,
    instead of 25 / 75). Support and test never share a source image.

    ``data``: a class-folder reference set (or list file) as for pretraining; ``val_classes`` and
    ``seed``: the held-out classes of the pretraining run
    (:func:`~resend_novelty.data.split_validation`); ``per_class``: images per class used
    (natural file order); ``backbone``: a name or a :class:`~resend_novelty.backbones.Backbone`.
    """
    groups, ranks, val = proxy_records(data, val_classes, seed, per_class, renderings)
    bb = build_backbone(backbone) if isinstance(backbone, str) else backbone
    feats, labs, doms = [], [], []
    for d, recs in groups.items():
        paths = [r.path for r in recs]
        if d == 0:
            f = extract_features(bb, paths, desc="proxy photo", progress=progress,
                                 num_workers=workers)
        else:
            aug = DomainShiftView(d - 1, bb.transform, STYLE_ORDER)
            assert aug.style == PROXY_DOMAINS[d]
            f = extract_features(bb, paths, desc=f"proxy {aug.style}", progress=progress,
                                 transform=aug, namespace_suffix=aug.namespace_suffix,
                                 num_workers=workers)
        feats.append(f)
        labs.append(np.array([r.label for r in recs]))
        doms.append(np.full(len(recs), d))
    return ProxySet(torch.cat(feats), np.concatenate(labs), np.concatenate(doms), np.asarray(val),
                    np.concatenate([np.asarray(ranks[d], int) for d in groups])
                    if renderings == "all" else None)


def proxy_records(data: str, val_classes: int = 30, seed: int = 0, per_class: int = 100,
                  renderings: str = "one") -> tuple[dict, dict, np.ndarray]:
    """The proxy's images before any feature: ``(groups, ranks, val)`` with ``groups[d]`` the
    image records rendered in domain ``d`` (index into :data:`PROXY_DOMAINS`; d > 0 is
    ``DomainShiftView(d - 1, ..., STYLE_ORDER)`` of the image), ``ranks[d]`` their positions
    in their class (natural file order) and ``val`` the held-out class ids. Arguments as for
    :func:`load_proxy_set`, which computes the features of exactly these renderings."""
    if renderings not in ("one", "all"):
        raise ValueError(f"renderings must be 'one' or 'all', got {renderings!r}")
    records, _ = reference_records(data, max_per_class=per_class)
    labels = np.array([r.label for r in records])
    _, val = split_validation(labels, val_classes, seed)
    groups: dict[int, list] = {d: [] for d in range(len(PROXY_DOMAINS))}
    ranks: dict[int, list] = {d: [] for d in range(len(PROXY_DOMAINS))}
    rank: dict[int, int] = {}
    for r in records:  # records are in natural order within each class
        if r.label not in val:
            continue
        i = rank.get(r.label, 0)
        rank[r.label] = i + 1
        for d in (range(len(PROXY_DOMAINS)) if renderings == "all" else [i % len(PROXY_DOMAINS)]):
            groups[d].append(r)
            ranks[d].append(i)
    return groups, ranks, np.asarray(val)


def proxy_episodes(classes: np.ndarray, n_episodes: int = 100, n_known: int = 6,
                   n_unknown: int = 1, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Seeded (known classes, unknown classes) draws from the held-out classes."""
    if n_known + n_unknown > len(classes):
        raise ValueError(f"{n_known} known + {n_unknown} unknown > {len(classes)} classes")
    rng = np.random.default_rng([seed, 3571])
    out = []
    for _ in range(n_episodes):
        perm = rng.permutation(classes)
        out.append((np.sort(perm[:n_known]), np.sort(perm[n_known:n_known + n_unknown])))
    return out


def evaluate_proxy(make_detector: Callable[[], object], ps: ProxySet, n_episodes: int = 100,
                   n_known: int = 6, n_unknown: int = 1, seed: int = 0,
                   settings: tuple[str, ...] = ("multi", "single")) -> dict:
    """Mean AUROC / FPR95 per target domain and their average, for each proxy setting.

    ``make_detector()`` returns an unfitted detector with ``fit_features`` and ``score_features``;
    in multi-source episodes its ``fit_features`` gets ``domains=`` (the support images' domain
    ids, :func:`~resend_novelty.detectors.fit_support`).
    """
    eps = proxy_episodes(ps.classes, n_episodes, n_known, n_unknown, seed)
    det = make_detector()
    out: dict = {}
    for setting in settings:
        if setting == "multi":
            plans = [(PROXY_DOMAINS[t], [d for d in range(4) if d != t], t) for t in range(4)]
        elif setting == "single":
            plans = [(PROXY_DOMAINS[t], [0], t) for t in (1, 2, 3)]
        elif setting == "in-domain":
            plans = [("photo", [0], 0)]
        else:
            raise ValueError(f"unknown proxy setting {setting!r}")
        res: dict = {}
        for name, sources, target in plans:
            is_test = ps.split == target  # images that may be test images of this target
            au, fp = [], []
            for known, unknown in eps:
                s = np.isin(ps.labels, known) & np.isin(ps.domain, sources)
                if sources == [target]:  # in-domain: split the target images in halves
                    half = np.zeros(len(s), bool)
                    for c in known:
                        idx = np.flatnonzero(s & (ps.labels == c))
                        half[idx[: len(idx) // 2]] = True
                    s = half
                else:  # never a source image of a test image
                    s &= ~is_test
                t = (np.isin(ps.labels, np.concatenate([known, unknown]))
                     & (ps.domain == target) & is_test & ~s)
                fit_support(det, ps.features[s], ps.labels[s],
                            ps.domain[s] if len(sources) > 1 else None)
                scores = np.asarray(det.score_features(ps.features[t]))
                is_known = np.isin(ps.labels[t], known)
                au.append(auroc(scores, is_known))
                fp.append(fpr_at_tpr(scores, is_known))
            res[name] = {"auroc": float(np.mean(au)), "fpr95": float(np.mean(fp))}
        res["avg"] = {k: float(np.mean([v[k] for n, v in res.items()])) for k in ("auroc", "fpr95")}
        out[setting] = res
    return out
