"""Open-set domain generalisation (OSDG) with ReSeND as a plug-and-play module (paper, Table 4).

A closed-set domain-generalisation classifier keeps its class predictions on the known classes;
its confidence (the maximum softmax probability, MSP) is averaged with a novelty detector's
normality score (ReSeND, or a prototype baseline) and test samples whose fused score falls below
a threshold are rejected as unknown (:class:`~resend_novelty.osdg.fusion.OpenSetFusion`).

The classifier's closed-set accuracy (Acc) is unchanged by the fusion; AUROC (known = positive)
is computed on the fused score, the H-score on the open-set predictions at the threshold.
:func:`evaluate_osdg` scores one target from given probabilities and novelty scores;
:func:`run_osdg_benchmark` runs every target of a benchmark setting with the reference ERM
linear head (:func:`~resend_novelty.osdg.classifier.train_linear_classifier`); the threshold
comes from out-of-fold source scores
(:func:`~resend_novelty.osdg.classifier.crossfit_source_scores`) unless it is fixed.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ..detectors import UNKNOWN, fit_support
from ..evaluation import auroc as _auroc
from ..evaluation import closed_set_accuracy, get_setting, h_score, load_setting_lists, oscr
from .classifier import crossfit_source_scores, train_linear_classifier
from .fusion import OpenSetFusion
from .probabilities import msp, validate_probabilities, validate_scores

__all__ = ["open_set_metrics", "oscr_metrics", "evaluate_osdg", "run_osdg_benchmark",
           "format_osdg_table"]


def oscr_metrics(arrays: dict, labels, classes) -> dict:
    """OSCR of the classifier alone (its MSP) and of the fused score, from the ``arrays`` of
    :func:`evaluate_osdg`: ``{"msp": oscr, "fused": oscr}`` (None where undefined)."""
    labels = np.asarray(labels)
    is_known = np.isin(labels, np.asarray(classes))
    correct = np.asarray(arrays["closed_prediction"]) == labels
    out = {}
    for row in ("msp", "fused"):
        o = oscr(arrays[row], correct, is_known)
        out[row] = None if math.isnan(o) else o
    return out


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
    novelty = validate_scores(test_novelty, "test novelty scores", len(test_labels))
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
        m, arrays = evaluate_osdg(probs, nov, q_lab, classes, src_probs, src_nov, weights,
                                  normalize, threshold, accept)
        for row, value in oscr_metrics(arrays, q_lab, classes).items():
            m[row]["oscr"] = value
        m["n_support"] = len(support)
        results[t.name] = m
    avg: dict = {}
    for row in ("msp", "fused"):
        avg[row] = {}
        for key in ("auroc", "acc", "h_score", "oscr"):
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
        f"| target | Acc | AUROC MSP | H-score MSP | OSCR MSP | AUROC MSP+{method} "
        f"| H-score MSP+{method} | OSCR MSP+{method} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in [*result["targets"].items(), ("avg", result["avg"])]:
        rows.append(
            f"| {name} | {f(r['msp']['acc'])} | {f(r['msp']['auroc'])} | {f(r['msp']['h_score'])} "
            f"| {f(r['msp'].get('oscr'))} | {f(r['fused']['auroc'])} | {f(r['fused']['h_score'])} "
            f"| {f(r['fused'].get('oscr'))} |"
        )
    return "\n".join(rows)
