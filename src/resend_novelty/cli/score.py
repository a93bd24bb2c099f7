"""``resend score``: which new images show a class absent from a folder of reference images."""

from __future__ import annotations

import argparse
import sys
import warnings

from ..report import score_folders, write_report
from .common import add_detector_options, detector_factory


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
            "Fit one prototype per class of SUPPORT (support/<class>/<image>, no training), score "
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
    p.add_argument("--support", required=True, metavar="DIR",
                   help="reference images, one sub-folder per known class: DIR/<class>/<image>")
    p.add_argument("--test", required=True, metavar="DIR",
                   help="new images (searched recursively); labelled only if DIR/<class>/<image>")
    p.add_argument("--out", default="resend-score", metavar="DIR",
                   help="output folder for scores.csv, summary.json and the plots "
                   "(default ./resend-score)")
    thr = p.add_mutually_exclusive_group()
    thr.add_argument("--threshold", type=float, default=None, metavar="T",
                     help="flag images with normality < T as unknown (default: calibrate, --tpr)")
    thr.add_argument("--tpr", type=_tpr, default=0.95, metavar="R",
                     help="calibrate the threshold on the support set alone: leave-one-out "
                     "normality of each support image (its class prototype recomputed without "
                     "it); threshold = the value accepting a fraction R of them (default 0.95). "
                     "Needs classes with >= 2 images (others are skipped with a warning)")
    p.add_argument("--no-plots", action="store_true", help="write only scores.csv and summary.json")
    add_detector_options(p)
    return p


def run(args) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            det = detector_factory(args)()
            result = score_folders(det, args.support, args.test, threshold=args.threshold,
                                   tpr=args.tpr)
            files = write_report(result, args.out, plots=not args.no_plots)
        finally:
            for w in caught:
                print(f"resend {args.command}: warning: {w.message}", file=sys.stderr)

    n, n_unk = len(result.paths), int(result.flagged_unknown.sum())
    rule = result.threshold_rule
    how = ("given" if rule["source"] == "given" else
           f"support leave-one-out, recall {rule['tpr']:.0%} of {rule['n_images']} images")
    print(f"method {result.method}: {len(result.class_names)} known classes "
          f"({', '.join(result.class_names)}), threshold {result.threshold:.4g} ({how})")
    print(f"{n} test images: {n - n_unk} known, {n_unk} flagged unknown")
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
