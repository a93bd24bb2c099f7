"""Novelty-detection metrics (scikit-learn underneath).

Convention (as in the ReSeND paper): **known samples are the positive class** and a higher
score means "more normal" (more likely known).

- ``auroc``: area under the ROC curve of knowns vs unknowns.
- ``fpr95``: fraction of *unknown* samples accepted (score >= threshold) at the threshold that
  keeps 95% of the *known* samples (TPR of knowns = 0.95). Note: OpenOOD and pytorch-ood treat
  the OOD/unknown samples as positives; their "FPR95" is computed with the roles swapped, and
  their numbers are not comparable with ours (or the paper's).
- ``aupr_in``: average precision with knowns as positives; ``aupr_out``: with unknowns as
  positives and the negated score.
- ``closed_set_accuracy``: accuracy of the predicted class on known samples only.
- ``h_score``: harmonic mean of the known-class accuracy (correct class *and* accepted) and the
  unknown-detection accuracy (fraction of unknowns rejected), Fu et al. ECCV 2020 / Shu et al.
  CVPR 2021.
- ``oscr``: open-set classification rate (Dhamija et al. 2018), the area under the curve of
  correctly classified known samples vs accepted unknown samples over all thresholds.

Undefined values (e.g. AUROC with no unknown samples) are returned as ``nan`` by the functions
and as ``None`` plus a note by :func:`novelty_report`.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

__all__ = [
    "auroc",
    "fpr_at_tpr",
    "fpr95",
    "aupr_in",
    "aupr_out",
    "closed_set_accuracy",
    "h_score",
    "oscr",
    "novelty_report",
]


def _check(scores, is_known):
    scores = np.asarray(scores, dtype=np.float64).ravel()
    is_known = np.asarray(is_known).ravel()
    if scores.shape != is_known.shape:
        raise ValueError(f"scores {scores.shape} and is_known {is_known.shape} differ in length")
    if scores.size == 0:
        raise ValueError("no samples")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    return scores, is_known.astype(bool)


def _unit(v) -> float:
    """Clip float rounding (sklearn's AP can return 1.0000000000000002) to [0, 1]."""
    return min(1.0, max(0.0, float(v)))


def _both(is_known) -> bool:
    return bool(is_known.any() and (~is_known).any())


def auroc(scores, is_known) -> float:
    """AUROC with knowns as positives (nan if only one of the two groups is present)."""
    scores, is_known = _check(scores, is_known)
    if not _both(is_known):
        return math.nan
    return float(roc_auc_score(is_known, scores))


def fpr_at_tpr(scores, is_known, tpr: float = 0.95) -> float:
    """Fraction of unknowns accepted at the lowest threshold keeping ``tpr`` of the knowns."""
    scores, is_known = _check(scores, is_known)
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    if not _both(is_known):
        return math.nan
    fpr, tpr_curve, _ = roc_curve(is_known, scores, drop_intermediate=False)
    idx = int(np.searchsorted(tpr_curve, tpr - 1e-12, side="left"))
    return float(fpr[min(idx, len(fpr) - 1)])


def fpr95(scores, is_known) -> float:
    return fpr_at_tpr(scores, is_known, 0.95)


def aupr_in(scores, is_known) -> float:
    scores, is_known = _check(scores, is_known)
    if not _both(is_known):
        return math.nan
    return _unit(average_precision_score(is_known, scores))


def aupr_out(scores, is_known) -> float:
    scores, is_known = _check(scores, is_known)
    if not _both(is_known):
        return math.nan
    return _unit(average_precision_score(~is_known, -scores))


def closed_set_accuracy(predicted, labels, is_known=None) -> float:
    """Accuracy of ``predicted`` classes against ``labels`` on the known samples."""
    predicted = np.asarray(predicted).ravel()
    labels = np.asarray(labels).ravel()
    if predicted.shape != labels.shape:
        raise ValueError(f"predicted {predicted.shape} and labels {labels.shape} differ in length")
    mask = np.ones_like(labels, dtype=bool) if is_known is None else np.asarray(is_known, bool)
    if not mask.any():
        return math.nan
    return float((predicted[mask] == labels[mask]).mean())


def h_score(predicted, labels, is_known, unknown_label: int = -1) -> float:
    """Harmonic mean of known accuracy and unknown accuracy of open-set predictions.

    ``predicted`` holds a class for accepted samples and ``unknown_label`` for rejected ones.
    Known accuracy: fraction of knowns predicted as their true class; unknown accuracy: fraction
    of unknowns predicted ``unknown_label``. nan if either group is empty; 0 if either is 0.
    """
    predicted = np.asarray(predicted).ravel()
    labels = np.asarray(labels).ravel()
    is_known = np.asarray(is_known, bool).ravel()
    if not (predicted.shape == labels.shape == is_known.shape):
        raise ValueError("predicted, labels and is_known must have the same length")
    if not _both(is_known):
        return math.nan
    acc_k = float((predicted[is_known] == labels[is_known]).mean())
    acc_u = float((predicted[~is_known] == unknown_label).mean())
    if acc_k + acc_u == 0:
        return 0.0
    return 2 * acc_k * acc_u / (acc_k + acc_u)


def oscr(scores, correct, is_known) -> float:
    """Open-Set Classification Rate (Dhamija et al., NeurIPS 2018): the area under the curve of
    the correct classification rate CCR(t) (fraction of known samples classified correctly *and*
    with score >= t) against the false positive rate FPR(t) (fraction of unknown samples with
    score >= t), over every threshold t. ``correct``: per sample, whether the closed-set
    prediction is right (ignored for unknowns). In [0, 1]; it equals the closed-set accuracy
    times the AUROC when correctness and score are independent. nan if a group is empty.
    """
    scores, is_known = _check(scores, is_known)
    correct = np.asarray(correct, bool).ravel()
    if correct.shape != scores.shape:
        raise ValueError(f"correct {correct.shape} and scores {scores.shape} differ in length")
    if not _both(is_known):
        return math.nan
    # sweep t from high to low; ties enter together
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    ccr_step = (is_known & correct)[order] / is_known.sum()
    fpr_step = (~is_known)[order] / (~is_known).sum()
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # end of each tie group
    ccr = np.r_[0.0, np.cumsum(ccr_step)[last]]
    fpr = np.r_[0.0, np.cumsum(fpr_step)[last]]
    return _unit(np.trapezoid(ccr, fpr) if hasattr(np, "trapezoid") else np.trapz(ccr, fpr))


def novelty_report(scores, is_known) -> dict:
    """All threshold-free metrics as a JSON-ready dict; undefined ones are None with a note."""
    scores, is_known = _check(scores, is_known)
    n_known, n_unknown = int(is_known.sum()), int((~is_known).sum())
    out: dict = {"n_known": n_known, "n_unknown": n_unknown}
    for name, fn in (("auroc", auroc), ("fpr95", fpr95), ("aupr_in", aupr_in), ("aupr_out", aupr_out)):
        v = fn(scores, is_known)
        out[name] = None if math.isnan(v) else v
    if not _both(is_known):
        which = "unknown" if n_unknown == 0 else "known"
        out["note"] = (
            f"the test set has no {which} sample: AUROC, FPR95 and AUPR are undefined; "
            "only the counts (and accuracy, where computed) are reported"
        )
    return out
