"""A threshold from a labelled validation folder (``resend score/fit --validation DIR``).

``DIR/<class>/<image>``: images of classes of the support are known, images of any other class
folder are unknown (optional). The fitted detector scores the validation images in its own
scoring policy (per image: each alone; transductive: all of them together, as a test batch),
and the threshold is the one accepting a fraction ``tpr`` of the known validation images
(:func:`~resend_novelty.detectors.calibration.threshold_at_recall`). Where unknown images are
present, the rule records the share of them the threshold rejects. Use it when labelled images
of the target conditions exist (the camera, the style, the class mix of the deployment): they
say more about new images than the support alone.
"""

from __future__ import annotations

import os

import numpy as np

from ..data import DataError
from ..detectors.calibration import threshold_at_recall
from .folders import scan_test

__all__ = ["validation_threshold"]


def validation_threshold(detector, folder: str | os.PathLike, tpr: float = 0.95
                         ) -> tuple[float, dict]:
    """``(threshold, rule)`` from the labelled validation ``folder`` (module doc)."""
    if not 0.0 < float(tpr) <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    images = scan_test(folder)
    if images.labels is None:
        raise DataError(f"the validation folder {folder} must hold class folders only "
                        "(DIR/<class>/<image>): the class of each image says whether it is known")
    known_names = set(detector.class_names)
    is_known = np.array([lab in known_names for lab in images.labels], dtype=bool)
    if not is_known.any():
        raise DataError(f"the validation folder {folder} has no class of the support "
                        f"({', '.join(sorted(known_names))}): no known image to calibrate on")
    feats = detector.features(images.paths, desc="validation features")[0]
    scores = np.asarray(detector.score_features(feats), dtype=np.float64)
    threshold = threshold_at_recall(scores[is_known], tpr)
    rule = {"source": "validation folder", "folder": str(folder), "tpr": float(tpr),
            "n_known": int(is_known.sum()), "n_unknown": int((~is_known).sum()),
            "achieved_recall": float((scores[is_known] >= threshold).mean()),
            "policy": getattr(detector, "policy", None)}
    if (~is_known).any():
        rule["unknown_rejected"] = float((scores[~is_known] < threshold).mean())
    return threshold, rule
