"""Scoring with a fitted detector: a test folder at once (:func:`score_fitted`), or a stream of
images as they arrive (:func:`watch`).

:func:`watch` polls a folder (or reads image paths, one per line, from a text stream such as
stdin), scores each new image on its own and appends one row per image to a CSV with the
columns of ``scores.csv`` (path, normality, nearest_class, sim_<class>..., prediction). Each row
is flushed as it is written, so an interruption (Ctrl-C) leaves a complete CSV; on restart the
paths already in the CSV are skipped (resumable). A file is scored once its size has stayed the
same over two polls (a file still being copied is left for the next poll); a file that failed
(e.g. a copy that stalled longer than two polls, read while partial) is tried again once its
size or modification time changes. A watched folder that disappears ends the watch with an
error (the CSV stays complete).

Per image: an image scored on its own cannot supply the statistics of its domain, so the domain
normalisation (``center=``) uses the test statistics fixed in the detector (``set_test_mean``)
or, failing those, the support statistics: the detector is then switched to the per-image
policy (``set_policy(True)``, with its ``raw_weight``; a leave-one-out threshold is calibrated
again for it), as ``resend score --per-image``: a watched image gets the prediction it gets in
a batch scored per image.
"""

from __future__ import annotations

import csv
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Iterable, TextIO


from ..data import IMAGE_EXTENSIONS, DataError
from .folders import scan_test
from ..detectors.calibration import RULE, conformal_pvalues
from .result import UNKNOWN_NAME, ScoreResult, csv_text, score_test_set

__all__ = ["score_fitted", "watch", "csv_header"]


def score_fitted(detector, test: str | os.PathLike) -> ScoreResult:
    """Score every image under ``test`` with a fitted detector (e.g. from
    :func:`~resend_novelty.detectors.load_detector`), with its threshold; the same scores as
    :func:`~resend_novelty.report.score_folders` on the support folder it was fitted on."""
    if getattr(detector, "threshold_", None) is None:
        raise ValueError("the detector has no threshold: fit it with a threshold (resend fit "
                         "--tpr R or --threshold T)")
    rule = dict(getattr(detector, "threshold_rule_", None) or {})
    rule.setdefault("source", "detector file")
    return score_test_set(detector, scan_test(test), rule, support="", test=str(test))


def csv_header(class_names, p_known: bool = False) -> list[str]:
    """The columns of ``scores.csv`` (``p_known``: with the conformal p-value column)."""
    return ["path", "normality", *(["p_known"] if p_known else []), "nearest_class",
            *[f"sim_{c}" for c in class_names], "prediction"]


def _already_scored(path: Path, header: list[str]) -> set[str]:
    """Paths in an existing CSV (checked to have ``header``); an empty set for a new file."""
    if not path.exists() or path.stat().st_size == 0:
        return set()
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows or rows[0] != header:
        raise ValueError(f"{path} exists with other columns than this detector's "
                         f"({', '.join(header[:4])}, ...): choose another output file")
    # a path written with the spreadsheet guard (csv_text) is read back without it
    return {r[0][1:] if r[0][:1] == "'" and r[0][1:2] in ("=", "+", "-", "@", "\t", "\r")
            else r[0] for r in rows[1:] if r}


def _signature(path: str) -> tuple:
    """``(size, mtime)`` of a file, or ``()`` when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return ()
    return (st.st_size, st.st_mtime_ns)


def _folder_images(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in filenames
                     if not f.startswith(".")
                     and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
    return sorted(found)


def _per_image_statistics(detector) -> None:
    """Score images one by one with the fixed test statistics or, failing those, in the
    per-image policy (module doc): ``set_policy`` re-calibrates a leave-one-out threshold for
    it, so the decision is the one ``resend score --per-image`` makes."""
    norm = getattr(detector, "normalizer", None)
    if norm is not None and norm.active and norm.test_mean_ is None and not norm.per_image:
        detector.set_policy(True)


def watch(detector, source: str | os.PathLike | TextIO, csv_path: str | os.PathLike, *,
          poll: float = 1.0, max_images: int | None = None, timeout: float | None = None,
          log: TextIO | None = None) -> dict:
    """Score images as they arrive and append them to ``csv_path`` (module doc).

    ``source``: a folder to poll every ``poll`` seconds, or a text stream of image paths (one
    per line; ends at end of input). Stops after ``max_images`` new images, after ``timeout``
    seconds, at the end of a text stream, or on Ctrl-C (KeyboardInterrupt, caught: the CSV stays
    complete). Unreadable images are reported on ``log`` (default stderr) and not written, so a
    restart tries them again. Returns counts: ``scored``, ``skipped`` (already in the CSV),
    ``failed``, ``flagged_unknown``, ``interrupted``.
    """
    if getattr(detector, "threshold_", None) is None:
        raise ValueError("the detector has no threshold: fit it with --tpr R or --threshold T")
    log = log or sys.stderr
    csv_path = Path(csv_path)
    _per_image_statistics(detector)
    reference = None  # per image (or fixed statistics): the saved left-out scores
    if (getattr(detector, "threshold_rule_", None) or {}).get("source") == RULE:
        reference = getattr(detector, "loo_scores_", None)
    header = csv_header(detector.class_names_, p_known=reference is not None)
    done = _already_scored(csv_path, header)
    stats = {"scored": 0, "skipped": len(done), "failed": 0, "flagged_unknown": 0,
             "interrupted": False}
    folder = None if hasattr(source, "readline") else Path(source)
    if folder is not None and not folder.is_dir():
        raise DataError(f"watched folder not found: {folder}")
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not csv_path.exists() or csv_path.stat().st_size == 0
    start = time.monotonic()
    failed: dict[str, tuple] = {}  # unreadable file -> (size, mtime) when it failed
    sizes: dict[str, int] = {}
    with open(csv_path, "a", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        if new_file:
            writer.writerow(header)
            fh.flush()

        def score(paths: Iterable[str]) -> bool:
            """Score ``paths``; True when max_images is reached."""
            for p in paths:
                try:
                    feats = detector.features([p], desc="stream")[0]
                except (DataError, OSError, ValueError) as exc:
                    print(f"resend watch: warning: {p} not scored: {exc}", file=log)
                    failed[p] = _signature(p)
                    stats["failed"] += 1
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # one image: statistics fixed above
                    normality, u = detector.score_similarities_features(feats)
                    s = float(normality[0])
                    # per image: threshold_; fixed pooled statistics: read with them (cached)
                    threshold, ref = detector.threshold_and_scores_features(feats)
                k = int(u[0].argmax())
                unknown = s < threshold
                extra = ([] if reference is None or ref is None
                         else [f"{float(conformal_pvalues([s], ref)[0]):.4g}"])
                writer.writerow([csv_text(p), f"{s:.6g}", *extra,
                                 csv_text(detector.class_names_[k]),
                                 *[f"{float(v):.6g}" for v in u[0]],
                                 csv_text(UNKNOWN_NAME if unknown else detector.class_names_[k])])
                fh.flush()
                done.add(p)
                stats["scored"] += 1
                stats["flagged_unknown"] += int(unknown)
                if max_images is not None and stats["scored"] >= max_images:
                    return True
            return False

        try:
            while True:
                if timeout is not None and time.monotonic() - start >= timeout:
                    break
                if folder is None:
                    line = source.readline()
                    if not line:
                        break
                    p = line.strip()
                    if p and p not in done and score([p]):
                        break
                    continue
                if not folder.is_dir():
                    raise DataError(f"the watched folder {folder} was removed or is no longer a "
                                    f"folder ({stats['scored']} images scored, all in {csv_path})")
                ready = []
                for p in _folder_images(folder):
                    if p in done:
                        continue
                    if p in failed:  # tried again once the file changes (a copy that stalled)
                        if _signature(p) == failed[p]:
                            continue
                        del failed[p]
                    try:
                        size = os.path.getsize(p)
                    except OSError:
                        continue
                    if size > 0 and sizes.get(p) == size:
                        ready.append(p)
                    sizes[p] = size
                if score(ready):
                    break
                time.sleep(poll)
        except KeyboardInterrupt:
            stats["interrupted"] = True
    return stats
