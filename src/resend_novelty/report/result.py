"""Novelty detection on a practitioner's own folders: data -> scores -> report.

::

    from resend_novelty.detectors.base import build_detector
    from resend_novelty.report.result import score_folders, write_report

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
(:meth:`~resend_novelty.detectors.base.PrototypeDetector.calibrate_features`): the ``ceil(tpr*m)``-th
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

from ..data.images import IMAGE_EXTENSIONS, DataError, scan_class_folders

__all__ = [
    "UNKNOWN_NAME",
    "TestImages",
    "ScoreResult",
    "scan_support",
    "scan_test",
    "score_folders",
    "write_report",
    "plot_histogram",
    "plot_roc",
    "plot_detection_rates",
]

UNKNOWN_NAME = "unknown"


# --------------------------------------------------------------------------- data
def _images_directly_in(folder: Path) -> list[Path]:
    return sorted(
        f for f in folder.iterdir()
        if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS
    )


def _walk_images(folder: Path) -> list[Path]:
    """Images under ``folder``, recursively, following symbolic links (each directory once)."""
    seen: set[str] = set()
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link loop, or the same directory linked twice
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(
            Path(dirpath) / f for f in filenames
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
        )
    return sorted(found)


def scan_support(folder: str | os.PathLike) -> tuple[list[str], np.ndarray, list[str]]:
    """``support/<class>/<image>`` -> (paths, integer labels, sorted class names)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"support folder not found: {folder}")
    loose = _images_directly_in(folder)
    if loose:
        raise DataError(
            f"the support folder {folder} must hold one sub-folder per class "
            f"({folder}/<class>/<image>), but {len(loose)} image(s) lie directly in it, "
            f"e.g. {loose[0]}"
        )
    records, classes = scan_class_folders(folder)  # error for an empty class folder
    return [r.path for r in records], np.array([r.label for r in records]), list(classes)


@dataclass
class TestImages:
    """Test images found under a folder; ``labels`` are class-folder names, or None."""

    paths: list[str]
    labels: list[str] | None
    root: str
    layout: str  # "class folders" | "flat" | "nested"


def scan_test(folder: str | os.PathLike) -> TestImages:
    """All images under ``folder`` (recursively, symlinks followed); labelled iff exactly
    ``test/<class>/<image>``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"test folder not found: {folder}")
    paths = _walk_images(folder)
    if not paths:
        raise DataError(f"the test folder {folder} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    depths = {len(p.relative_to(folder).parts) for p in paths}
    if depths == {2}:
        subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        used = {p.relative_to(folder).parts[0] for p in paths}
        empty = [d.name for d in subdirs if d.name not in used]
        if empty:
            warnings.warn(
                f"test class folder(s) with no image ignored: {', '.join(empty)}", stacklevel=2
            )
        labels = [p.relative_to(folder).parts[0] for p in paths]
        return TestImages([str(p) for p in paths], labels, str(folder), "class folders")
    layout = "flat" if depths == {1} else "nested"
    return TestImages([str(p) for p in paths], None, str(folder), layout)


# --------------------------------------------------------------------------- scores
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
        from ..evaluation.metrics import closed_set_accuracy, h_score, novelty_report

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
            "test_layout": self.test_layout,
            "test_labels": self.test_labels is not None,
            "metrics": self.metrics(),
        }
        return out

    def write_csv(self, path: str | os.PathLike) -> None:
        """One row per test image: path, normality, nearest class, per-class u, prediction."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = ["path", "normality", "nearest_class"]
        header += [f"sim_{c}" for c in self.class_names]
        header += ["prediction"]
        if self.test_labels is not None:
            header += ["label", "label_known"]
        is_known = self.is_known
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            for i, (p, near, pr) in enumerate(zip(self.paths, self.nearest, self.prediction)):
                row = [p, f"{self.normality[i]:.6g}", near]
                row += [f"{v:.6g}" for v in self.similarities[i]]
                row += [pr]
                if self.test_labels is not None:
                    row += [self.test_labels[i], int(is_known[i])]
                w.writerow(row)
        os.replace(tmp, path)


def score_folders(
    detector,
    support: str | os.PathLike,
    test: str | os.PathLike,
    threshold: float | None = None,
    tpr: float = 0.95,
) -> ScoreResult:
    """Fit ``detector`` on the support folder, set the threshold, score every test image.

    ``threshold=None`` calibrates it on the support set (leave-one-out, target recall ``tpr``).
    """
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
    feats = detector.features(paths, desc="support features")[0]
    if threshold is None:
        detector.calibrate_features(feats, labels, tpr=tpr)
        rule = {"source": "support leave-one-out",
                **{k: v for k, v in detector.calibration_.items() if k != "rule"}}
    else:
        detector.fit_features(feats, labels)
        detector.threshold_ = float(threshold)
        rule = {"source": "given"}
    detector.class_names_ = [class_names[int(c)] for c in detector.classes_]
    counts = dict(zip(detector.class_names_, (int(n) for n in detector.class_counts_)))
    test_feats = detector.features(test_set.paths, desc="test features")[0]
    u = detector.similarities_features(detector._check_fitted(test_feats))
    normality = detector.normality_from_similarities(u).numpy()
    return ScoreResult(
        paths=test_set.paths,
        normality=np.asarray(normality, dtype=np.float64),
        similarities=np.asarray(u.numpy(), dtype=np.float64),
        class_names=list(detector.class_names_),
        threshold=float(detector.threshold_),
        threshold_rule=rule,
        method=getattr(detector, "name", type(detector).__name__),
        test_labels=test_set.labels,
        support_counts=counts,
        support=str(support),
        test=str(test),
        test_layout=test_set.layout,
    )


# --------------------------------------------------------------------------- plots
def _figure(width=6.4, height=4.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)  # Agg canvas: no GUI, no pyplot global state
    return fig


def _threshold_label(result: ScoreResult) -> str:
    rule = result.threshold_rule
    if rule.get("source") == "given":
        how = "given"
    else:
        how = f"support LOO, recall {rule.get('tpr', 0):.0%}"
    return f"threshold {result.threshold:.4g} ({how})"


def plot_histogram(result: ScoreResult, path: str | os.PathLike) -> None:
    """Histogram of normality scores (known/unknown test classes apart when labelled)."""
    fig = _figure()
    ax = fig.add_subplot()
    s = result.normality
    lo, hi = float(min(s.min(), result.threshold)), float(max(s.max(), result.threshold))
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 41)
    is_known = result.is_known
    if is_known is None:
        ax.hist(s, bins=bins, color="tab:gray", alpha=0.85, label=f"test images ({len(s)})")
    else:
        if is_known.any():
            ax.hist(s[is_known], bins=bins, color="tab:blue", alpha=0.6,
                    label=f"known classes ({int(is_known.sum())})")
        if (~is_known).any():
            ax.hist(s[~is_known], bins=bins, color="tab:orange", alpha=0.6,
                    label=f"unknown classes ({int((~is_known).sum())})")
    ax.axvline(result.threshold, color="tab:red", linestyle="--", linewidth=1.5,
               label=_threshold_label(result))
    ax.set_xlabel("normality score (higher = more likely a known class)")
    ax.set_ylabel("images")
    ax.set_title(f"{result.method}: {int(result.flagged_unknown.sum())} of {len(s)} "
                 "images flagged unknown")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def plot_roc(result: ScoreResult, path: str | os.PathLike) -> bool:
    """ROC of knowns (positive) vs unknowns; False (nothing written) without both groups."""
    from sklearn.metrics import roc_curve

    from ..evaluation.metrics import auroc, fpr95

    is_known = result.is_known
    if is_known is None or is_known.all() or not is_known.any():
        return False
    fpr, tpr, _ = roc_curve(is_known, result.normality)
    a, f95 = auroc(result.normality, is_known), fpr95(result.normality, is_known)
    fig = _figure(5.2, 5.0)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, color="tab:blue", linewidth=2, label=f"AUROC {a:.4f}, FPR95 {f95:.4f}")
    ax.plot([0, 1], [0, 1], color="tab:gray", linestyle=":", linewidth=1)
    flagged = result.flagged_unknown
    op_tpr = float((~flagged[is_known]).mean())
    op_fpr = float((~flagged[~is_known]).mean())
    ax.plot([op_fpr], [op_tpr], "o", color="tab:red", label=_threshold_label(result))
    ax.set_xlabel("unknown images accepted as known (FPR)")
    ax.set_ylabel("known images accepted (TPR)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_title(f"{result.method}: known vs unknown test classes")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return True


def plot_detection_rates(result: ScoreResult, path: str | os.PathLike) -> bool:
    """Bar chart: fraction of each test class flagged unknown (False without labels)."""
    if result.test_labels is None:
        return False
    from matplotlib.patches import Patch

    labels = np.array(result.test_labels, dtype=object)
    flagged = result.flagged_unknown
    names = sorted(set(result.test_labels), key=lambda n: (n not in result.class_names, n))
    rates = [float(flagged[labels == n].mean()) for n in names]
    colors = ["tab:blue" if n in result.class_names else "tab:orange" for n in names]
    fig = _figure(max(5.0, 0.8 * len(names) + 2.0), 4.4)
    ax = fig.add_subplot()
    x = np.arange(len(names))
    ax.bar(x, rates, color=colors)
    for xi, r, n in zip(x, rates, names):
        ax.text(xi, r + 0.01, f"{r:.0%}\n(n={int((labels == n).sum())})", ha="center",
                va="bottom", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("fraction flagged unknown")
    ax.set_title(f"{result.method}: detection rate per test class")
    ax.legend(handles=[Patch(color="tab:blue", label="known class (want low)"),
                       Patch(color="tab:orange", label="unknown class (want high)")],
              fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    return True


# --------------------------------------------------------------------------- report
def write_report(result: ScoreResult, out_dir: str | os.PathLike, plots: bool = True) -> dict:
    """Write scores.csv, summary.json and the PNG plots to ``out_dir``; returns name -> path."""
    from ..cli.common import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"scores": str(out / "scores.csv"), "summary": str(out / "summary.json")}
    result.write_csv(files["scores"])
    if plots:
        files["histogram"] = str(out / "histogram.png")
        plot_histogram(result, files["histogram"])
        if plot_roc(result, out / "roc.png"):
            files["roc"] = str(out / "roc.png")
        if plot_detection_rates(result, out / "detection_rates.png"):
            files["detection_rates"] = str(out / "detection_rates.png")
    summary = result.summary()
    summary["files"] = {k: os.path.basename(v) for k, v in files.items()}
    write_json(files["summary"], summary)
    return files
