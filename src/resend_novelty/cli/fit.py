"""``resend fit``: fit a detector on a support folder once and save it to one file."""

from __future__ import annotations

import math
import sys
import warnings

from ..data import printable
from ..detectors import SAVABLE_METHODS, save_detector
from ..models import default_checkpoint_path
from ..report import scan_support, validation_threshold
from .common import add_detector_options, check_output, detector_factory, finite_float
from .score import _tpr


def add_parser(sub, name):
    p = sub.add_parser(
        name,
        help="fit a detector on a support folder and save it to one .safetensors file",
        description=(
            "Fit the detector on SUPPORT (support/<class>/<image>), set its threshold (support "
            "leave-one-out for recall --tpr R, or --threshold T) and save everything scoring "
            "needs to OUT: the fitted tensors (prototypes, domain-normalised support features, "
            "normalisation statistics), the threshold and how it was chosen, the class names, "
            "the method and its options, the backbone and relational checkpoint names with the "
            "SHA-256 of their weights, and the package version. A safetensors file: nothing in "
            "it is executable. Score with 'resend score --detector OUT --test DIR' (same scores "
            "as 'resend score --support SUPPORT') or '--watch DIR'. Methods: resend, cosine*, "
            "euclidean, knn, mahalanobis (ft-* and gram cannot be saved)."
        ),
    )
    p.add_argument("--support", required=True, metavar="DIR",
                   help="reference images, one sub-folder per known class: DIR/<class>/<image>")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="the detector file to write (e.g. detector.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    thr = p.add_mutually_exclusive_group()
    thr.add_argument("--threshold", type=finite_float, default=None, metavar="T",
                     help="flag images with normality < T as unknown (default: calibrate, --tpr)")
    thr.add_argument("--tpr", type=_tpr, default=0.95, metavar="R",
                     help="calibrate the threshold on the support set: leave-one-out normality "
                     "of each support image; threshold = the value accepting a fraction R of "
                     "them (default 0.95)")
    p.add_argument("--validation", metavar="DIR", default=None,
                   help="labelled validation images, DIR/<class>/<image> (classes of the support "
                   "known, other class folders unknown): the threshold accepts a fraction --tpr "
                   "R of its known images, scored in the detector's policy (instead of the "
                   "support leave-one-out)")
    add_detector_options(p)
    return p


def run(args) -> int:
    if args.method not in SAVABLE_METHODS:  # before the slow part
        raise ValueError(f"method {args.method!r} cannot be saved to a detector file (it fits "
                         f"more than class statistics); choose one of {', '.join(SAVABLE_METHODS)}")
    if args.validation is not None and args.threshold is not None:
        raise ValueError("--threshold T and --validation DIR exclude each other")
    # a file, not a folder; writable; not inside the support; nothing replaced silently
    check_output(args.out, inside=(args.support,), overwrite=args.overwrite)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            det = detector_factory(args)()
            paths, labels, class_names = scan_support(args.support)
            feats = det.features(paths, desc="support features")[0]
            names = [class_names[int(c)] for c in sorted(set(labels))]
            if args.validation is not None:
                det.fit_features(feats, labels)
                det.class_names_ = names
                det.threshold_, det.threshold_rule_ = validation_threshold(
                    det, args.validation, args.tpr)
            elif args.threshold is None:
                det.calibrate_features(feats, labels, tpr=args.tpr, class_names=names)
            else:
                det.fit_features(feats, labels)
                det.threshold_ = float(args.threshold)
                det.threshold_rule_ = {"source": "given", "policy": det.policy}
            det.class_names_ = names
            if not math.isfinite(float(det.threshold_)):
                raise ValueError(f"the calibrated threshold is {det.threshold_}: the support "
                                 "scores are not finite (a corrupt model or features?); nothing "
                                 "was written")
            checkpoint = None
            if det.uses_model:
                checkpoint = args.model or default_checkpoint_path()
            path = save_detector(det, args.out, checkpoint=checkpoint, overwrite=args.overwrite,
                                 extra={"support": str(args.support)})
        finally:
            for w in caught:
                print(f"resend {args.command}: warning: {printable(w.message)}", file=sys.stderr)
    names = ", ".join(map(printable, det.class_names_))
    print(f"method {det.name}: {len(det.class_names_)} known classes ({names}) from "
          f"{len(paths)} support images, threshold {det.threshold_:.4g} ({det.threshold_rule_['source']}, for "
          f"{det.policy['mode']} scoring)")
    print(f"wrote {path}")
    return 0
