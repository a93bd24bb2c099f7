"""Validation during pretraining, on reference classes held out of training.

Two protocols (``TrainConfig.val_protocol``): ``"halves"`` (:func:`validation_auroc`: the known
held-out classes split in support and test halves, stylised views included) and ``"proxy"``
(:func:`proxy_validation_auroc`: the synthetic domain-shift episodes of
:mod:`resend_novelty.evaluation.proxy`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..detectors import ReSeNDDetector
from ..evaluation import ProxySet, auroc, evaluate_proxy
from ..models import RelationalModule
from ..transforms import as_mode, normalize_by_domain

__all__ = ["validation_auroc", "proxy_validation_auroc"]


@torch.no_grad()
def validation_auroc(model: RelationalModule, feats: torch.Tensor, labels: np.ndarray,
                     is_view: np.ndarray, val_classes: np.ndarray, seed: int,
                     center: bool | str = False) -> float:
    """Fine-tuning-free novelty AUROC on held-out classes.

    Half of the held-out classes are known: prototypes from the first half of their original
    images. Test = the remaining items of known classes + every item of the unknown classes
    (stylised views included). With stylised views, the returned value is the mean of that AUROC
    and the AUROC on stylised test views only (photo prototypes vs other "domains").
    """
    if len(val_classes) < 2:
        return math.nan
    rng = np.random.default_rng([seed, 104729])
    known = rng.permutation(val_classes)[: max(1, len(val_classes) // 2)]
    support_idx, test_idx = [], []
    for c in val_classes:
        items = np.flatnonzero(labels == c)
        if c in known:
            orig = items[~is_view[items]]
            half = orig[: max(1, len(orig) // 2)]
            support_idx.extend(half.tolist())
            test_idx.extend(sorted(set(items.tolist()) - set(half.tolist())))
        else:
            test_idx.extend(items.tolist())
    support_idx, test_idx = np.array(support_idx), np.array(test_idx)
    s_lab = labels[support_idx]
    fs = feats[support_idx]
    mode = as_mode(center)
    # as the detectors do: support on its statistics, each test set on its own
    fs = normalize_by_domain(fs, np.zeros(len(fs)), mode)
    protos = torch.stack([fs[s_lab == c].mean(0) for c in known])
    was_training = model.training
    model.eval()

    def normality(idx):
        ft = normalize_by_domain(feats[idx], np.zeros(len(idx)), mode)
        u = model.pairwise_logits(ft, protos)
        return torch.softmax(u.float(), dim=1).max(1).values.cpu().numpy()

    views = is_view[test_idx]
    orig_idx = test_idx[~views]
    score = auroc(normality(orig_idx), np.isin(labels[orig_idx], known))
    view_idx = test_idx[views]
    is_known_v = np.isin(labels[view_idx], known)
    if len(view_idx) and is_known_v.any() and (~is_known_v).any():
        # cross-domain: photo prototypes vs stylised test views only (like PACS single-source)
        score = 0.5 * (score + auroc(normality(view_idx), is_known_v))
    model.train(was_training)
    return score


def proxy_validation_auroc(model: RelationalModule, proxy: ProxySet, episodes: int, seed: int,
                           device=None) -> float:
    """Mean of the multi- and single-source AUROC of the proxy benchmark
    (:mod:`resend_novelty.evaluation.proxy`), the model scored as ReSeNDDetector scores it."""
    was_training = model.training
    try:
        res = evaluate_proxy(
            lambda: ReSeNDDetector(model=model, backbone=None, device=device, progress=False),
            proxy, n_episodes=episodes, seed=seed)
    finally:
        model.train(was_training)
    return 0.5 * (res["multi"]["avg"]["auroc"] + res["single"]["avg"]["auroc"])
