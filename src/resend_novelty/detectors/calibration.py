"""Threshold calibration of prototype detectors without unknown samples: support leave-one-out,
scored as the test images will be.

A threshold keeps its promise ("accept a fraction ``tpr`` of the known images") only if the
support scores it is read from are distributed like the scores of new images of the known
classes. So each support image is scored as a *new* image: by a copy of the detector fitted on
the support without it (its class prototype, its neighbours, the normalisation statistics and
the raw view all recomputed without it), in the scoring policy that will be used
(:func:`policy_loo_scores`):

- **per image**: the copy scores the left-out image per image (support statistics, the raw
  weight mixed in), as a test image is scored;
- **transductive**: the left-out image is normalised as a test image of its batch would be:
  with the statistics pooled over the support and the test batch when the shift gate pools
  that batch (:meth:`~resend_novelty.detectors.PrototypeDetector.threshold_for_features`
  recomputes the threshold for it), else with the support's own statistics.

The threshold is the ``ceil(tpr * m)``-th largest of the ``m`` left-out scores. Images of
classes with a single support image cannot be left out (their class would have no prototype):
they are skipped with a warning naming the class. Large supports are subsampled
(``max_images`` left-out images, stratified, seeded) and left out in at most ``max_refits``
groups that take at most one image of a class where they can (a group's images are scored by
one copy); a support of at most ``max_refits`` eligible images is left out one image at a time.

The earlier rule, kept as :meth:`LeaveOneOutCalibration.loo_scores_features`, recomputed only the
own class prototype and kept the normalisation statistics of the full support: in the
per-image policy every support image then sits inside the statistics it is standardised with,
and thresholds came out too lenient on intra-domain data (BENCHMARKS.md, *Thresholds that keep
their promise*).
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..transforms import normalize
from .loo import leave_one_out_similarities

__all__ = ["LeaveOneOutCalibration", "NoLOOCalibrationMixin", "policy_loo_scores", "threshold_at_recall",
           "conformal_pvalues", "leave_class_out_rejection",
           "MAX_LOO_IMAGES", "MAX_REFITS", "RULE"]

MAX_LOO_IMAGES = 400
MAX_REFITS = 96
RULE = "support leave-one-out"


def threshold_at_recall(scores, tpr: float) -> float:
    """The ``ceil(tpr * m)``-th largest of the ``m`` scores: at least ``tpr`` of them are >= it."""
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    m = len(s)
    k = min(m, max(1, math.ceil(tpr * m - 1e-9)))
    return float(s[k - 1])


def conformal_pvalues(normality, reference) -> np.ndarray:
    """``(1 + #{reference <= s}) / (m + 1)`` for each normality ``s``: the conformal p-value of
    "this image is known" against ``m`` left-out known scores ``reference``, in (0, 1]."""
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    s = np.asarray(normality, dtype=np.float64)
    return (1.0 + np.searchsorted(ref, s, side="right")) / (len(ref) + 1.0)


def leave_class_out_rejection(detector, features, labels, tpr: float, *,
                              max_classes: int = 12, seed: int = 0) -> dict:
    """An estimate, from the support alone, of the share of unknown images the calibrated
    threshold rejects: each known class in turn (at most ``max_classes``, drawn seeded) plays
    the unknown class - a copy of ``detector`` is fitted on the other classes, calibrated at
    recall ``tpr`` by :func:`policy_loo_scores`, and scores the held-out class's images as new
    images. Returns ``{"estimated_unknown_rejected", "per_class", "n_classes"}``.

    An estimate, not a guarantee: real unknown classes may be closer to (fine-grained) or
    farther from the known ones than the known classes are to each other."""
    features = torch.as_tensor(features, dtype=torch.float32)
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) < 3:
        raise ValueError("a leave-class-out estimate needs at least 3 known classes (2 remain "
                         "known while the third plays the unknown)")
    rng = np.random.default_rng([seed, 5113])
    chosen = np.sort(rng.permutation(classes)[:max_classes])
    params = dict(detector.get_params(), progress=False, refine=0)
    per_class, rejected, total = {}, 0, 0
    names = dict(zip(np.asarray(detector.classes_).tolist(), detector.class_names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c in chosen:
            rest = labels != c
            if np.unique(labels[rest], return_counts=True)[1].max() < 2:
                continue  # no class left with an image to leave out
            reduced = type(detector)(**params).fit_features(features[rest], labels[rest])
            loo, _ = policy_loo_scores(reduced, features[rest], labels[rest])
            threshold = threshold_at_recall(loo, tpr)
            scorer = reduced  # per image: scores as calibrated; transductive: support statistics
            if not detector.per_image:
                scorer = type(detector)(**dict(params, per_image=True, raw_weight=0.0))
                scorer.fit_features(features[rest], labels[rest])
            s = np.asarray(scorer.score_features(features[~rest]))
            per_class[names.get(int(c), str(c))] = float((s < threshold).mean())
            rejected += int((s < threshold).sum())
            total += len(s)
    return {"estimated_unknown_rejected": rejected / max(total, 1), "per_class": per_class,
            "n_classes": len(per_class), "rule": "leave-class-out on the support"}


def _groups(index: np.ndarray, eligible: np.ndarray, max_images: int, max_refits: int,
            seed: int) -> list[np.ndarray]:
    """Left-out groups of support rows (module doc): a seeded, class-stratified sample of the
    ``eligible`` rows, dealt round-robin (sorted by class) into at most ``max_refits`` groups."""
    rng = np.random.default_rng([seed, 9173])
    rows = np.flatnonzero(eligible)
    if len(rows) > max_images:  # stratified: each class keeps its share, at least one image
        keep = []
        for c in np.unique(index[rows]):
            r = rng.permutation(rows[index[rows] == c])
            keep.append(r[:max(1, round(len(r) * max_images / len(rows)))])
        rows = np.concatenate(keep)
    rows = rows[np.lexsort((rng.random(len(rows)), index[rows]))]  # by class, random within
    n_groups = min(len(rows), max_refits)
    return [np.sort(rows[g::n_groups]) for g in range(n_groups)]


def policy_loo_scores(detector, features, labels, *, batch=None, domains=None, fixed=None,
                      max_images: int = MAX_LOO_IMAGES, max_refits: int = MAX_REFITS,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-out normality of support images, each scored by a copy of ``detector`` fitted
    without it, in the detector's scoring policy (module doc).

    ``features`` / ``labels``: the unnormalised support features and labels; ``domains``: the
    source domain of each row of a multi-source support (each copy is fitted with them).
    ``fixed``: ``(mean, std)`` pooled test statistics fixed by ``set_test_mean`` (a stream):
    the left-out images are normalised with them. ``batch``: the test features that will be
    scored together (transductive policy:
    where the shift gate pools them with the support, the left-out images are normalised with
    the pooled statistics). Returns ``(scores, rows)``: the scores and the support rows they
    belong to.
    """
    features = torch.as_tensor(features, dtype=torch.float32)
    labels = np.asarray(labels)
    index = np.searchsorted(detector.classes_, labels)
    eligible = np.bincount(index, minlength=len(detector.classes_))[index] >= 2
    params = dict(detector.get_params(), progress=False, refine=0)
    pooled = False
    if detector.per_image:
        pass  # the copy scores as the detector does: per image, raw weight mixed in
    elif fixed is not None:
        pooled = True
    elif batch is not None and detector.normalizer.pooled(torch.as_tensor(batch)):
        pooled = True
    else:  # the support's own statistics, as a test image of the support's domain
        params.update(per_image=True, raw_weight=0.0)
    probe = type(detector)(**params)
    groups = _groups(index, eligible, max_images, max_refits, seed)
    scores, rows = [], []
    bar = tqdm(total=sum(len(g) for g in groups), desc="leave-one-out calibration",
               unit="img", disable=not getattr(detector, "progress", False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single-class / small-batch notes of the copies
        for g in groups:
            keep = np.ones(len(labels), dtype=bool)
            keep[g] = False
            if domains is None:
                probe.fit_features(features[keep], labels[keep])
            else:
                probe.fit_features(features[keep], labels[keep], domains=np.asarray(domains)[keep])
            if fixed is not None:
                n = probe.normalizer
                n.test_mean_, n.test_std_, n.test_pooled_ = fixed[0], fixed[1], True
                probe._fixed_view = None
            elif pooled:
                probe.set_test_mean(torch.as_tensor(batch, dtype=torch.float32))
            scores.append(np.asarray(probe.score_features(features[g]), dtype=np.float64))
            rows.append(g)
            bar.update(len(g))
    bar.close()
    return np.concatenate(scores), np.concatenate(rows)


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

    def calibrate_features(self, features, labels, tpr: float = 0.95,
                           class_names: Sequence[str] | None = None) -> "LeaveOneOutCalibration":
        """Fit on support features and set ``threshold_`` from their leave-one-out scores.

        ``threshold_`` is the ``ceil(tpr * m)``-th largest of the m LOO scores, so that at least
        ``tpr`` of the support images are accepted (recall of knowns >= ``tpr`` on the support
        set). Classes with a single image are skipped with a warning (error if none is left).
        Details in ``calibration_`` (tpr, n_images, skipped_classes, achieved_recall, the
        policy). ``class_names``: names of the sorted classes (warnings name them).
        """
        if not 0.0 < float(tpr) <= 1.0:
            raise ValueError(f"tpr must be in (0, 1], got {tpr}")
        self.fit_features(features, labels)
        if class_names is not None:
            self.class_names_ = list(class_names)
        return self._calibrate_fitted(features, labels, float(tpr))

    def _calibrate_fitted(self, features, labels, tpr: float,
                          domains=None) -> "LeaveOneOutCalibration":
        labels = np.asarray(labels)
        counts = dict(zip(self.classes_.tolist(), self.class_counts_.tolist()))
        names = dict(zip(self.classes_.tolist(), self.class_names))
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
        if domains is None:
            self._check_calibration_support()
        scores, _ = policy_loo_scores(self, features, labels, domains=domains)
        threshold = threshold_at_recall(scores, tpr)
        self.threshold_ = threshold
        self.calibration_ = {
            "rule": RULE,
            "tpr": tpr,
            "n_images": int(len(scores)),
            "skipped_classes": single,
            "achieved_recall": float((scores >= threshold).mean()),
            "policy": self.policy,
        }
        self.threshold_rule_ = {"source": RULE,
                                **{k: v for k, v in self.calibration_.items() if k != "rule"}}
        self.loo_scores_ = scores
        self._fixed_loo = None
        return self

    def _check_calibration_support(self) -> None:
        """The fitted support can be given back unnormalised only when it has one domain."""
        if self.normalizer.active and self.normalizer.support_direction_ is None:
            raise ValueError("this detector was fitted on a multi-source support (domains=): "
                             "its support cannot be re-calibrated from the fitted state; "
                             "calibrate it again with the support features and domains")

    def support_set(self) -> tuple[torch.Tensor, np.ndarray]:
        """The fitted support as it was given: unnormalised features and labels (needs one
        support domain when a domain normalisation is active)."""
        if not hasattr(self, "prototypes_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit() first")
        self._check_calibration_support()
        feats = self.support_features_
        if self.normalizer.active:
            feats = self.normalizer.support_features(feats)
        return feats, np.asarray(self.classes_)[np.asarray(self.support_index_)]

    def calibration_scores_features(self, features) -> np.ndarray | None:
        """The left-out support scores the decision on these test features rests on (see
        :meth:`_calibration_scores`); None without a leave-one-out calibration."""
        return self._calibration_scores(features)[0]

    def _calibration_scores(self, features) -> tuple[np.ndarray | None, bool]:
        """The left-out support scores the decision on these test features (scored together)
        is read from: ``loo_scores_``, or - for a leave-one-out threshold of the transductive
        policy on a batch that the shift gate pools with the support - the left-out support
        images normalised with the same pooled statistics as the batch
        (:func:`policy_loo_scores`). None without a leave-one-out calibration. (The private
        form also says whether the scores were read again for the batch.)"""
        rule = getattr(self, "threshold_rule_", None) or {}
        if rule.get("source") != RULE or getattr(self, "loo_scores_", None) is None:
            return None, False
        n = self.normalizer
        if n.test_mean_ is not None and n.test_pooled_ and not self.per_image:
            # fixed pooled statistics of a stream: read once with them, kept until they change
            if getattr(self, "_fixed_loo", None) is None:
                self._fixed_loo = policy_loo_scores(self, *self.support_set(),
                                                    fixed=(n.test_mean_, n.test_std_))[0]
            return self._fixed_loo, True
        if self.per_image or not n.active or n.test_mean_ is not None:
            return np.asarray(self.loo_scores_), False  # fixed per-domain statistics: support's
        x = self._checked_test(features)
        if not self.normalizer.pooled(x):
            return np.asarray(self.loo_scores_), False
        return policy_loo_scores(self, *self.support_set(), batch=x)[0], True

    def threshold_for_features(self, features) -> float:
        """The threshold for these test features scored together: ``threshold_``, or, where
        :meth:`calibration_scores_features` reads the left-out scores again for the batch, the
        same rule (recall ``tpr``) applied to them."""
        return self.threshold_and_scores_features(features)[0]

    def threshold_and_scores_features(self, features) -> tuple[float, np.ndarray | None]:
        """``(threshold_for_features, calibration_scores_features)`` from one pass."""
        threshold = self._threshold(None)
        scores, reread = self._calibration_scores(features)
        if reread:
            threshold = threshold_at_recall(scores, float(self.threshold_rule_["tpr"]))
        return threshold, scores

    def estimate_unknown_rejection(self, max_classes: int = 12, seed: int = 0) -> dict:
        """The share of unknown images the calibrated threshold is expected to reject,
        estimated on the fitted support by :func:`leave_class_out_rejection` (each known class
        in turn held out as the unknown one), at the calibration's recall. Also stored in
        ``calibration_`` and ``threshold_rule_``."""
        rule = getattr(self, "threshold_rule_", None) or {}
        tpr = float(rule.get("tpr", 0.95))
        est = leave_class_out_rejection(self, *self.support_set(), tpr, max_classes=max_classes,
                                        seed=seed)
        if rule:
            rule["unknown_rejection_estimate"] = est
        if getattr(self, "calibration_", None) is not None:
            self.calibration_["unknown_rejection_estimate"] = est
        return est

    def known_pvalues_features(self, features) -> np.ndarray:
        """Normality calibrated to [0, 1]: for each test feature, the conformal p-value
        ``(1 + #{left-out known scores <= s}) / (m + 1)`` - the share of known images expected
        to score no higher. A known image's p-value is about uniform; the threshold for recall
        ``tpr`` sits near p = 1 - tpr. Needs a leave-one-out calibration."""
        scores = self.calibration_scores_features(features)
        if scores is None:
            raise ValueError("p-values need a leave-one-out calibration: call calibrate(...) "
                             "(a given threshold has no support scores)")
        return conformal_pvalues(self.score_features(features), scores)

    def calibrate(self, support, labels: Sequence[int] | None = None, tpr: float = 0.95):
        """Fit on ``support`` (as :meth:`fit`) and set ``threshold_`` from leave-one-out scores.

        After this, ``predict(x)`` needs no threshold. See :meth:`calibrate_features`.
        """
        if not 0.0 < float(tpr) <= 1.0:
            raise ValueError(f"tpr must be in (0, 1], got {tpr}")
        feats, labels = self._fit_input(support, labels)
        return self._calibrate_fitted(feats, labels, float(tpr))


class NoLOOCalibrationMixin:
    """Mixin for detectors whose normality is not a function of the class similarities u
    (``ft-*``, ``gram``): leave-one-out calibration (defined for the prototype methods) is
    refused with a clear error."""

    def calibrate(self, *args, **kwargs):
        raise ValueError(
            f"leave-one-out threshold calibration is not available for method {self.name!r} "
            "(defined for the prototype methods resend/cosine/euclidean/knn/mahalanobis); "
            "pass an explicit threshold"
        )

    calibrate_features = calibrate
