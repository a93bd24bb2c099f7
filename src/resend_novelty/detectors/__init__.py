"""Novelty detectors: ReSeND and the baselines of the paper, under one fit/score/predict API.

- :mod:`.base`: :class:`Detector`, the API (inputs, support validation, thresholds), UNKNOWN;
- :mod:`.support`: :class:`SupportDetector`, the support's classes and class means, the base
  of every method; :mod:`.policy`: the scoring policy (mode, normalisation, gate, raw weight);
- :mod:`.prototype`: :class:`PrototypeDetector`, normality from the similarities to the
  prototypes; :mod:`.calibration`: thresholds calibrated in the scoring policy;
- one method per file: :mod:`.resend`, :mod:`.cosine`, :mod:`.euclidean`, :mod:`.knn`,
  :mod:`.mahalanobis`, :mod:`.finetuned` (ft-*), :mod:`.gram` (gram, ft-gram);
- :mod:`.registry`: :data:`DETECTORS` and :func:`build_detector`;
- :mod:`.persistence`: a fitted detector in one safetensors file (:func:`save_detector`,
  :func:`load_detector`).
"""

from .base import UNKNOWN, Detector, clone, fit_support
from .cosine import CenteredCosineDetector, CosineDetector, StandardizedCosineDetector
from .euclidean import EuclideanDetector
from .finetuned import FT_DETECTORS, FineTunedDetector, resend_eval_seconds, train_head
from .gram import FineTunedGramDetector, GramDetector, GramStats, gram_statistics
from .knn import KNNDetector
from .mahalanobis import MahalanobisDetector, fit_mahalanobis, require_pytorch_ood
from .loo import class_means, leave_one_out_similarities
from .calibration import NoLOOCalibrationMixin
from .prototype import PrototypeDetector
from .support import SupportDetector
from .registry import BASELINES, DETECTORS, FT_METHODS, build_detector
from .persistence import (SAVABLE_METHODS, DetectorFileError, load_detector,  # noqa: E402
                          read_detector_metadata, save_detector)
from .resend import ReSeNDDetector
from .threshold import THRESHOLD_SOURCES, test_mode_threshold

__all__ = [
    "UNKNOWN", "Detector", "fit_support", "clone",
    "SupportDetector", "PrototypeDetector", "NoLOOCalibrationMixin", "class_means", "leave_one_out_similarities",
    "ReSeNDDetector", "CosineDetector", "CenteredCosineDetector", "StandardizedCosineDetector",
    "EuclideanDetector", "KNNDetector", "MahalanobisDetector", "fit_mahalanobis",
    "require_pytorch_ood", "FineTunedDetector", "FT_DETECTORS", "resend_eval_seconds",
    "train_head", "GramDetector", "FineTunedGramDetector", "GramStats", "gram_statistics",
    "DETECTORS", "BASELINES", "FT_METHODS", "build_detector",
    "save_detector", "load_detector", "read_detector_metadata", "DetectorFileError",
    "SAVABLE_METHODS", "test_mode_threshold", "THRESHOLD_SOURCES",
]
