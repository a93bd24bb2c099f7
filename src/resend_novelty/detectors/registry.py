"""The detectors by name: :data:`DETECTORS` and :func:`build_detector`.

``resend``, the fine-tuning-free prototype methods (``cosine``, ``cosine-centered``,
``cosine-standardized``, ``euclidean``) and the baselines of the paper (:data:`BASELINES`:
``knn``, ``mahalanobis``, ``gram`` and the fine-tuning based ``ft-*``). Each class carries its
registry ``name`` and a one-line ``description``.
"""

from __future__ import annotations

from .cosine import CenteredCosineDetector, CosineDetector, StandardizedCosineDetector
from .euclidean import EuclideanDetector
from .finetuned import FT_DETECTORS
from .gram import FineTunedGramDetector, GramDetector
from .knn import KNNDetector
from .mahalanobis import MahalanobisDetector
from .support import SupportDetector
from .resend import ReSeNDDetector

__all__ = ["DETECTORS", "BASELINES", "FT_METHODS", "build_detector"]

BASELINES: dict[str, type[SupportDetector]] = {
    "knn": KNNDetector,
    "mahalanobis": MahalanobisDetector,
    "gram": GramDetector,
    **FT_DETECTORS,
    "ft-gram": FineTunedGramDetector,
}
FT_METHODS = tuple(m for m, cls in BASELINES.items() if cls.fine_tunes)

DETECTORS: dict[str, type[SupportDetector]] = {
    "resend": ReSeNDDetector,
    "cosine": CosineDetector,
    "cosine-centered": CenteredCosineDetector,
    "cosine-standardized": StandardizedCosineDetector,
    "euclidean": EuclideanDetector,
    **BASELINES,
}


def build_detector(method: str, model=None, **kwargs) -> SupportDetector:
    """Detector by name (a key of :data:`DETECTORS`); ``model`` is used by ``resend`` only."""
    if method not in DETECTORS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(DETECTORS)}")
    cls = DETECTORS[method]
    if cls.uses_model:
        return cls(model=model, **kwargs)
    if model is not None:
        raise ValueError(f"--model is only used by the resend method, not {method!r}")
    return cls(**kwargs)
