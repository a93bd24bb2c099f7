"""Threshold calibration of prototype detectors without unknown samples: support leave-one-out.

Each support image is scored *leave-one-out* - the prototype of its own class is recomputed
without it, the other prototypes are unchanged - so it is scored like an unseen image of a known
class (:func:`~resend_novelty.detectors.loo.leave_one_out_similarities`). The threshold is the
``ceil(tpr * m)``-th largest of the ``m`` LOO scores: at least a fraction ``tpr`` of the support
images would be accepted as known. Images of classes with a single support image cannot be left
out (their class would have no prototype): they are skipped with a warning naming the class.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch

from ..transforms import normalize
from .loo import leave_one_out_similarities

__all__ = ["LeaveOneOutCalibration"]


class LeaveOneOutCalibration:
    """Mixin of :class:`~resend_novelty.detectors.PrototypeDetector`: ``calibrate`` /
    ``calibrate_features`` set ``threshold_`` from the support's leave-one-out scores (module
    doc); ``calibration_`` and ``loo_scores_`` record how."""

    def loo_scores_features(
        self, features, labels, block: int = 16
    ) -> tuple[np.ndarray, np.ndarray]:
        """Leave-one-out normality of the support features the detector was fitted on (same
        rows, same order): :meth:`loo_similarities_features`, then the normality.

        Returns ``(scores, used)``: ``scores`` of the images in classes with >= 2 images,
        ``used`` the boolean mask of those images among ``features``.
        """
        u, used = self.loo_similarities_features(features, labels, block)
        scores = self.normality_from_similarities(u[torch.as_tensor(used)]).numpy()
        if self.hedged:  # the raw view's leave-one-out scores of the same rows
            scores = self._mix_raw(scores, self._raw_view().loo_scores_features(
                features, labels, block)[0])
        return scores, used

    def _loo_index(self, features, labels) -> tuple[torch.Tensor, np.ndarray]:
        """Prepared support features and the class index of each row, checked."""
        # the support as fitted: its own statistics (never fixed test or pooled statistics)
        features = self._checked_test(features)
        if self.normalizer.active:
            features = normalize(features, self.support_mean_, self.support_std_)
        labels = np.asarray(labels)
        if labels.shape != (features.shape[0],):
            raise ValueError(f"{features.shape[0]} support features but {labels.size} labels")
        missing = sorted(set(labels.tolist()) - set(self.classes_.tolist()))
        if missing:
            raise ValueError(f"labels {missing} are not classes of the fitted detector")
        return features, np.searchsorted(self.classes_, labels)

    def loo_similarities_features(
        self, features, labels, block: int = 16
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Leave-one-out similarities ``u`` ``(N, K)`` of support features w.r.t. the fitted
        prototypes (:func:`leave_one_out_similarities`). Returns ``(u, used)``."""
        features, idx = self._loo_index(features, labels)
        return leave_one_out_similarities(self.similarities_features, self.prototypes_, features,
                                          idx, block, progress=self.progress)

    def calibrate_features(self, features, labels, tpr: float = 0.95) -> "LeaveOneOutCalibration":
        """Fit on support features and set ``threshold_`` from their leave-one-out scores.

        ``threshold_`` is the ``ceil(tpr * m)``-th largest of the m LOO scores, so that at least
        ``tpr`` of the support images are accepted (recall of knowns >= ``tpr`` on the support
        set). Classes with a single image are skipped with a warning (error if none is left).
        Details in ``calibration_`` (tpr, n_images, skipped_classes, achieved_recall).
        """
        if not 0.0 < float(tpr) <= 1.0:
            raise ValueError(f"tpr must be in (0, 1], got {tpr}")
        self.fit_features(features, labels)
        return self._calibrate_fitted(features, labels, float(tpr))

    def _calibrate_fitted(self, features, labels, tpr: float) -> "LeaveOneOutCalibration":
        labels = np.asarray(labels)
        counts = dict(zip(self.classes_.tolist(), self.class_counts_.tolist()))
        names = dict(zip(self.classes_.tolist(), self.class_names_))
        single = [names[c] for c, n in counts.items() if n < 2]
        if single and len(single) == len(counts):
            raise ValueError(
                "cannot calibrate: every support class has a single image, so no image can be "
                "left out (leave-one-out needs >= 2 images in a class)"
            )
        if single:
            warnings.warn(
                f"calibration skips class(es) with a single support image (leave-one-out "
                f"impossible): {', '.join(single)}",
                stacklevel=3,
            )
        scores, used = self.loo_scores_features(features, labels)
        m = len(scores)
        k = min(m, max(1, math.ceil(tpr * m - 1e-9)))
        threshold = float(np.sort(scores)[::-1][k - 1])
        self.threshold_ = threshold
        self.calibration_ = {
            "rule": "support leave-one-out",
            "tpr": tpr,
            "n_images": int(m),
            "skipped_classes": single,
            "achieved_recall": float((scores >= threshold).mean()),
        }
        self.loo_scores_ = scores
        return self

    def calibrate(self, support, labels: Sequence[int] | None = None, tpr: float = 0.95):
        """Fit on ``support`` (as :meth:`fit`) and set ``threshold_`` from leave-one-out scores.

        After this, ``predict(x)`` needs no threshold. See :meth:`calibrate_features`.
        """
        if not 0.0 < float(tpr) <= 1.0:
            raise ValueError(f"tpr must be in (0, 1], got {tpr}")
        feats, labels = self._fit_input(support, labels)
        return self._calibrate_fitted(feats, labels, float(tpr))
