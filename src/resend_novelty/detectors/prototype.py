"""Prototype detectors: one prototype per known class, the mean feature of its support images.

:class:`PrototypeDetector` is the base of the prototype methods (resend, cosine*, euclidean,
knn, mahalanobis). On top of :class:`~resend_novelty.detectors.support.SupportDetector` (the
class prototypes ``prototypes_`` of the normalised support) it composes

- the method's similarities ``u`` ``(N, K)`` of test features to the prototypes
  (:meth:`~PrototypeDetector.similarities_features`, one per subclass) and the normality
  derived from them (max_c u_c by default);
- the scoring policy (:class:`~resend_novelty.detectors.policy.ScoringPolicy`: mode, domain
  normalisation, shift gate, raw weight, refinement);
- threshold calibration without unknown samples (:mod:`resend_novelty.detectors.calibration`).
"""

from __future__ import annotations

import numpy as np
import torch

from .calibration import LeaveOneOutCalibration, NoLOOCalibrationMixin
from .support import SupportDetector

__all__ = ["PrototypeDetector", "NoLOOCalibrationMixin"]


class PrototypeDetector(LeaveOneOutCalibration, SupportDetector):
    """Base class: class prototypes = mean backbone feature of the support images of each class.

    Options: those of :class:`~resend_novelty.detectors.support.SupportDetector` (the scoring
    policy, :mod:`resend_novelty.detectors.policy`, and the engine).

    Fitted attributes: ``classes_``, ``prototypes_``, ``class_counts_``, ``class_names_``,
    ``support_features_`` (the domain-normalised support features), ``support_mean_`` /
    ``support_std_`` (with ``center``); after calibration ``threshold_``, ``calibration_``,
    ``loo_scores_``.
    """

    name = "prototype"

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
        self._fixed_loo = None
        self._restore_fitted()
        return self

    # ----------------------------------------------------------------- scoring
    def normality_from_similarities(self, u: torch.Tensor) -> torch.Tensor:
        return u.max(dim=1).values

    def score_similarities_features(self, features) -> tuple[np.ndarray, torch.Tensor]:
        """``(normality (N,), u (N, K))`` of test features scored together: ``u`` as
        :meth:`test_similarities_features`; the normality from it, mixed with that of the raw
        view when :attr:`hedged`."""
        u = self._test_similarities(features)
        normality = self.normality_from_similarities(u)
        if self.hedged:
            raw = self._raw_view()
            normality = self._mix_raw(normality, raw.normality_from_similarities(
                raw._test_similarities(features)))
        return normality.numpy(), u

    def score_features(self, features) -> np.ndarray:
        return self.score_similarities_features(features)[0]

    def score_and_nearest_features(self, features) -> tuple[np.ndarray, np.ndarray]:
        """Normality and nearest known class from one similarity computation."""
        normality, u = self.score_similarities_features(features)
        return normality, self.classes_[u.argmax(dim=1).numpy()]
