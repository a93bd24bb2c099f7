"""Prototype detectors: one prototype per known class, the mean feature of its support images.

:class:`PrototypeDetector` is the base of every method of the package. It composes

- the class prototypes (:func:`class_means`, ``prototypes_``), from support features that a
  :class:`~resend_novelty.transforms.DomainNormalizer` has normalised per domain (``center=``);
- the method's similarities ``u`` ``(N, K)`` of test features to the prototypes
  (:meth:`~PrototypeDetector.similarities_features`, one per subclass) and the normality
  derived from them (max_c u_c by default);
- optional test-time prototype refinement (``refine=``, a
  :class:`~resend_novelty.transforms.PrototypeRefiner`);
- threshold calibration without unknown samples (:meth:`~PrototypeDetector.calibrate`, support
  leave-one-out: :mod:`resend_novelty.detectors.calibration`).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from ..features import check_features
from ..models import check_raw_weight
from ..transforms import (REFINE_FRACTION, REFINE_KEEP, DomainNormalizer, PrototypeRefiner,
                          as_mode, normalize)
from .base import Detector
from .calibration import LeaveOneOutCalibration
from .loo import class_means

__all__ = ["PrototypeDetector", "NoLOOCalibrationMixin"]


class PrototypeDetector(LeaveOneOutCalibration, Detector):
    """Base class: class prototypes = mean backbone feature of the support images of each class.

    ``center``: per-domain normalisation (False, True = "center", or "standardize"; see
    :class:`~resend_novelty.transforms.DomainNormalizer`); test batches smaller than
    ``min_center_batch`` use the support statistics unless :meth:`set_test_mean` fixed them.
    ``refine``: steps of test-time prototype refinement (0 = off; ``refine_fraction``,
    ``refine_keep``: see :class:`~resend_novelty.transforms.PrototypeRefiner`).
    ``per_image``: score each test image alone - no statistic of any other test image is used:
    test features are normalised with the support statistics (``support_mean_`` /
    ``support_std_``, whatever the batch size), refinement and :meth:`set_test_mean` are
    refused; scoring N images together gives the scores of scoring them one by one. Default
    False: transductive (test statistics from the images scored together).
    ``shift_threshold`` (not in the paper; default 0 = off; detectors that set
    :attr:`supports_shift_gate`): the shift gate of the domain normalisation. A transductive
    batch whose support-test gap (:func:`~resend_novelty.transforms.shift_gap`) is at most the
    threshold is normalised, with the support, by the statistics of support and test together:
    the prototypes and support references are normalised again with them for that batch (a
    copy of the detector, :meth:`_view_on`); above it, per-domain statistics as without the
    gate. Needs one support domain (no ``domains=`` at fit); no effect with ``per_image``.
    ``raw_weight`` (not in the paper; default 0 = off; same detectors as the shift gate): with
    ``per_image`` and one support domain, the normality is ``(1 - w)`` x the normality on the
    support-normalised features + ``w`` x the normality on the unnormalised features (a copy of
    the detector fitted on the raw support, :meth:`_raw_view`). A test image scored alone may
    come from the support's domain, where the support statistics fit, or from another one,
    where they do not; the raw features assume neither. The nearest class and ``u`` are those
    of the normalised features. No effect in transductive scoring or with ``domains=``.
    ``engine``: inference engine of the backbone on image inputs ("auto": ONNX Runtime on CPU,
    torch on CUDA; "onnx"; "torch"), see :mod:`resend_novelty.features.engine`.

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

    def _make_refiner(self, refine, fraction, keep) -> PrototypeRefiner:
        refiner = PrototypeRefiner(refine, fraction, keep)
        if refiner.steps and self.per_image:
            raise ValueError("test-time prototype refinement (refine > 0) moves the prototypes "
                             "with the test images scored together: it cannot be combined with "
                             "per_image=True (each test image scored alone)")
        if refiner.steps and not self.supports_refinement:
            raise ValueError(f"the {self.name} detector does not support test-time prototype "
                             "refinement (refine > 0): it needs direction-only (cosine-like) "
                             "prototypes")
        return refiner

    # ----------------------------------------------------------------- composed transforms
    @property
    def domain_norm(self) -> str:
        """The per-domain normalisation: "none", "center" or "standardize"."""
        return self.normalizer.mode

    @domain_norm.setter
    def domain_norm(self, mode: str) -> None:
        self.normalizer.mode = as_mode(mode)

    @property
    def center(self) -> bool:
        """Whether features are normalised per domain (``domain_norm`` "center"/"standardize")."""
        return self.normalizer.active

    @property
    def per_image(self) -> bool:
        """Whether each test image is scored alone (no statistic of other test images)."""
        return self.normalizer.per_image

    @property
    def min_center_batch(self) -> int:
        return self.normalizer.min_batch

    @property
    def support_mean_(self) -> torch.Tensor:
        return self.normalizer.support_mean_

    @property
    def support_std_(self) -> torch.Tensor | None:
        return self.normalizer.support_std_

    @property
    def test_mean_(self) -> torch.Tensor | None:
        return self.normalizer.test_mean_

    @property
    def test_std_(self) -> torch.Tensor | None:
        return self.normalizer.test_std_

    @property
    def shift_threshold(self) -> float:
        return self.normalizer.shift_threshold

    @property
    def refine(self) -> int:
        return self.refiner.steps

    @property
    def refine_fraction(self) -> float:
        return self.refiner.fraction

    @property
    def refine_keep(self) -> float:
        return self.refiner.keep

    # ----------------------------------------------------------------- scoring policy
    @property
    def policy(self) -> dict:
        """The scoring policy, the one place a mode takes effect: ``mode`` ("transductive" or
        "per-image"), the domain normalisation, the shift gate, the raw weight, the smallest
        batch that brings its own statistics and whether test statistics are fixed (a
        stream). Recorded with every calibrated threshold and in detector files."""
        n = self.normalizer
        return {"mode": "per-image" if n.per_image else "transductive",
                "domain_norm": n.mode, "shift_threshold": float(n.shift_threshold),
                "raw_weight": float(self.raw_weight), "min_batch": int(n.min_batch),
                "fixed_test_statistics": n.test_mean_ is not None}

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

    def _prepare(self, features, stacklevel: int = 3) -> tuple[torch.Tensor, "PrototypeDetector"]:
        """``(normalised test features, the detector whose references they are scored
        against)``: this detector, or - when the shift gate pools the batch - a copy whose
        support references are normalised with the same pooled statistics."""
        features = self._checked_test(features)
        n = self.normalizer
        if not n.pooled(features):
            return n.transform(features, stacklevel=stacklevel), self
        fixed = n.test_mean_ is not None  # pooled statistics fixed by set_test_mean
        if fixed and self._fixed_view is not None:  # a stream: its references built once
            return normalize(features, n.test_mean_, n.test_std_), self._fixed_view
        support = n.support_features(self.support_features_)
        mean, std = n.pooled_statistics(features, support)
        view = self._view_on(normalize(support, mean, std))
        if fixed:
            self._fixed_view = view
        return normalize(features, mean, std), view

    def _view_on(self, support: torch.Tensor,
                 normalizer: DomainNormalizer | None = None) -> "PrototypeDetector":
        """A copy of this detector fitted on ``support`` (the support rows, normalised as the
        copy scores: with pooled statistics for the shift gate, raw for the raw view): same
        classes, rows and options, its own references; ``normalizer`` replaces this one's."""
        view = type(self)(**dict(self.get_params(), progress=False))
        if normalizer is not None:
            view.normalizer = normalizer
        else:
            view.normalizer = self.normalizer
        for name in self.fitted_attributes:
            setattr(view, name, getattr(self, name))
        view.class_names_ = self.class_names
        view.support_features_ = support
        idx = torch.as_tensor(self.support_index_)
        view.prototypes_, _ = class_means(support, idx, len(self.classes_))
        view._restore_fitted()
        return view

    @property
    def hedged(self) -> bool:
        """Whether the scores mix in the raw view: ``raw_weight > 0``, ``per_image``, a domain
        normalisation and one support domain (see the class docstring)."""
        n = self.normalizer
        return (self.raw_weight > 0 and n.per_image and n.active
                and n.support_direction_ is not None)

    def _raw_view(self) -> "PrototypeDetector":
        """A copy of this detector fitted on the unnormalised support (no domain normalisation,
        its own references), built once per fit."""
        if self._raw is None:  # not hedged itself: its normaliser is inactive
            self._raw = self._view_on(self.normalizer.support_features(self.support_features_),
                                      DomainNormalizer("none", per_image=True))
        return self._raw

    def _mix_raw(self, normality, raw_normality):
        """The hedged normality: ``(1 - raw_weight)`` x normalised + ``raw_weight`` x raw."""
        return (1 - self.raw_weight) * normality + self.raw_weight * raw_normality

    def prepare_features(self, features) -> torch.Tensor:
        """Test features as the similarities see them: checked against the fitted prototypes,
        then normalised per domain (``center=``) with the test statistics. When the shift gate
        pools a batch, these are normalised with the pooled statistics and must be scored
        against the pooled references: use :meth:`test_similarities_features`."""
        return self._prepare(features, stacklevel=4)[0]

    # ----------------------------------------------------------------- test-time statistics
    def set_test_mean(self, features) -> "PrototypeDetector":
        """Fix the statistics used to normalise test features, from many test features ``(N, D)``
        (e.g. a first batch of a stream); a ``(D,)`` mean is accepted when only centring.
        ``set_test_mean(None)`` goes back to the statistics of each scored batch.

        With ``refine > 0`` and test features ``(N, D)``, the refined test-domain prototypes are
        fixed here too (after :meth:`fit`), so that a stream is scored image by image against
        the same prototypes."""
        self.test_prototypes_ = None
        self._fixed_view = None
        if features is None:
            self.normalizer.set_statistics(None)
            return self
        f = check_features(torch.as_tensor(features, dtype=torch.float32), "test features")
        support = None
        if self.normalizer.shift_threshold > 0 and self.normalizer.support_direction_ is not None:
            support = self.normalizer.support_features(self.support_features_)
        self.normalizer.set_statistics(f, support)
        if self.refine and f.ndim == 2 and hasattr(self, "prototypes_"):
            x, view = self._prepare(f)
            self.test_prototypes_ = view.refine_prototypes(x)
        return self

    set_test_statistics = set_test_mean

    def refine_prototypes(self, features: torch.Tensor) -> torch.Tensor:
        """Prototypes moved towards the test domain (not in the paper), from normalised test
        features ``(N, D)`` and no label: ``refine`` steps of
        :meth:`~resend_novelty.transforms.PrototypeRefiner.refine` with this detector's own
        similarities.

        Caveat (measured, BENCHMARKS.md section *Candidates the proxy rejected*): transductive,
        so it can fail where an unknown class is a large share of the test images: on the PACS
        multi-source Photo target (26% of the photos are of the unknown class "person") the
        AUROC falls from 0.73 to 0.41, while Art and Cartoon gain. Off by default.
        :meth:`calibrate` scores the support against the unrefined prototypes.
        """
        return self.refiner.refine(self.prototypes_, features,
                                   lambda x, p: self.similarities_features(x, prototypes=p))

    def test_similarities_features(self, features) -> torch.Tensor:
        """u ``(N, K)`` of test features scored together: normalised (``center=``, with the
        shift gate's pooled references where it applies), against the refined prototypes when
        ``refine > 0`` (those fixed by :meth:`set_test_mean`, else refined on this batch)."""
        return self._test_similarities(features)

    def _test_similarities(self, features) -> torch.Tensor:
        x, view = self._prepare(features)
        protos = None
        if self.refine:
            protos = self.test_prototypes_
            if protos is None:
                if x.shape[0] >= max(2, self.min_center_batch):
                    protos = view.refine_prototypes(x)
                else:
                    warnings.warn(
                        f"scoring a batch of {x.shape[0]} test features (< {self.min_center_batch})"
                        " against the unrefined support prototypes; call set_test_mean(features of "
                        "many test images) to refine them for a stream",
                        stacklevel=3,
                    )
        if protos is None:
            return view.similarities_features(x)
        return view.similarities_features(x, prototypes=protos)

    # ----------------------------------------------------------------- scoring
    def similarities_features(self, features, prototypes: torch.Tensor | None = None
                              ) -> torch.Tensor:
        """u: (N, K) similarity of each (prepared) test feature to each class prototype
        (``prototypes``: any ``(K, D)`` rows; default ``prototypes_``)."""
        raise NotImplementedError

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

    def nearest_class_features(self, features) -> np.ndarray:
        u = self._test_similarities(features)
        return self.classes_[u.argmax(dim=1).numpy()]

    def score_and_nearest_features(self, features) -> tuple[np.ndarray, np.ndarray]:
        """Normality and nearest known class from one similarity computation."""
        normality, u = self.score_similarities_features(features)
        return normality, self.classes_[u.argmax(dim=1).numpy()]


class NoLOOCalibrationMixin:
    """Mixin for detectors whose normality is not a function of the class similarities u.

    Their ``score_features`` is their own, so the shortcut of :class:`PrototypeDetector` that
    derives the normality and the nearest class from one pass over u is redirected to it; and
    leave-one-out calibration (defined for prototype-style detectors) is refused.
    """

    def score_and_nearest_features(self, features) -> tuple[np.ndarray, np.ndarray]:
        return self.score_features(features), self.nearest_class_features(features)

    def calibrate(self, *args, **kwargs):
        raise ValueError(
            f"leave-one-out threshold calibration is not available for method {self.name!r} "
            "(defined for the prototype methods resend/cosine/euclidean/knn/mahalanobis); "
            "pass an explicit threshold"
        )

    calibrate_features = calibrate
