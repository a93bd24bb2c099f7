"""Fusion of a classifier's MSP with a novelty score, and the source-based threshold.

::

    fused = (w_msp * MSP + w_nov * normality) / (w_msp + w_nov)       # paper: w_msp = w_nov
    prediction = argmax class of the classifier   if fused >= threshold
                 UNKNOWN (-1)                     otherwise

**Threshold rule** (default, :func:`source_threshold`): the largest value that accepts
``accept`` = 95% of the known source samples, from out-of-fold source scores. A fixed
``threshold`` can be given instead (on the fused scale, after normalisation).

**Normalisation** (``NORMALIZATIONS``): ``"none"`` averages raw scores (the paper's rule for
ReSeND, whose normality max-softmax lies in [1/K, 1] like the MSP). Scores on another scale
(cosine in [-1, 1], minus a Euclidean distance) can be standardised first with statistics of the
out-of-fold *source* scores: ``"zscore"`` ((s - mean) / std) or ``"minmax"`` ((s - min) / (max -
min)); :func:`default_normalization` picks one for a detector method.
"""

from __future__ import annotations

import math

import numpy as np

from ..detectors import UNKNOWN
from ..detectors.calibration import threshold_at_recall
from ..models import RelationalModule, load_checkpoint
from .probabilities import msp, validate_probabilities, validate_scores

__all__ = ["NORMALIZATIONS", "default_normalization", "source_threshold", "OpenSetFusion"]

NORMALIZATIONS = ("none", "zscore", "minmax")


def default_normalization(method: str, model=None) -> str:
    """``normalize="auto"``: "none" (the paper's plain mean) for a ReSeND detector whose normality
    is max(softmax(u)) - it lies in [1/K, 1] like the MSP - and "zscore" for every other score
    (cosine, distances, max-logit: other scales). ``model``: a RelationalModule, a checkpoint
    path, or None for the shipped checkpoint."""
    if method != "resend":
        return "zscore"
    m = model if isinstance(model, RelationalModule) else load_checkpoint(model)
    return "none" if m.scoring.normality == "softmax" else "zscore"


def source_threshold(source_scores, accept: float = 0.95) -> float:
    """Largest threshold that accepts (score >= threshold) at least ``accept`` of the source scores.

    With ``n`` sorted scores ``s``, it is ``s[n - ceil(accept * n)]``: e.g. 100 scores and
    ``accept=0.95`` give the 6th smallest score, so exactly 95 are accepted (more on ties).
    """
    s = np.sort(validate_scores(source_scores, "source scores"))
    if s.size == 0:
        raise ValueError("no source scores")
    if not 0.0 < accept <= 1.0:
        raise ValueError(f"accept must be in (0, 1], got {accept}")
    return threshold_at_recall(s, accept)  # the ceil(accept * n)-th largest


class OpenSetFusion:
    """Fuse a classifier's MSP with a novelty score; threshold and predict open-set labels.

    ``weights = (w_msp, w_novelty)`` (non-negative, normalised to sum 1; paper: equal).
    ``(1, 0)`` is the classifier alone (MSP baseline). ``normalize``: ``"none"`` (raw scores,
    paper rule for ReSeND), ``"zscore"`` or ``"minmax"`` (statistics of the source scores given
    to :meth:`fit`). ``threshold``: a fixed value on the fused scale, or None to set it in
    :meth:`fit` so that ``accept`` of the source samples are accepted.
    """

    def __init__(self, weights=(0.5, 0.5), normalize: str = "none",
                 threshold: float | None = None, accept: float = 0.95):
        w = np.asarray(weights, dtype=np.float64).ravel()
        if w.shape != (2,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be two non-negative numbers, not both 0; got {weights}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if not 0.0 < accept <= 1.0:
            raise ValueError(f"accept must be in (0, 1], got {accept}")
        if threshold is not None and not math.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold}")
        self.weights = w / w.sum()
        self.normalize = normalize
        self.accept = accept
        self.fixed_threshold = threshold
        self.stats_: tuple | None = None
        self.threshold_: float | None = threshold

    # -- normalisation
    @staticmethod
    def _stats(s: np.ndarray, how: str) -> tuple[float, float]:
        if how == "zscore":
            center, scale = float(s.mean()), float(s.std())
        else:  # minmax
            center, scale = float(s.min()), float(s.max() - s.min())
        return center, (scale if scale > 1e-12 else 1.0)

    def fit(self, source_msp=None, source_novelty=None) -> "OpenSetFusion":
        """Normalisation statistics and (without a fixed threshold) the threshold, from source scores."""
        need_msp = self.weights[0] > 0
        need_nov = self.weights[1] > 0
        if self.normalize != "none" or self.fixed_threshold is None:
            for name, s, need in (("source_msp", source_msp, need_msp),
                                  ("source_novelty", source_novelty, need_nov)):
                if need and s is None:
                    raise ValueError(
                        f"{name} is needed to set the threshold/normalisation from source data "
                        "(or use a fixed threshold and normalize='none')"
                    )
        m = validate_scores(source_msp, "source MSP") if source_msp is not None else None
        v = validate_scores(source_novelty, "source novelty") if source_novelty is not None else None
        if m is not None and v is not None and len(m) != len(v):
            raise ValueError(f"source MSP ({len(m)}) and source novelty ({len(v)}) differ in length")
        if self.normalize != "none":
            self.stats_ = (
                self._stats(m, self.normalize) if need_msp else (0.0, 1.0),
                self._stats(v, self.normalize) if need_nov else (0.0, 1.0),
            )
        if self.fixed_threshold is None:
            n = len(m) if m is not None else len(v)
            src = self.fuse(m if m is not None else np.zeros(n), v if v is not None else np.zeros(n))
            self.threshold_ = source_threshold(src, self.accept)
            self.source_acceptance_ = float((src >= self.threshold_).mean())
        return self

    def fuse(self, msp_scores, novelty) -> np.ndarray:
        """Weighted mean of the (normalised) MSP and novelty scores; higher = more likely known."""
        m = validate_scores(msp_scores, "MSP")
        v = validate_scores(novelty, "novelty scores", len(m))
        if self.normalize != "none":
            if self.stats_ is None:
                raise RuntimeError("normalize needs source statistics: call fit() first")
            (cm, sm), (cv, sv) = self.stats_
            m, v = (m - cm) / sm, (v - cv) / sv
        return self.weights[0] * m + self.weights[1] * v

    def score(self, probs, novelty) -> np.ndarray:
        """Fused normality of test samples from class probabilities and novelty scores."""
        probs = validate_probabilities(probs)
        return self.fuse(msp(probs), novelty)

    def predict(self, probs, novelty, classes=None) -> np.ndarray:
        """Classifier's argmax class (``classes[j]``), or ``UNKNOWN`` below the threshold."""
        if self.threshold_ is None:
            raise RuntimeError("no threshold: call fit() with source scores or pass threshold=")
        probs = validate_probabilities(probs, n_classes=None if classes is None else len(classes))
        fused = self.fuse(msp(probs), novelty)
        cls = np.arange(probs.shape[1]) if classes is None else np.asarray(classes)
        return np.where(fused >= self.threshold_, cls[probs.argmax(axis=1)], UNKNOWN)
