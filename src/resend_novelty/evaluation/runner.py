"""Evaluating a detector on a benchmark setting, and its table.

:func:`run_benchmark` (``resend benchmark``) reads and checks every list of a setting, computes
the features of each distinct image once, then fits a fresh detector per target. Its parts are
public for other evaluations of support/test lists: :func:`setting_paths` (the distinct images
of a setting, one feature row each) and :func:`evaluate_detector` (the metrics of one fitted
detector on one test set).
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable

import numpy as np

from ..data import ImageRecord
from ..detectors import fit_support
from .lists import load_setting_lists
from .metrics import closed_set_accuracy, novelty_report
from .settings import Setting, get_setting

__all__ = ["setting_paths", "evaluate_detector", "run_benchmark", "format_table"]


def setting_paths(lists: dict[str, tuple[list[ImageRecord], list[ImageRecord]]]
                  ) -> tuple[list[str], dict[str, int]]:
    """Every distinct image of a setting's lists (``{target: (support, test)}``, as
    :func:`~.lists.load_setting_lists` returns them), sorted, and the row of each in that order."""
    all_paths = sorted({r.path for s, q in lists.values() for r in (*s, *q)})
    return all_paths, {p: i for i, p in enumerate(all_paths)}


def evaluate_detector(det, features, labels: np.ndarray) -> dict:
    """Novelty metrics of a fitted detector on test ``features`` with their ``labels``.

    Known = labels among the detector's ``classes_``. Returns
    :func:`~.metrics.novelty_report` plus ``"closed_set_accuracy"`` of the nearest class on the
    known samples (None when undefined).
    """
    is_known = np.isin(labels, det.classes_)
    if hasattr(det, "score_and_nearest_features"):  # one similarity pass for both
        scores, pred = det.score_and_nearest_features(features)
    else:
        scores, pred = det.score_features(features), det.nearest_class_features(features)
    rep = novelty_report(scores, is_known)
    acc = closed_set_accuracy(pred, labels, is_known)
    rep["closed_set_accuracy"] = None if math.isnan(acc) else acc
    return rep


def run_benchmark(
    setting: Setting | str,
    data_root,
    make_detector: Callable[[], "object"],
    features_fn: Callable[[list[str]], "object"] | None = None,
    progress: bool = True,
    *,
    lists_dir: str | os.PathLike | None = None,
    max_per_class: int | None = None,
    check_images: bool = True,
) -> dict:
    """Evaluate a detector on every target of ``setting``.

    ``make_detector()`` returns a fresh detector; it is first called after every list and image
    has been checked (:func:`load_setting_lists`, which also explains ``lists_dir`` and
    ``max_per_class``). ``features_fn(paths)`` returns backbone features (default: the
    detector's own cached extractor); with it, ``check_images=False`` allows the images to be
    absent (e.g. features exported on another machine). Returns a JSON-ready dict
    ``{"setting", "targets": {name: metrics}, "avg": {"auroc", "fpr95"}, "seconds"}`` (plus
    ``"max_per_class"`` when set).
    """
    if isinstance(setting, str):
        setting = get_setting(setting)
    t0 = time.perf_counter()
    lists = load_setting_lists(setting, data_root, lists_dir=lists_dir, max_per_class=max_per_class,
                               check_images=check_images)
    all_paths, index = setting_paths(lists)
    det0 = make_detector()
    if features_fn is None:
        feats = det0.features(all_paths, desc=f"{setting.name} features")[0]
    else:
        feats = features_fn(all_paths)
    results = {}
    for t in setting.targets:
        support, test = lists[t.name]
        det = make_detector()
        s_idx = [index[r.path] for r in support]
        q_idx = [index[r.path] for r in test]
        # source domains (multi-source): used by detectors that normalise features per domain
        fit_support(det, feats[s_idx], np.array([r.label for r in support]),
                    setting.support_domains(support))
        rep = evaluate_detector(det, feats[q_idx], np.array([r.label for r in test]))
        rep["n_support"] = len(support)
        results[t.name] = rep
    avg = {}
    for key in ("auroc", "fpr95"):
        vals = [r[key] for r in results.values() if r[key] is not None]
        avg[key] = float(np.mean(vals)) if vals else None
    out = {
        "setting": setting.name,
        "targets": results,
        "avg": avg,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if max_per_class is not None:
        out["max_per_class"] = max_per_class
    return out


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def format_table(result: dict, method: str = "", paper: dict | None = None) -> str:
    """Markdown table: one row per target and the average (paper columns where known)."""
    head = "| target | AUROC | FPR95 |"
    sep = "|---|---|---|"
    if paper:
        head += " paper AUROC | paper FPR95 |"
        sep += "---|---|"
    rows = [f"**{result['setting']}** {method}".rstrip(), "", head, sep]
    for name, r in [*result["targets"].items(), ("avg", result["avg"])]:
        row = f"| {name} | {_fmt(r['auroc'])} | {_fmt(r['fpr95'])} |"
        if paper:
            p = paper.get(name)
            row += f" {_fmt(p[0]) if p else ''} | {_fmt(p[1]) if p else ''} |"
        rows.append(row)
    return "\n".join(rows)
