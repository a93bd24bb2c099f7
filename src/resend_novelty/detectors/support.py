"""Detectors fitted on the support's classes: the part every method shares below its scoring.

:class:`SupportDetector` validates the support, normalises it in the scoring policy
(:class:`~resend_novelty.detectors.policy.ScoringPolicy`), keeps the normalised support
features, the class of each row and the class means (``prototypes_``), and predicts the nearest
class from the method's similarities. The prototype methods
(:class:`~resend_novelty.detectors.PrototypeDetector`: normality from the similarities,
leave-one-out calibration, detector files) and the baselines that train or keep more than class
statistics (``ft-*``, ``gram``: their own normality, no calibration, not savable) derive from
it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..features import check_features
from ..models import check_raw_weight
from ..transforms import REFINE_FRACTION, REFINE_KEEP, DomainNormalizer, as_mode
from .base import Detector
from .loo import class_means
from .policy import ScoringPolicy

__all__ = ["SupportDetector"]


class SupportDetector(ScoringPolicy, Detector):
    """Base of every method: the support's classes, normalised support features and class
    means. Scoring options: the scoring policy (:mod:`resend_novelty.detectors.policy`);
    ``engine``: inference engine of the backbone on image inputs ("auto": ONNX Runtime on
    CPU, torch on CUDA; "onnx"; "torch"). A method implements :meth:`similarities_features`
    (u, for the nearest class) and :meth:`score_features` (the normality)."""

    name = "support"
    # detectors whose similarities depend only on the direction of a prototype (cosine-like):
    # the refined prototypes are unit vectors
    supports_refinement = False
    # detectors whose fitted state is rebuilt from support_features_ / prototypes_ by
    # _restore_fitted, so that a copy on other support rows can be derived (_view_on:
    # shift_threshold > 0, raw_weight > 0)
    supports_shift_gate = False

    def __init__(
        self,
        backbone="efficientnet_lite0",
        device=None,
        cache=True,
        batch_size: int = 64,
        num_workers: int | None = None,
        progress: bool = True,
        center: bool | str = False,
        min_center_batch: int = 16,
        refine: int = 0,
        refine_fraction: float = REFINE_FRACTION,
        refine_keep: float = REFINE_KEEP,
        per_image: bool = False,
        engine: str = "auto",
        shift_threshold: float = 0.0,
        raw_weight: float = 0.0,
    ):
        self.engine = engine  # inference engine of image inputs: "auto", "onnx" or "torch"
        self.normalizer = DomainNormalizer(as_mode(center), int(min_center_batch),
                                           per_image=per_image, shift_threshold=shift_threshold)
        self.raw_weight = check_raw_weight(raw_weight)
        for option, used in (("the shift gate (shift_threshold > 0)",
                              self.normalizer.shift_threshold > 0),
                             ("raw_weight > 0", self.raw_weight > 0)):
            if used and not self.supports_shift_gate:  # both score a copy: _view_on
                raise ValueError(f"the {self.name} detector does not support {option}: its "
                                 "fitted state is not rebuilt from the support features")
        self.refiner = self._make_refiner(refine, refine_fraction, refine_keep)
        super().__init__(backbone, device, cache, batch_size, num_workers, progress)
        self.test_prototypes_ = None
        self._fixed_view = None  # pooled references of statistics fixed by set_test_mean
        self._raw = None  # the raw view (raw_weight), built at the first score

    # ----------------------------------------------------------------- fit
    def fit_features(self, features, labels, domains: Sequence | None = None) -> "SupportDetector":
        """Prototypes from support features ``(N, D)`` and integer ``labels``.

        With domain normalisation (``center=True``/``"center"`` or ``"standardize"``) the support
        features are normalised with the statistics of their source domain when ``domains`` (one
        id per row) is given - as in pretraining, where every domain is normalised on its own -
        and with the statistics of the whole support set otherwise. Without domain normalisation
        ``domains`` has no effect.
        """
        features, labels = self._validate_support(features, labels, domains)
        self.test_prototypes_ = None  # refined from the old prototypes: stale
        self._fixed_view = None
        self._raw = None
        self._fixed_loo = None
        features = self.normalizer.fit_transform(features, domains)
        self.support_features_ = features  # what subclasses build their own statistics from
        idx = torch.as_tensor(np.searchsorted(self.classes_, labels))
        self.support_index_ = idx.numpy()  # class index (0..K-1) of each support row
        self.prototypes_, counts = class_means(features, idx, len(self.classes_))
        self.class_counts_ = counts.numpy()
        self.class_names_ = [str(c) for c in self.classes_]
        self._on_fit()
        return self

    def _on_fit(self) -> None:
        """Checks of a subclass on the fitted prototypes (raise to refuse the support set)."""

    def _restore_fitted(self) -> None:
        """Rebuild derived (unsaved) state after :meth:`load_fitted_state`."""

    def _checked_test(self, features) -> torch.Tensor:
        if not hasattr(self, "prototypes_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit() first")
        features = check_features(torch.as_tensor(features, dtype=torch.float32), "test features")
        if features.ndim != 2 or features.shape[1] != self.prototypes_.shape[1]:
            raise ValueError(
                f"test features of shape {tuple(features.shape)} do not match the prototypes' "
                f"dimension {self.prototypes_.shape[1]}"
            )
        return features

    # ----------------------------------------------------------------- scoring
    def similarities_features(self, features, prototypes: torch.Tensor | None = None
                              ) -> torch.Tensor:
        """u: (N, K) similarity of each (prepared) test feature to each class prototype
        (``prototypes``: any ``(K, D)`` rows; default ``prototypes_``)."""
        raise NotImplementedError

    def nearest_class_features(self, features) -> np.ndarray:
        u = self._test_similarities(features)
        return self.classes_[u.argmax(dim=1).numpy()]

    def score_similarities_features(self, features) -> tuple[np.ndarray, torch.Tensor]:
        """``(normality (N,), u (N, K))`` of test features scored together: the method's own
        normality and the similarities that give the nearest class."""
        return self.score_features(features), self._test_similarities(features)
