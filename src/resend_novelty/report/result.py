"""Novelty detection on a practitioner's own folders: data -> scores -> report.

::

    from resend_novelty.detectors import build_detector
    from resend_novelty.report import score_folders, write_report

    det = build_detector("cosine")                      # or "resend" (model=...)
    result = score_folders(det, "support/", "new/", tpr=0.95)
    write_report(result, "out/")                         # scores.csv, summary.json, *.png

Folders:

- **support**: ``support/<class>/<image>`` (sub-folders of a class are searched too). Every class
  folder must hold an image; images lying directly in ``support/`` are an error (no class).
- **test**: any folder, searched recursively. The test images carry labels only if the folder is
  exactly class sub-folders (every image at ``test/<class>/<image>``); then test classes absent
  from the support set are the unknowns and metrics/ROC/per-class plots are produced.

Images: JPEG, PNG, WebP, BMP; grayscale, palette and RGBA images are converted to RGB. An
unreadable, truncated or empty file stops the run with an error naming it.

Threshold: ``threshold=T`` is used as given; otherwise it is calibrated on the support set alone
(the detector's ``calibrate_features``): the ``ceil(tpr*m)``-th
largest leave-one-out normality of the m support images, so that a fraction ``tpr`` of known
images is expected to be accepted.

Similarities (the per-class columns of the CSV) are the detector's ``u``: cosine similarity
(cosine), minus Euclidean distance (euclidean), relational logit (resend); the normality is
``max(u)`` (cosine, euclidean) or ``max(softmax(u))`` (resend).
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..evaluation import closed_set_accuracy, h_score, novelty_report
from ..data import DataError
from ..detectors.calibration import conformal_pvalues
from ..detectors.persistence import RUNTIME_PARAMS, package_version, state_sha256
from ..transforms import shift_gap
from .folders import check_disjoint, scan_support, scan_test

__all__ = ["UNKNOWN_NAME", "ScoreResult", "score_folders", "score_test_set", "csv_text"]

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_text(value) -> str:
    """A text cell safe to open in a spreadsheet: a leading ``= + - @``, tab or CR (a formula,
    e.g. ``=cmd|...``) is neutralised by a leading apostrophe (the OWASP rule)."""
    s = str(value)
    return "'" + s if s.startswith(_FORMULA_START) else s

UNKNOWN_NAME = "unknown"


@dataclass
class ScoreResult:
    """Scores of the test images against the support classes, plus the decision threshold."""

    paths: list[str]
    normality: np.ndarray  # (N,) higher = more likely a known class
    similarities: np.ndarray  # (N, K) u, columns in the order of class_names
    class_names: list[str]  # support classes
    threshold: float
    threshold_rule: dict
    method: str
    test_labels: list[str] | None = None  # class-folder name of each test image
    support_counts: dict = field(default_factory=dict)
    support: str = ""
    test: str = ""
    test_layout: str = ""
    scoring: dict = field(default_factory=dict)  # policy, statistics used, gate, provenance
    p_known: np.ndarray | None = None  # conformal p-values (leave-one-out thresholds only)

    @property
    def nearest(self) -> list[str]:
        return [self.class_names[i] for i in self.similarities.argmax(axis=1)]

    @property
    def flagged_unknown(self) -> np.ndarray:
        return self.normality < self.threshold

    @property
    def prediction(self) -> list[str]:
        return [UNKNOWN_NAME if f else c for f, c in zip(self.flagged_unknown, self.nearest)]

    @property
    def is_known(self) -> np.ndarray | None:
        """True where the test image's class folder is a support class (None without labels)."""
        if self.test_labels is None:
            return None
        known = set(self.class_names)
        return np.array([lab in known for lab in self.test_labels], dtype=bool)

    # ----------------------------------------------------------- metrics
    def metrics(self) -> dict | None:
        """Threshold-free and thresholded metrics when the test images carry labels."""
        if self.test_labels is None:
            return None
        is_known = self.is_known
        rep = novelty_report(self.normality, is_known)
        labels = np.array(self.test_labels, dtype=object)
        nearest = np.array(self.nearest, dtype=object)
        pred = np.array(self.prediction, dtype=object)
        flagged = self.flagged_unknown
        nan_none = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else v  # noqa: E731
        rep["closed_set_accuracy"] = nan_none(closed_set_accuracy(nearest, labels, is_known))
        rep["known_accepted"] = nan_none(
            float((~flagged[is_known]).mean()) if is_known.any() else math.nan
        )
        rep["unknown_rejected"] = nan_none(
            float(flagged[~is_known].mean()) if (~is_known).any() else math.nan
        )
        rep["h_score"] = nan_none(h_score(pred, labels, is_known, unknown_label=UNKNOWN_NAME))
        rep["per_class"] = {
            name: {
                "n": int((labels == name).sum()),
                "known": name in self.class_names,
                "flagged_unknown": float(flagged[labels == name].mean()),
            }
            for name in sorted(set(self.test_labels))
        }
        return rep

    def summary(self) -> dict:
        pred = self.prediction
        per_class = {c: int(sum(p == c for p in pred)) for c in self.class_names}
        out = {
            "method": self.method,
            "support": self.support,
            "test": self.test,
            "class_names": list(self.class_names),
            "support_counts": dict(self.support_counts),
            "counts": {
                "images": len(self.paths),
                "predicted_known": int(len(pred) - self.flagged_unknown.sum()),
                "predicted_unknown": int(self.flagged_unknown.sum()),
                "per_predicted_class": per_class,
            },
            "threshold": float(self.threshold),
            "threshold_rule": dict(self.threshold_rule),
            "scoring": dict(self.scoring),
            "test_layout": self.test_layout,
            "test_labels": self.test_labels is not None,
            "metrics": self.metrics(),
        }
        return out

    def write_csv(self, path: str | os.PathLike) -> None:
        """One row per test image: path, normality, nearest class, per-class u, prediction."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = ["path", "normality"] + (["p_known"] if self.p_known is not None else [])
        header += ["nearest_class"]
        header += [csv_text(f"sim_{c}") for c in self.class_names]
        header += ["prediction"]
        if self.test_labels is not None:
            header += ["label", "label_known"]
        is_known = self.is_known
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh)
                w.writerow(header)
                for i, (p, near, pr) in enumerate(zip(self.paths, self.nearest, self.prediction)):
                    row = [csv_text(p), f"{self.normality[i]:.6g}"]
                    if self.p_known is not None:
                        row.append(f"{self.p_known[i]:.4g}")
                    row.append(csv_text(near))
                    row += [f"{v:.6g}" for v in self.similarities[i]]
                    row += [csv_text(pr)]
                    if self.test_labels is not None:
                        row += [csv_text(self.test_labels[i]), int(is_known[i])]
                    w.writerow(row)
            os.replace(tmp, path)
        except UnicodeEncodeError as exc:
            raise DataError(f"a file or class name is not valid UTF-8: "
                            f"{exc.object[max(exc.start - 40, 0):exc.end + 40]!r}") from None
        finally:
            tmp.unlink(missing_ok=True)


def score_folders(
    detector,
    support: str | os.PathLike,
    test: str | os.PathLike,
    threshold: float | None = None,
    tpr: float = 0.95,
) -> ScoreResult:
    """Fit ``detector`` on the support folder, set the threshold, score every test image.

    ``threshold=None`` calibrates it on the support set (leave-one-out, target recall ``tpr``).
    A non-finite threshold, a test folder inside the support folder (or the reverse) and
    non-finite scores (a corrupt model) are errors, never a silent answer.
    """
    if threshold is not None and not math.isfinite(float(threshold)):
        raise ValueError(f"threshold must be a finite number, got {threshold}")
    if not 0.0 < float(tpr) <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    check_disjoint(support, test)
    paths, labels, class_names = scan_support(support)
    if len(class_names) < 2 and getattr(detector, "needs_two_classes", False):
        raise ValueError(
            f"the support folder {support} has a single class ({class_names[0]}): the "
            f"{detector.name} score max(softmax(u)) is then always 1 and cannot flag unknowns. "
            "Add reference classes, or use --method cosine"
        )
    if UNKNOWN_NAME in class_names:
        warnings.warn(
            f"a support class is named {UNKNOWN_NAME!r}: in the predictions it cannot be told "
            "apart from images flagged unknown", stacklevel=2,
        )
    test_set = scan_test(test)  # before the slow part: fail early on a bad test folder
    shared = set(map(os.path.realpath, paths)) & set(map(os.path.realpath, test_set.paths))
    if shared:
        raise DataError(f"{len(shared)} test image(s) are also support images (e.g. "
                        f"{sorted(shared)[0]}, reached through a link): a test image must not "
                        "be a reference")
    feats = detector.features(paths, desc="support features")[0]
    names = [class_names[int(c)] for c in np.unique(labels)]
    if threshold is None:
        detector.calibrate_features(feats, labels, tpr=tpr, class_names=names)
        rule = dict(detector.threshold_rule_)
    else:
        detector.fit_features(feats, labels)
        detector.threshold_ = float(threshold)
        rule = {"source": "given", "policy": getattr(detector, "policy", None)}
        detector.threshold_rule_ = rule
    detector.class_names_ = names
    return score_test_set(detector, test_set, rule, support=str(support), test=str(test))


def score_test_set(detector, test_set, threshold_rule: dict, support: str, test: str
                   ) -> ScoreResult:
    """Score the images of ``test_set`` (:func:`~resend_novelty.report.scan_test`) with a fitted
    detector and its ``threshold_``: the one scoring step of :func:`score_folders` and of a
    detector file (:func:`~resend_novelty.report.score_fitted`). Non-finite scores or threshold
    are errors."""
    feats = detector.features(test_set.paths, desc="test features")[0]
    normality, u = detector.score_similarities_features(feats)
    _check_finite(normality, test_set.paths, detector)
    threshold, reference = detector.threshold_and_scores_features(feats)
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise ValueError(f"the calibrated threshold is {threshold}: the support scores "
                         "are not finite (a corrupt model or features?)")
    threshold_rule = dict(threshold_rule)
    if threshold != float(detector.threshold_):
        threshold_rule["support_only_threshold"] = float(detector.threshold_)
        threshold_rule["read_on_batch"] = ("left-out support images normalised with the "
                                           "statistics pooled over support and this batch")
    return ScoreResult(
        paths=test_set.paths,
        normality=np.asarray(normality, dtype=np.float64),
        similarities=np.asarray(u.numpy(), dtype=np.float64),
        class_names=list(detector.class_names_),
        threshold=threshold,
        threshold_rule=threshold_rule,
        method=getattr(detector, "name", type(detector).__name__),
        test_labels=test_set.labels,
        support_counts=dict(zip(detector.class_names_,
                                (int(n) for n in detector.class_counts_))),
        support=support,
        test=test,
        test_layout=test_set.layout,
        scoring=scoring_record(detector, feats),
        p_known=None if reference is None else conformal_pvalues(normality, reference),
    )


def scoring_record(detector, features) -> dict:
    """How a batch of test features was scored: the detector's policy, which statistics
    normalised the batch and why (the shift gate's gap and decision), a one-line description,
    and the provenance (package version, relational checkpoint, detector file)."""
    rec = {"policy": dict(getattr(detector, "policy", {}) or {}),
           "package_version": package_version()}
    n = getattr(detector, "normalizer", None)
    size = int(features.shape[0])
    if n is None or not n.active:
        rec["statistics"] = "none"
        desc = "no domain normalisation: each image scored alone"
    elif n.per_image:
        rec["statistics"] = "support"
        desc = "per image (support statistics only"
        desc += (f"; raw weight {detector.raw_weight:g}: that share of the score from "
                 "unnormalised features)" if getattr(detector, "hedged", False) else ")")
    elif n.test_mean_ is not None:
        rec["statistics"] = "fixed pooled" if n.test_pooled_ else "fixed"
        desc = "transductive with fixed test statistics (set_test_mean)"
    elif size < max(2, n.min_batch):
        rec["statistics"] = "support"
        desc = (f"transductive asked, but a batch of {size} images (< {n.min_batch}) brings no "
                "statistics of its own: support statistics used, as per image without the raw "
                "weight")
    elif n.pooled(features):
        rec["statistics"] = "pooled"
        desc = ("transductive: support and test close (shift gate), normalised with the "
                f"statistics of both; threshold read again for this batch of {size}")
    else:
        rec["statistics"] = "test batch"
        desc = f"transductive (test statistics from the {size} images scored together)"
    if (n is not None and n.active and not n.per_image and n.shift_threshold > 0
            and n.support_direction_ is not None and size >= 1):
        gap = float(shift_gap(n.support_direction_, features))
        rec["shift_gap"] = gap
        rec["gate"] = "pooled" if rec["statistics"] == "pooled" else "per-domain statistics"
        desc += f"; shift gap {gap:.3f} vs gate {n.shift_threshold:g}"
    rec["description"] = desc
    rec["options"] = resolved_options(detector)
    model = getattr(detector, "model", None)
    if model is not None:
        rec["checkpoint_state_sha256"] = state_sha256(model)
    meta = getattr(detector, "metadata_", None)
    if meta:
        rec["detector_file"] = {"checkpoint": meta.get("checkpoint"),
                                "package_version": meta.get("package_version")}
    return rec


def resolved_options(detector) -> dict:
    """Each option that changes the scores: ``{name: {"value", "source"}}``, the value in force
    (a checkpoint default resolved) and where it came from: "detector file", "given" (a flag
    or argument), "checkpoint" (the relational checkpoint's default) or "default"."""
    if not hasattr(detector, "get_params"):
        return {}
    given = detector.__dict__.get("_params", {})
    from_file = getattr(detector, "metadata_", None) is not None
    aliases = {"center": "domain_norm"}  # parameter -> attribute holding its resolved value
    out = {}
    for name, value in detector.get_params().items():
        if name in RUNTIME_PARAMS:
            continue
        resolved = getattr(detector, aliases.get(name, name), value)
        if not isinstance(resolved, (bool, int, float, str, type(None))):
            resolved = value
        if from_file:
            source = "detector file"
        elif name in given and given[name] is not None:
            source = "given"
        elif value is None and resolved is not None:
            source = "checkpoint"
        else:
            source = "default"
        out[name] = {"value": resolved, "source": source}
    return out


def _check_finite(normality, paths, detector) -> None:
    bad = np.flatnonzero(~np.isfinite(np.asarray(normality, dtype=np.float64)))
    if bad.size:
        name = getattr(detector, "name", type(detector).__name__)
        raise ValueError(
            f"{bad.size} of {len(paths)} test images got a non-finite score from {name} (e.g. "
            f"{paths[int(bad[0])]}): the model or its features hold NaN/inf; nothing was written"
        )
