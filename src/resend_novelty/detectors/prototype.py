"""Prototype detectors: one prototype per known class, the mean feature of its support images.

:class:`PrototypeDetector` is the base of the prototype methods (resend, cosine*, euclidean,
knn, mahalanobis). It composes

- the class prototypes (:func:`class_means`, ``prototypes_``) of the (normalised) support;
- the method's similarities ``u`` ``(N, K)`` of test features to the prototypes
  (:meth:`~PrototypeDetector.similarities_features`, one per subclass) and the normality
  derived from them (max_c u_c by default);
- the scoring policy (:class:`~resend_novelty.detectors.policy.ScoringPolicy`: mode, domain
  normalisation, shift gate, raw weight, refinement);
- threshold calibration without unknown samples (:mod:`resend_novelty.detectors.calibration`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..features import check_features
from ..models import check_raw_weight
from ..transforms import REFINE_FRACTION, REFINE_KEEP, DomainNormalizer, as_mode
from .base import Detector
from .calibration import LeaveOneOutCalibration, NoLOOCalibrationMixin
from .loo import class_means
from .policy import ScoringPolicy

__all__ = ["PrototypeDetector", "NoLOOCalibrationMixin"]


class PrototypeDetector(ScoringPolicy, LeaveOneOutCalibration, Detector):
    """Base class: class prototypes = mean backbone feature of the support images of each class.

    Scoring options (``center``, ``min_center_batch``, ``per_image``, ``shift_threshold``,
    ``raw_weight``, ``refine``, ``refine_fraction``, ``refine_keep``): the scoring policy,
    :mod:`resend_novelty.detectors.policy`. ``engine``: inference engine of the backbone on
    image inputs ("auto": ONNX Runtime on CPU, torch on CUDA; "onnx"; "torch").

    Fitted attributes: ``classes_``, ``prototypes_``, ``class_counts_``, ``class_names_``,
    ``support_features_`` (the domain-normalised support features), ``support_mean_`` /
    ``support_std_`` (with ``center``); after calibration ``threshold_``, ``calibration_``,
    ``loo_scores_``.
    """

    name = "prototype"
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
    def fit_features(self, features, labels, domains: Sequence | None = None) -> "PrototypeDetector":
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

    # ----------------------------------------------------------------- fitted state
    # the fitted tensors scoring needs, saved by resend_novelty.detectors.save_detector;
    # a subclass with fitted tensors of its own adds their names and rebuilds what derives
    # from them in _restore_fitted
    fitted_attributes: tuple[str, ...] = ("classes_", "prototypes_", "class_counts_",
                                          "support_features_", "support_index_")

    def fitted_state(self) -> dict[str, torch.Tensor]:
        """The fitted tensors (:attr:`fitted_attributes`, the support / fixed test statistics
        of the domain normalisation, ``loo_scores_``) by name, as CPU tensors."""
        if not hasattr(self, "prototypes_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit() first")
        state = {name: getattr(self, name) for name in self.fitted_attributes}
        for name in ("support_mean_", "support_std_", "test_mean_", "test_std_", "loo_scores_"):
            if getattr(self, name, None) is not None:
                state[name] = getattr(self, name)
        if self.normalizer.support_direction_ is not None:
            state["support_direction_"] = self.normalizer.support_direction_
        if self.normalizer.test_pooled_:
            state["test_pooled_"] = torch.tensor(True)
        return {k: torch.as_tensor(np.asarray(v) if isinstance(v, np.ndarray) else v).cpu()
                .contiguous() for k, v in state.items()}

    def load_fitted_state(self, state: dict) -> "PrototypeDetector":
        """Restore what :meth:`fitted_state` returned (same class and options)."""
        missing = sorted(set(self.fitted_attributes) - set(state))
        if missing:
            raise ValueError(f"fitted state of {type(self).__name__} lacks {missing}")
        numpy_attrs = {"classes_", "class_counts_", "support_index_", "loo_scores_"}
        self.normalizer.support_direction_ = None
        self.normalizer.test_pooled_ = False
        for name, value in state.items():
            if name in ("support_mean_", "support_std_", "test_mean_", "test_std_",
                        "support_direction_"):
                setattr(self.normalizer, name, value.float())
            elif name == "test_pooled_":
                self.normalizer.test_pooled_ = bool(value)
            else:
                setattr(self, name, value.numpy() if name in numpy_attrs else value)
        if self.center and "support_std_" not in state:
            self.normalizer.support_std_ = None
        self.test_prototypes_ = None
        self._fixed_view = None
        self._raw = None
        self._restore_fitted()
        return self

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

    def normality_from_similarities(self, u: torch.Tensor) -> torch.Tensor:
        return u.max(dim=1).values

    def score_features(self, features) -> np.ndarray:
        return self.score_similarities_features(features)[0]

    def nearest_class_features(self, features) -> np.ndarray:
        u = self._test_similarities(features)
        return self.classes_[u.argmax(dim=1).numpy()]

    def score_and_nearest_features(self, features) -> tuple[np.ndarray, np.ndarray]:
        """Normality and nearest known class from one similarity computation."""
        normality, u = self.score_similarities_features(features)
        return normality, self.classes_[u.argmax(dim=1).numpy()]
