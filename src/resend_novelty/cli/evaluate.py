"""``resend eval``: one support list against one test list."""

from __future__ import annotations

import math

import numpy as np

from ..data import read_list_file
from ..evaluation import closed_set_accuracy, novelty_report
from ..report import write_json
from .common import add_detector_options, detector_factory, check_output


def add_parser(sub, name):
    p = sub.add_parser(
        name,
        help="evaluate novelty detection on a support list and a test list",
        description=(
            "Fit class prototypes on the support list (no training) and score the test list. "
            "Known classes are the labels present in the support list; test images with any "
            "other label are unknown. Prints AUROC and FPR95 (known = positive class; FPR95 = "
            "fraction of unknowns accepted at 95% recall of knowns)."
        ),
    )
    p.add_argument("--root", required=True, help="directory the list paths are relative to")
    p.add_argument("--support", required=True, help="support list file: '<path> <label>' per line")
    p.add_argument("--test", required=True, help="test list file: '<path> <label>' per line")
    p.add_argument("--json", default=None, metavar="OUT",
                   help="write auroc, fpr95, aupr_in, aupr_out, n_known, n_unknown, ... to OUT")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --json file (refused otherwise)")
    add_detector_options(p)
    return p


def run(args) -> int:
    for flag, path in (("--json", args.json), ):
        if path:  # checked before any work
            check_output(path, flag=flag, overwrite=args.overwrite)
    support = read_list_file(args.support, args.root)
    test = read_list_file(args.test, args.root)
    det = detector_factory(args)()
    det.fit([r.path for r in support], labels=[r.label for r in support])
    feats = det.features([r.path for r in test], desc="test features")[0]
    labels = np.array([r.label for r in test])
    is_known = np.isin(labels, det.classes_)
    scores, nearest = det.score_and_nearest_features(feats)
    rep = novelty_report(scores, is_known)
    acc = closed_set_accuracy(nearest, labels, is_known)
    rep["closed_set_accuracy"] = None if math.isnan(acc) else acc
    rep["method"] = args.method
    rep["per_image"] = bool(getattr(args, "per_image", False))
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    print(f"method {args.method}: AUROC {fmt(rep['auroc'])}  FPR95 {fmt(rep['fpr95'])}  "
          f"(known {rep['n_known']}, unknown {rep['n_unknown']}; "
          f"{'per image' if rep['per_image'] else 'transductive'})")
    if "note" in rep:
        print(f"note: {rep['note']}")
    if args.json:
        write_json(args.json, rep)
    return 0
