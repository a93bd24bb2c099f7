"""``resend score``: which new images show a class absent from a folder of reference images."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from ..data import printable
from ..detectors import THRESHOLD_SOURCES, load_detector, test_mode_threshold
from ..report import score_fitted, score_folders, validation_threshold, watch, write_report
from .common import (add_detector_options, check_output, detector_factory,
                     feature_cache, finite_float, fit_options_given, number)


def _tpr(value: str) -> float:
    v = float(value)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return v


def add_parser(sub, name):
    p = sub.add_parser(
        name,
        help="flag new images whose class is absent from a folder of labelled reference images",
        description=(
            "Fit the class references of SUPPORT (support/<class>/<image>; no training: a "
            "prototype per class and, with the shipped checkpoint, the 10 nearest support images "
            "of each class), score "
            "every image under TEST (searched recursively) and flag as 'unknown' those whose "
            "normality is below a threshold. Writes OUT/scores.csv (path, normality, nearest "
            "class, similarity to each class as sim_<class>, prediction), OUT/summary.json "
            "(counts, threshold and how it was chosen, class names, metrics) and PNG plots "
            "(histogram.png; with labelled test images also roc.png and detection_rates.png). "
            "TEST carries labels only if it is exactly class sub-folders (TEST/<class>/<image>): "
            "classes absent from SUPPORT are then the unknowns, and AUROC/FPR95 are printed. "
            "Images: JPEG, PNG, WebP, BMP (grayscale and RGBA converted to RGB)."
        ),
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--support", metavar="DIR",
                     help="reference images, one sub-folder per known class: DIR/<class>/<image>")
    src.add_argument("--detector", metavar="FILE",
                     help="a detector fitted by 'resend fit' (.safetensors): its classes, "
                     "threshold, options and scoring policy are used. Options that decide the "
                     "fit (--method, --neighbors, --shift-threshold, ...) are refused next to "
                     "it; run options (--device, --engine, --batch-size, cache) apply; "
                     "--per-image (and --watch, which scores per image) re-calibrates a "
                     "leave-one-out threshold for per-image scoring from the file's support. "
                     "--model names its relational checkpoint if it is not the shipped one")
    p.add_argument("--test", metavar="DIR",
                   help="new images (searched recursively); labelled only if DIR/<class>/<image>")
    p.add_argument("--watch", metavar="DIR|-",
                   help="with --detector: score images as they arrive in DIR (polled), or image "
                   "paths read from stdin ('-'), one by one, appending to OUT/scores.csv; "
                   "resumable (paths already in the CSV are skipped); stop with Ctrl-C")
    p.add_argument("--poll", type=number(float, 0, 3600, low_open=True), default=1.0, metavar="S",
                   help="--watch DIR: seconds between two looks at the folder (default 1)")
    p.add_argument("--max-images", type=number(int, 1), default=None, metavar="N",
                   help="--watch: stop after N new images")
    p.add_argument("--timeout", type=number(float, 0, low_open=True), default=None, metavar="S",
                   help="--watch: stop after S seconds")
    p.add_argument("--out", default="resend-score", metavar="DIR",
                   help="output folder for scores.csv, summary.json and the plots "
                   "(default ./resend-score)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of an earlier run in --out (refused otherwise)")
    thr = p.add_mutually_exclusive_group()
    thr.add_argument("--threshold", type=finite_float, default=None, metavar="T",
                     help="flag images with normality < T as unknown (default: calibrate, --tpr)")
    thr.add_argument("--tpr", type=_tpr, default=0.95, metavar="R",
                     help="calibrate the threshold on the support set alone: leave-one-out "
                     "normality of each support image (its class prototype recomputed without "
                     "it); threshold = the value accepting a fraction R of them (default 0.95). "
                     "Needs classes with >= 2 images (others are skipped with a warning)")
    p.add_argument("--threshold-from", choices=THRESHOLD_SOURCES, default="support",
                   help="where the threshold for recall --tpr R is set: 'support' (leave-one-out "
                   "on the support set, default; with --detector: the file's threshold) or "
                   "'test' (the unlabelled test images scored together: a 2-component Gaussian "
                   "mixture of their scores, the upper component taken as the known classes, "
                   "threshold at its (1-R) quantile; holds better when the test images come from "
                   "another domain than the support, see BENCHMARKS.md; needs >= 20 test images) "
                   "or 'validation' (the labelled images of --validation DIR)")
    p.add_argument("--validation", metavar="DIR", default=None,
                   help="labelled validation images, DIR/<class>/<image> (classes of the support "
                   "are known, other class folders unknown): the threshold accepts a fraction "
                   "--tpr R of its known images, scored in the detector's policy; where unknown "
                   "folders are present the share they reject is reported. Implies "
                   "--threshold-from validation")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots (scores.csv, summary.json "
                   "and report.html only)")
    p.add_argument("--no-html", action="store_true",
                   help="do not write OUT/report.html (one self-contained page: thumbnails of "
                   "the flagged images first, one panel per known class, the plots)")
    add_detector_options(p)
    return p


def _load(args):
    """The detector file, in the scoring policy asked (per image for --per-image and --watch),
    with the threshold for it: the file's, re-calibrated when the policy changes, or
    --threshold."""
    given = fit_options_given(args)
    if given:
        raise ValueError(f"{', '.join(given)}: fixed by the detector file {args.detector}; fit "
                         "a new one with 'resend fit' to change")
    det = load_detector(args.detector, model=args.model, device=args.device,
                        cache=feature_cache(args), batch_size=args.batch_size,
                        num_workers=args.workers, progress=not args.quiet, engine=args.engine)
    if args.threshold is not None or args.threshold_from != "support":
        # replaced (--threshold, --validation, --threshold-from test), whatever policy it was for
        det.threshold_, det.threshold_rule_ = None, None
    per_image = args.per_image or (args.watch is not None and det.normalizer.test_mean_ is None
                                   and det.normalizer.active)
    if per_image and not det.per_image:
        before = det.threshold_
        det.set_policy(True)
        if before is not None:
            print(f"resend {args.command}: the file's threshold {before:.4g} was calibrated for "
                  f"transductive scoring; re-calibrated for per-image scoring from its support: "
                  f"{det.threshold_:.4g}", file=sys.stderr)
    if args.threshold is not None:
        det.threshold_, det.threshold_rule_ = float(args.threshold), {"source": "given",
                                                                      "policy": det.policy}
    elif args.threshold_from == "test":  # set from the test scores once they are known
        det.threshold_, det.threshold_rule_ = 0.0, {"source": "test scores"}
    return det


def _check(args) -> None:
    if args.watch is not None:
        if args.detector is None:
            raise ValueError("--watch needs --detector FILE (fit it once with 'resend fit')")
        if args.test is not None:
            raise ValueError("--watch replaces --test: give one of them")
        if args.threshold_from == "test":
            raise ValueError("--threshold-from test needs the test images scored together, "
                             "not --watch")
    elif args.test is None:
        raise ValueError("--test DIR is required (or --watch with --detector)")
    if args.validation is not None:
        if args.threshold_from == "test":
            raise ValueError("--validation DIR and --threshold-from test exclude each other")
        args.threshold_from = "validation"
    elif args.threshold_from == "validation":
        raise ValueError("--threshold-from validation needs --validation DIR")
    if args.threshold is not None and args.threshold_from != "support":
        raise ValueError(f"--threshold T and --threshold-from {args.threshold_from} exclude "
                         "each other")


def _run_watch(args) -> int:
    det = _load(args)
    if args.validation is not None:
        det.threshold_, det.threshold_rule_ = validation_threshold(det, args.validation, args.tpr)
    source = sys.stdin if args.watch == "-" else args.watch
    csv_path = Path(args.out) / "scores.csv"
    print(f"watching {'stdin' if args.watch == '-' else args.watch} with {args.detector} "
          f"({len(det.class_names_)} known classes, threshold {det.threshold_:.4g}); "
          f"appending to {csv_path}; Ctrl-C stops", file=sys.stderr)
    stats = watch(det, source, csv_path, poll=args.poll, max_images=args.max_images,
                  timeout=args.timeout)
    print(f"{stats['scored']} images scored ({stats['flagged_unknown']} flagged unknown), "
          f"{stats['skipped']} already in {csv_path}, {stats['failed']} unreadable"
          + (" (interrupted)" if stats["interrupted"] else ""))
    return 0


def run(args) -> int:
    _check(args)
    if args.watch is not None:
        return _run_watch(args)
    created = not Path(args.out).exists()
    # with --overwrite the earlier report stays until the new one is complete (write_report)
    check_output(args.out, inside=(args.support, args.test), overwrite=args.overwrite,
                 folder=True)
    try:
        return _score(args)
    except BaseException:
        out = Path(args.out)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a failed run leaves no empty folder behind
        raise


def _score(args) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            validation = args.threshold_from == "validation"
            if args.detector is not None:
                det = _load(args)
                if validation:
                    det.threshold_, det.threshold_rule_ = validation_threshold(
                        det, args.validation, args.tpr)
                result = score_fitted(det, args.test)
            else:
                det = detector_factory(args)()
                result = score_folders(det, args.support, args.test, threshold=(
                    0.0 if validation else args.threshold), tpr=args.tpr)
                if validation:  # fitted above: the threshold from its validation scores
                    result.threshold, result.threshold_rule = validation_threshold(
                        det, args.validation, args.tpr)
                    result.p_known = None
            if args.threshold_from == "test":
                result.threshold, result.threshold_rule = test_mode_threshold(
                    result.normality, tpr=args.tpr)
                result.p_known = None
            files = write_report(result, args.out, plots=not args.no_plots,
                                 html=not args.no_html)
        finally:
            for w in caught:
                print(f"resend {args.command}: warning: {printable(w.message)}", file=sys.stderr)

    n, n_unk = len(result.paths), int(result.flagged_unknown.sum())
    rule = result.threshold_rule
    how = ("given" if rule["source"] == "given" else
           f"{rule['source']}, recall {rule['tpr']:.0%} of "
           f"{rule.get('n_images', rule.get('n_known'))} images"
           if "tpr" in rule else rule["source"])
    if "unknown_rejected" in rule:
        how += f"; rejects {rule['unknown_rejected']:.0%} of its {rule['n_unknown']} unknowns"
    print(f"method {result.method}: {len(result.class_names)} known classes "
          f"({', '.join(map(printable, result.class_names))}), threshold {result.threshold:.4g} "
          f"({how})")
    print(f"{n} test images: {n - n_unk} known, {n_unk} flagged unknown")
    print("scoring: " + result.scoring.get("description", "n/a"))
    m = result.metrics()
    if m is not None:
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        print(f"labels from class folders: AUROC {fmt(m['auroc'])}  FPR95 {fmt(m['fpr95'])}  "
              f"known accepted {fmt(m['known_accepted'])}  unknown rejected "
              f"{fmt(m['unknown_rejected'])}  (known {m['n_known']}, unknown {m['n_unknown']})")
        if "note" in m:
            print(f"note: {m['note']}")
    print("wrote " + ", ".join(files[k] for k in files))
    return 0
