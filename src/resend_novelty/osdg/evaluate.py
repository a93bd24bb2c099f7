"""Open-set domain generalisation (OSDG) with ReSeND as a plug-and-play module (paper, Table 4).

A closed-set domain-generalisation classifier keeps its class predictions on the known classes;
its confidence (the maximum softmax probability, MSP) is averaged with a novelty detector's
normality score (ReSeND, or a prototype baseline) and test samples whose fused score falls below
a threshold are rejected as unknown::

    fused = (w_msp * MSP + w_nov * normality) / (w_msp + w_nov)       # paper: w_msp = w_nov
    prediction = argmax class of the classifier   if fused >= threshold
                 UNKNOWN (-1)                     otherwise

The classifier's closed-set accuracy (Acc) is unchanged by the fusion; AUROC (known = positive)
is computed on the fused score, the H-score on the open-set predictions at the threshold.

**Threshold rule** (default): the threshold is chosen on the *source* (support) data only, with
no test label: it is the largest value that accepts ``accept`` = 95% of the known source samples.
Source scores are *out-of-fold* (``crossfit_source_scores``): the classifier and the detector
are refitted on k-1 folds of the support set and score the held-out fold, so that the threshold
is not set on the overconfident scores of the classifier's own training samples. A fixed
``threshold`` can be given instead (on the fused scale, after normalisation).

**Normalisation**: ``normalize="none"`` averages raw scores (the paper's rule for ReSeND, whose
normality max-softmax lies in [1/K, 1] like the MSP). Scores on another scale (cosine in [-1, 1],
minus a Euclidean distance) can be standardised first with statistics of the out-of-fold
*source* scores: ``"zscore"`` ((s - mean) / std) or ``"minmax"`` ((s - min) / (max - min)).

Class probabilities are ``(N, K)`` with one column per known class, in the sorted order of the
known labels (``np.unique`` of the support labels); see :func:`validate_probabilities`.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.images import DataError, load_image
from ..detectors.base import fit_support
from ..evaluation.metrics import auroc as _auroc
from ..evaluation.metrics import closed_set_accuracy, h_score

__all__ = [
    "default_normalization",
    "UNKNOWN",
    "NORMALIZATIONS",
    "validate_probabilities",
    "load_probabilities",
    "save_probabilities",
    "classifier_probabilities",
    "msp",
    "LinearClassifier",
    "train_linear_classifier",
    "crossfit_source_scores",
    "source_threshold",
    "OpenSetFusion",
    "open_set_metrics",
    "evaluate_osdg",
    "run_osdg_benchmark",
    "format_osdg_table",
]

UNKNOWN = -1
NORMALIZATIONS = ("none", "zscore", "minmax")


# --------------------------------------------------------------------------- probabilities
def default_normalization(method: str, model=None) -> str:
    """``normalize="auto"``: "none" (the paper's plain mean) for a ReSeND detector whose normality
    is max(softmax(u)) - it lies in [1/K, 1] like the MSP - and "zscore" for every other score
    (cosine, distances, max-logit: other scales). ``model``: a RelationalModule, a checkpoint
    path, or None for the shipped checkpoint."""
    if method != "resend":
        return "zscore"
    from ..models.checkpoint import load_checkpoint
    from ..models.relational import RelationalModule

    m = model if isinstance(model, RelationalModule) else load_checkpoint(model)
    return "none" if getattr(m.config, "normality", "softmax") == "softmax" else "zscore"


def validate_probabilities(
    probs,
    n_samples: int | None = None,
    n_classes: int | None = None,
    atol: float = 1e-3,
    what: str = "probabilities",
    paths: Sequence[str] | None = None,
) -> np.ndarray:
    """Check class probabilities up front; returns them as a float64 ``(N, K)`` array.

    Raises ``ValueError`` (naming ``what`` and the first offending row, 1-based, and its image
    where ``paths`` is given) for: not 2-D, a row count other than ``n_samples`` (the test
    list), a column count other than ``n_classes`` (the known classes), NaN/inf, negative
    values, rows not summing to 1 within ``atol`` (logits instead of probabilities?).
    """
    arr = np.asarray(probs)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{what}: expected a numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if arr.ndim != 2:
        raise ValueError(
            f"{what}: expected a 2-D array (N images, K known classes), got shape {arr.shape}"
        )

    def row(i: int) -> str:
        s = f"row {i + 1}"
        if paths is not None and i < len(paths):
            s += f" ({paths[i]})"
        return s

    if n_samples is not None and arr.shape[0] != n_samples:
        raise ValueError(
            f"{what}: {arr.shape[0]} rows but the test list has {n_samples} images "
            "(one row per test image, in the list order)"
        )
    if n_classes is not None and arr.shape[1] != n_classes:
        raise ValueError(
            f"{what}: {arr.shape[1]} columns but there are {n_classes} known classes (the labels "
            "of the support list); one column per known class, in sorted label order"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what}: empty array of shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(f"{what}: {int(bad.sum())} NaN/inf value(s), first at {row(i)}, column {j + 1}")
    if (arr < 0).any():
        i, j = np.argwhere(arr < 0)[0]
        raise ValueError(
            f"{what}: negative value {arr[i, j]:.4g} at {row(i)}, column {j + 1} "
            "(probabilities must be >= 0; are these logits? apply softmax first)"
        )
    sums = arr.sum(axis=1)
    off = np.abs(sums - 1.0) > atol
    if off.any():
        i = int(np.argmax(off))
        raise ValueError(
            f"{what}: {int(off.sum())} row(s) do not sum to 1 (tolerance {atol}), first {row(i)} "
            f"sums to {sums[i]:.6g} (are these logits or scores? apply softmax first)"
        )
    return arr


def load_probabilities(
    path: str | os.PathLike,
    n_samples: int | None = None,
    n_classes: int | None = None,
    atol: float = 1e-3,
    paths: Sequence[str] | None = None,
) -> np.ndarray:
    """Read class probabilities from ``.npy`` (2-D array) or ``.csv`` (one row per image).

    A CSV holds K numeric columns (one per known class in sorted label order), comma-separated,
    in the order of the test list; a first line with non-numeric cells is taken as a header.
    The result is checked with :func:`validate_probabilities`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"probability file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(f"cannot read {path} as a .npy array: {exc}") from None
    elif suffix == ".csv":
        rows: list[list[float]] = []
        with open(path, newline="", encoding="utf-8") as fh:
            for lineno, cells in enumerate(csv.reader(fh), start=1):
                cells = [c.strip() for c in cells]
                if not cells or all(c == "" for c in cells):
                    continue
                try:
                    rows.append([float(c) for c in cells])
                except ValueError:
                    if lineno == 1:  # header
                        continue
                    raise DataError(f"{path}:{lineno}: non-numeric value in {cells!r}") from None
                if rows and len(rows[-1]) != len(rows[0]):
                    raise DataError(
                        f"{path}:{lineno}: {len(rows[-1])} columns, previous rows have {len(rows[0])}"
                    )
        if not rows:
            raise DataError(f"{path} holds no probability rows")
        arr = np.array(rows, dtype=np.float64)
    else:
        raise DataError(f"{path}: unsupported probability file type {suffix!r}; use .csv or .npy")
    return validate_probabilities(arr, n_samples, n_classes, atol, what=str(path), paths=paths)


def save_probabilities(path: str | os.PathLike, probs, classes: Sequence | None = None) -> None:
    """Write probabilities as ``.npy`` or ``.csv`` (header ``class_<label>`` per column)."""
    path = Path(path)
    probs = np.asarray(probs, dtype=np.float64)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".npy":
        np.save(path, probs)
        return
    if classes is None:
        classes = range(probs.shape[1])
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow([f"class_{c}" for c in classes])
        for r in probs:
            w.writerow([f"{v:.8g}" for v in r])


@torch.inference_mode()
def classifier_probabilities(
    module: nn.Module,
    inputs,
    outputs: str = "logits",
    transform: Callable | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Class probabilities of a PyTorch classifier, ``(N, K)`` float64.

    ``inputs`` is a tensor/array batch (features for a head on a frozen backbone, or
    preprocessed images) or a list of image paths, loaded as RGB and passed through
    ``transform`` (default: ``module.transform`` where the module has one). ``outputs`` says what
    the module returns: ``"logits"`` (softmax applied here) or ``"probs"``.
    """
    if outputs not in ("logits", "probs"):
        raise ValueError(f"outputs must be 'logits' or 'probs', got {outputs!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    was_training = module.training
    module = module.to(device).eval()
    if isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], (str, os.PathLike)):
        transform = transform or getattr(module, "transform", None)
        if transform is None:
            raise ValueError("image paths need a transform (pass transform= or give the module one)")

        def batches():
            for i in range(0, len(inputs), batch_size):
                yield torch.stack([transform(load_image(p)) for p in inputs[i : i + batch_size]])
    else:
        x = torch.as_tensor(np.asarray(inputs) if not isinstance(inputs, torch.Tensor) else inputs)
        x = x.float()

        def batches():
            for i in range(0, len(x), batch_size):
                yield x[i : i + batch_size]

    out = []
    for xb in batches():
        y = module(xb.to(device)).float()
        out.append((torch.softmax(y, dim=1) if outputs == "logits" else y).cpu())
    if was_training:
        module.train()
    if not out:
        raise ValueError("no inputs given")
    probs = torch.cat(out).double().numpy()
    return validate_probabilities(probs, what=f"{type(module).__name__} outputs")


def msp(probs) -> np.ndarray:
    """Maximum softmax probability of each row."""
    return np.asarray(probs, dtype=np.float64).max(axis=1)


# --------------------------------------------------------------------------- reference classifier
class LinearClassifier(nn.Module):
    """Linear head on standardised frozen features; ``forward`` returns logits.

    ``classes_`` maps output columns to labels (sorted known labels).
    """

    def __init__(self, in_dim: int, classes, mean=None, std=None):
        super().__init__()
        self.classes_ = np.asarray(classes)
        self.register_buffer("mean", torch.zeros(in_dim) if mean is None else torch.as_tensor(mean).float())
        self.register_buffer("std", torch.ones(in_dim) if std is None else torch.as_tensor(std).float())
        self.linear = nn.Linear(in_dim, len(self.classes_))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.mean) / self.std)

    def predict_proba(self, features) -> np.ndarray:
        return classifier_probabilities(self, features, outputs="logits")

    def predict(self, features) -> np.ndarray:
        return self.classes_[self.predict_proba(features).argmax(axis=1)]


def train_linear_classifier(
    features,
    labels,
    seed: int = 0,
    weight_decay: float = 1e-2,
    max_iter: int = 100,
    classes: Sequence[int] | None = None,
) -> LinearClassifier:
    """ERM linear head (multinomial logistic regression) on frozen backbone features.

    Features are standardised with their mean/std, then the head is fitted full-batch with
    L-BFGS on ``mean cross-entropy + weight_decay/2 * ||W||^2`` (a convex problem; ``seed``
    fixes the initialisation, so the result is reproducible). ``classes`` sets the output
    columns (default: the sorted labels present); CPU, a second or two for a few thousand
    samples.
    """
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    y_lab = np.asarray(labels)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got {tuple(x.shape)}")
    if y_lab.shape != (x.shape[0],):
        raise ValueError(f"{x.shape[0]} features but {y_lab.shape} labels")
    if not torch.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
    classes = np.unique(y_lab) if classes is None else np.asarray(classes)
    if not np.isin(y_lab, classes).all():
        raise ValueError("some labels are not in classes")
    if len(classes) < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {classes.tolist()}")
    y = torch.as_tensor(np.searchsorted(classes, y_lab))
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6)
    gen = torch.Generator().manual_seed(seed)
    model = LinearClassifier(x.shape[1], classes, mean, std)
    with torch.no_grad():
        model.linear.weight.copy_(torch.randn(model.linear.weight.shape, generator=gen) * 0.01)
        model.linear.bias.zero_()
    xs = (x - mean) / std
    opt = torch.optim.LBFGS(
        model.linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
        tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model.linear(xs), y)
        loss = loss + 0.5 * weight_decay * model.linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    model.eval()
    return model


def crossfit_source_scores(
    labels,
    classifier_features=None,
    detector_features=None,
    make_detector: Callable[[], object] | None = None,
    folds: int = 5,
    seed: int = 0,
    domains=None,
    **train_kwargs,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Out-of-fold source scores for the source-based threshold and normalisation statistics.

    The support set is split into ``folds`` stratified folds; for each fold, the linear
    classifier (on ``classifier_features``) and a fresh detector (``make_detector()`` fitted on
    ``detector_features``) are fitted on the other folds and score the held-out one. Returns
    ``(probs (N, K), novelty (N,))``; either is None when its features are not given.
    ``domains`` (one source-domain id per sample, multi-source): the detector is fitted with
    them and scores the held-out samples of each domain as one batch, so that detectors with
    per-domain normalisation see one domain at a time, as at test time.
    """
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    classes = np.unique(labels)
    n = len(labels)
    min_count = np.bincount(np.searchsorted(classes, labels)).min()
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    if min_count < folds:
        raise ValueError(
            f"the smallest known class has {min_count} support sample(s): cannot make {folds} "
            "stratified folds (lower --folds or pass a fixed --threshold)"
        )
    probs = np.zeros((n, len(classes))) if classifier_features is not None else None
    novelty = np.zeros(n) if detector_features is not None else None
    if detector_features is not None and make_detector is None:
        raise ValueError("detector_features need make_detector")
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for tr, te in skf.split(np.zeros(n), labels):
        if probs is not None:
            cf = np.asarray(classifier_features)
            clf = train_linear_classifier(cf[tr], labels[tr], seed=seed, classes=classes, **train_kwargs)
            probs[te] = clf.predict_proba(cf[te])
        if novelty is not None:
            df = torch.as_tensor(np.asarray(detector_features), dtype=torch.float32)
            det = make_detector()
            if domains is None:
                fit_support(det, df[tr], labels[tr])
                novelty[te] = det.score_features(df[te])
            else:
                dom = np.asarray(domains)
                fit_support(det, df[tr], labels[tr], dom[tr])
                for d in np.unique(dom[te]):  # one batch per domain, as at test time
                    rows = te[dom[te] == d]
                    novelty[rows] = det.score_features(df[rows])
    return probs, novelty


# --------------------------------------------------------------------------- fusion
def _as_scores(x, what: str, n: int | None = None) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D array of scores, got shape {arr.shape}")
    if n is not None and len(arr) != n:
        raise ValueError(f"{what}: {len(arr)} scores but {n} samples")
    if not np.isfinite(arr).all():
        i = int(np.argmax(~np.isfinite(arr)))
        raise ValueError(f"{what}: NaN/inf score at row {i + 1}")
    return arr


def source_threshold(source_scores, accept: float = 0.95) -> float:
    """Largest threshold that accepts (score >= threshold) at least ``accept`` of the source scores.

    With ``n`` sorted scores ``s``, it is ``s[n - ceil(accept * n)]``: e.g. 100 scores and
    ``accept=0.95`` give the 6th smallest score, so exactly 95 are accepted (more on ties).
    """
    s = np.sort(_as_scores(source_scores, "source scores"))
    if s.size == 0:
        raise ValueError("no source scores")
    if not 0.0 < accept <= 1.0:
        raise ValueError(f"accept must be in (0, 1], got {accept}")
    k = int(math.ceil(accept * s.size - 1e-9))
    return float(s[s.size - max(k, 1)])


class OpenSetFusion:
    """Fuse a classifier's MSP with a novelty score; threshold and predict open-set labels.

    ``weights = (w_msp, w_novelty)`` (non-negative, normalised to sum 1; paper: equal).
    ``(1, 0)`` is the classifier alone (MSP baseline). ``normalize``: ``"none"`` (raw scores,
    paper rule for ReSeND), ``"zscore"`` or ``"minmax"`` (statistics of the source scores given
    to :meth:`fit`). ``threshold``: a fixed value on the fused scale, or None to set it in
    :meth:`fit` so that ``accept`` of the source samples are accepted.
    """

    def __init__(self, weights=(0.5, 0.5), normalize: str = "none",
                 threshold: float | None = None, accept: float = 0.95):
        w = np.asarray(weights, dtype=np.float64).ravel()
        if w.shape != (2,) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be two non-negative numbers, not both 0; got {weights}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if not 0.0 < accept <= 1.0:
            raise ValueError(f"accept must be in (0, 1], got {accept}")
        if threshold is not None and not math.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold}")
        self.weights = w / w.sum()
        self.normalize = normalize
        self.accept = accept
        self.fixed_threshold = threshold
        self.stats_: tuple | None = None
        self.threshold_: float | None = threshold

    # -- normalisation
    @staticmethod
    def _stats(s: np.ndarray, how: str) -> tuple[float, float]:
        if how == "zscore":
            center, scale = float(s.mean()), float(s.std())
        else:  # minmax
            center, scale = float(s.min()), float(s.max() - s.min())
        return center, (scale if scale > 1e-12 else 1.0)

    def fit(self, source_msp=None, source_novelty=None) -> "OpenSetFusion":
        """Normalisation statistics and (without a fixed threshold) the threshold, from source scores."""
        need_msp = self.weights[0] > 0
        need_nov = self.weights[1] > 0
        if self.normalize != "none" or self.fixed_threshold is None:
            for name, s, need in (("source_msp", source_msp, need_msp),
                                  ("source_novelty", source_novelty, need_nov)):
                if need and s is None:
                    raise ValueError(
                        f"{name} is needed to set the threshold/normalisation from source data "
                        "(or use a fixed threshold and normalize='none')"
                    )
        m = _as_scores(source_msp, "source MSP") if source_msp is not None else None
        v = _as_scores(source_novelty, "source novelty") if source_novelty is not None else None
        if m is not None and v is not None and len(m) != len(v):
            raise ValueError(f"source MSP ({len(m)}) and source novelty ({len(v)}) differ in length")
        if self.normalize != "none":
            self.stats_ = (
                self._stats(m, self.normalize) if need_msp else (0.0, 1.0),
                self._stats(v, self.normalize) if need_nov else (0.0, 1.0),
            )
        if self.fixed_threshold is None:
            n = len(m) if m is not None else len(v)
            src = self.fuse(m if m is not None else np.zeros(n), v if v is not None else np.zeros(n))
            self.threshold_ = source_threshold(src, self.accept)
            self.source_acceptance_ = float((src >= self.threshold_).mean())
        return self

    def fuse(self, msp_scores, novelty) -> np.ndarray:
        """Weighted mean of the (normalised) MSP and novelty scores; higher = more likely known."""
        m = _as_scores(msp_scores, "MSP")
        v = _as_scores(novelty, "novelty scores", len(m))
        if self.normalize != "none":
            if self.stats_ is None:
                raise RuntimeError("normalize needs source statistics: call fit() first")
            (cm, sm), (cv, sv) = self.stats_
            m, v = (m - cm) / sm, (v - cv) / sv
        return self.weights[0] * m + self.weights[1] * v

    def score(self, probs, novelty) -> np.ndarray:
        """Fused normality of test samples from class probabilities and novelty scores."""
        probs = validate_probabilities(probs)
        return self.fuse(msp(probs), novelty)

    def predict(self, probs, novelty, classes=None) -> np.ndarray:
        """Classifier's argmax class (``classes[j]``), or ``UNKNOWN`` below the threshold."""
        if self.threshold_ is None:
            raise RuntimeError("no threshold: call fit() with source scores or pass threshold=")
        probs = validate_probabilities(probs, n_classes=None if classes is None else len(classes))
        fused = self.fuse(msp(probs), novelty)
        cls = np.arange(probs.shape[1]) if classes is None else np.asarray(classes)
        return np.where(fused >= self.threshold_, cls[probs.argmax(axis=1)], UNKNOWN)


def open_set_metrics(fused, predictions, closed_predictions, labels, classes) -> dict:
    """AUROC (fused score, known = positive), Acc (closed-set, known samples), H-score and parts."""
    labels = np.asarray(labels)
    is_known = np.isin(labels, np.asarray(classes))
    predictions = np.asarray(predictions)
    out = {"n_known": int(is_known.sum()), "n_unknown": int((~is_known).sum())}
    a = _auroc(fused, is_known)
    acc = closed_set_accuracy(closed_predictions, labels, is_known)
    h = h_score(predictions, labels, is_known, UNKNOWN)
    out["auroc"] = None if math.isnan(a) else a
    out["acc"] = None if math.isnan(acc) else acc
    out["h_score"] = None if math.isnan(h) else h
    out["known_acc"] = float((predictions[is_known] == labels[is_known]).mean()) if is_known.any() else None
    out["unknown_acc"] = (
        float((predictions[~is_known] == UNKNOWN).mean()) if (~is_known).any() else None
    )
    out["rejected"] = float((predictions == UNKNOWN).mean())
    return out


# --------------------------------------------------------------------------- evaluation
def evaluate_osdg(
    test_probs,
    test_novelty,
    test_labels,
    classes,
    source_probs=None,
    source_novelty=None,
    weights=(0.5, 0.5),
    normalize: str = "none",
    threshold: float | None = None,
    accept: float = 0.95,
) -> tuple[dict, dict]:
    """The classifier alone (``"msp"``) and fused with the novelty score (``"fused"``) on one target.

    ``classes`` are the known labels (sorted; one probability column each). Without a fixed
    ``threshold``, ``source_probs``/``source_novelty`` (out-of-fold source scores, see
    :func:`crossfit_source_scores`) set it at ``accept`` of the source; the MSP row always uses
    raw MSP (``normalize`` applies to the fused row; a fixed threshold applies to both rows).
    Returns ``(metrics, arrays)``: metrics ``{"msp": {...}, "fused": {...}}`` (JSON-ready: auroc,
    acc, h_score, known_acc, unknown_acc, rejected, threshold, ...) and arrays ``{"msp", "novelty",
    "fused", "closed_prediction", "prediction", "msp_prediction"}`` per test sample.
    """
    classes = np.asarray(classes)
    test_labels = np.asarray(test_labels)
    probs = validate_probabilities(test_probs, len(test_labels), len(classes), what="test probabilities")
    novelty = _as_scores(test_novelty, "test novelty scores", len(test_labels))
    src_msp = None
    if source_probs is not None:
        src_msp = msp(validate_probabilities(source_probs, n_classes=len(classes), what="source probabilities"))
    closed = classes[probs.argmax(axis=1)]
    metrics, arrays = {}, {"msp": msp(probs), "novelty": novelty, "closed_prediction": closed}
    for name, w, norm in (("msp", (1.0, 0.0), "none"), ("fused", weights, normalize)):
        fusion = OpenSetFusion(w, norm, threshold, accept).fit(src_msp, source_novelty)
        fused = fusion.score(probs, novelty)
        pred = fusion.predict(probs, novelty, classes)
        m = open_set_metrics(fused, pred, closed, test_labels, classes)
        m["threshold"] = fusion.threshold_
        m["threshold_rule"] = (
            "fixed" if threshold is not None else f"accept {accept:.0%} of source (out-of-fold)"
        )
        m["weights"] = fusion.weights.tolist()
        m["normalize"] = norm
        metrics[name] = m
        if name == "fused":
            arrays["fused"], arrays["prediction"] = fused, pred
        else:
            arrays["msp_prediction"] = pred
    nov_auroc = _auroc(novelty, np.isin(test_labels, classes))
    metrics["novelty_auroc"] = None if math.isnan(nov_auroc) else nov_auroc
    return metrics, arrays


def run_osdg_benchmark(
    setting,
    data_root,
    make_detector: Callable[[], object],
    detector_features_fn: Callable[[list[str]], torch.Tensor],
    classifier_features_fn: Callable[[list[str]], torch.Tensor] | None = None,
    weights=(0.5, 0.5),
    normalize: str = "none",
    threshold: float | None = None,
    accept: float = 0.95,
    folds: int = 5,
    seed: int = 0,
    progress: bool = True,
    classifier_cache: dict | None = None,
) -> dict:
    """OSDG on every target of a benchmark setting (e.g. ``pacs-multi``): ERM linear head + detector.

    For each target, the reference classifier (:func:`train_linear_classifier`, on
    ``classifier_features_fn`` features, default: the detector's) and the detector are fitted on
    the support (source) list only; the threshold comes from out-of-fold source scores unless
    ``threshold`` is fixed. Returns ``{"setting", "targets": {name: metrics}, "avg": {"msp":
    {...}, "fused": {...}}, "seconds"}`` with the metrics of :func:`evaluate_osdg`.
    ``classifier_cache`` (a dict, kept by the caller) reuses the classifier's test and
    out-of-fold source probabilities across calls with other detectors or fusion options.
    """
    import time

    from tqdm import tqdm

    from ..evaluation.settings import get_setting, load_setting_lists

    if isinstance(setting, str):
        setting = get_setting(setting)
    t0 = time.perf_counter()
    lists = load_setting_lists(setting, data_root)
    all_paths = sorted({r.path for s, q in lists.values() for r in (*s, *q)})
    index = {p: i for i, p in enumerate(all_paths)}
    det_feats = torch.as_tensor(detector_features_fn(all_paths), dtype=torch.float32)
    clf_feats = (
        det_feats if classifier_features_fn is None
        else torch.as_tensor(classifier_features_fn(all_paths), dtype=torch.float32)
    )
    results = {}
    for t in tqdm(setting.targets, desc=f"{setting.name} targets", disable=not progress):
        support, test = lists[t.name]
        s_idx = [index[r.path] for r in support]
        q_idx = [index[r.path] for r in test]
        s_lab = np.array([r.label for r in support])
        s_dom = setting.support_domains(support)
        q_lab = np.array([r.label for r in test])
        classes = np.unique(s_lab)
        need_source = threshold is None or normalize != "none"
        key = (setting.name, t.name, folds, seed, need_source)
        cached = classifier_cache.get(key) if classifier_cache is not None else None
        if cached is None:
            src_probs = None
            if need_source:
                src_probs, _ = crossfit_source_scores(s_lab, clf_feats[s_idx], folds=folds, seed=seed)
            clf = train_linear_classifier(clf_feats[s_idx], s_lab, seed=seed)
            cached = (clf.predict_proba(clf_feats[q_idx]), src_probs)
            if classifier_cache is not None:
                classifier_cache[key] = cached
        probs, src_probs = cached
        src_nov = None
        if need_source:
            _, src_nov = crossfit_source_scores(
                s_lab, None, det_feats[s_idx], make_detector, folds=folds, seed=seed,
                domains=s_dom,
            )
        det = make_detector()
        fit_support(det, det_feats[s_idx], s_lab, s_dom)  # domains: per-domain normalisation
        nov = det.score_features(det_feats[q_idx])
        m, _ = evaluate_osdg(probs, nov, q_lab, classes, src_probs, src_nov, weights, normalize,
                             threshold, accept)
        m["n_support"] = len(support)
        results[t.name] = m
    avg: dict = {}
    for row in ("msp", "fused"):
        avg[row] = {}
        for key in ("auroc", "acc", "h_score"):
            vals = [r[row][key] for r in results.values() if r[row][key] is not None]
            avg[row][key] = float(np.mean(vals)) if vals else None
    vals = [r["novelty_auroc"] for r in results.values() if r["novelty_auroc"] is not None]
    avg["novelty_auroc"] = float(np.mean(vals)) if vals else None
    return {
        "setting": setting.name,
        "targets": results,
        "avg": avg,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def format_osdg_table(result: dict, method: str) -> str:
    """Markdown table in the style of the paper's Table 4: classifier alone vs + novelty score."""
    f = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
    rows = [
        f"**{result['setting']}**: ERM linear head (Acc) alone (MSP) and fused with {method}",
        "",
        f"| target | Acc | AUROC MSP | H-score MSP | AUROC MSP+{method} | H-score MSP+{method} |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in [*result["targets"].items(), ("avg", result["avg"])]:
        rows.append(
            f"| {name} | {f(r['msp']['acc'])} | {f(r['msp']['auroc'])} | {f(r['msp']['h_score'])} "
            f"| {f(r['fused']['auroc'])} | {f(r['fused']['h_score'])} |"
        )
    return "\n".join(rows)
