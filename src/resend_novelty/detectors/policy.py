"""The scoring policy of prototype detectors: how test features are normalised before they
are compared with the support, in one place (:class:`ScoringPolicy`, a mixin of
:class:`~resend_novelty.detectors.PrototypeDetector`).

The policy (:attr:`ScoringPolicy.policy`, saved in detector files and recorded with every
calibrated threshold) is made of

- the **mode**: transductive (test statistics from the images scored together) or per image
  (``per_image=True``: support statistics for every image; the scores of a batch are those of
  its images one by one), changed after fitting only by :meth:`ScoringPolicy.set_policy`, which
  re-calibrates the threshold for the new mode;
- the per-domain normalisation (``center=``: False, True = "center", or "standardize"; see
  :class:`~resend_novelty.transforms.DomainNormalizer`); transductive batches smaller than
  ``min_center_batch`` use the support statistics unless :meth:`ScoringPolicy.set_test_mean`
  fixed test statistics (a stream);
- the **shift gate** (``shift_threshold``, not in the paper; 0 = off; detectors that set
  ``supports_shift_gate``): a transductive batch whose support-test gap
  (:func:`~resend_novelty.transforms.shift_gap`) is at most the threshold is normalised, with
  the support, by the statistics of support and test together - the prototypes and support
  references are normalised again with them for that batch (a view of the detector,
  ``_view_on``); above it, per-domain statistics. Needs one support domain;
- the **raw weight** (``raw_weight``, not in the paper; 0 = off; same detectors): per image and
  with one support domain, the normality is ``(1 - w)`` x the normality on the
  support-normalised features + ``w`` x the normality on the unnormalised features (a view
  fitted on the raw support, ``_raw_view``): a test image alone may come from the support's
  domain, where its statistics fit, or from another one, where they do not. The nearest class
  and ``u`` are those of the normalised features;
- test-time prototype **refinement** (``refine=`` steps, transductive only; ``refine_fraction``,
  ``refine_keep``: :class:`~resend_novelty.transforms.PrototypeRefiner`).
"""

from __future__ import annotations

import warnings

import torch

from ..features import check_features
from ..transforms import DomainNormalizer, PrototypeRefiner, as_mode, normalize
from .calibration import RULE
from .loo import class_means

__all__ = ["ScoringPolicy"]


class ScoringPolicy:
    """Mixin: the scoring policy of a prototype detector (module doc). The detector provides
    ``normalizer`` (a :class:`~resend_novelty.transforms.DomainNormalizer`), ``refiner``,
    ``raw_weight``, its fitted support (``support_features_``, ``support_index_``,
    ``classes_``) and ``similarities_features``."""
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

    def _prepare(self, features, stacklevel: int = 3) -> tuple[torch.Tensor, "ScoringPolicy"]:
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
                 normalizer: DomainNormalizer | None = None) -> "ScoringPolicy":
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

    def _raw_view(self) -> "ScoringPolicy":
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

    def set_policy(self, per_image: bool) -> "ScoringPolicy":
        """Score per image (``True``) or transductively (``False``) from now on.

        A threshold is valid for the policy it was calibrated in: a leave-one-out threshold is
        calibrated again for the new policy from the fitted support (no image needed); a
        threshold given as a number for another policy is refused (ValueError): drop it
        (``threshold_ = None``) or set a new one."""
        per_image = bool(per_image)
        if per_image == self.per_image:
            return self
        if per_image and self.refine:
            raise ValueError("per-image scoring: this detector refines prototypes on the test "
                             "images scored together (refine > 0); fit it without refinement")
        if per_image and self.normalizer.test_mean_ is not None:
            raise ValueError("per-image scoring uses the support statistics: this detector has "
                             "fixed test statistics (set_test_mean); call set_test_mean(None)")
        threshold = getattr(self, "threshold_", None)
        rule = dict(getattr(self, "threshold_rule_", None) or {})
        if threshold is not None and rule.get("source") != RULE:
            old = "per-image" if self.per_image else "transductive"
            raise ValueError(
                f"the threshold {threshold:.4g} ({rule.get('source', 'given')}) was set for "
                f"{old} scoring and does not hold for "
                f"{'per-image' if per_image else 'transductive'} scoring: calibrate it again "
                "(tpr) or give a threshold for that mode")
        support = self.support_set() if threshold is not None else None  # may refuse: before
        old_mode = self.normalizer.per_image
        params = self.__dict__.setdefault("_params", {})
        old_param = params.get("per_image", old_mode)
        self.normalizer.per_image = per_image
        params["per_image"] = per_image  # the left-out copies are built from get_params
        self._raw = self._fixed_view = None
        try:
            if support is not None:
                self._calibrate_fitted(*support, float(rule["tpr"]))
        except BaseException:  # nothing changed when the new threshold cannot be had
            self.normalizer.per_image = old_mode
            params["per_image"] = old_param
            self._raw = self._fixed_view = None
            raise
        return self

    # ----------------------------------------------------------------- test-time statistics
    def set_test_mean(self, features) -> "ScoringPolicy":
        """Fix the statistics used to normalise test features, from many test features ``(N, D)``
        (e.g. a first batch of a stream); a ``(D,)`` mean is accepted when only centring.
        ``set_test_mean(None)`` goes back to the statistics of each scored batch.

        With ``refine > 0`` and test features ``(N, D)``, the refined test-domain prototypes are
        fixed here too (after :meth:`fit`), so that a stream is scored image by image against
        the same prototypes."""
        self.test_prototypes_ = None
        self._fixed_view = None
        self._fixed_loo = None  # left-out scores read with the fixed statistics
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
