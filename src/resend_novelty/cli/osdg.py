"""``resend osdg``: open-set domain generalisation, a closed-set classifier + a novelty detector.

Two uses:

* user mode: ``resend osdg --probs P.csv --support S.txt --test T.txt --root DIR`` fuses the
  classifier probabilities of the test images with the detector's normality, then writes
  per-image scores/predictions (``--out-csv``) and metrics (``--json``);
* benchmark mode: ``resend osdg pacs-multi --data-root DIR`` trains the reference ERM linear
  head on every target's source list and reports AUROC, Acc and H-score of the classifier alone
  (MSP) and fused with the novelty score.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from ..backbones import build_backbone
from ..data import read_list_file
from ..evaluation import SETTINGS, get_setting
from ..features import extract_features
from ..osdg import (
    crossfit_source_scores,
    default_normalization,
    evaluate_osdg,
    format_osdg_table,
    load_probabilities,
    oscr_metrics,
    run_osdg_benchmark,
)
from ..report import write_json
from .common import SEED, add_detector_options, check_output, detector_factory, feature_cache


def _weights(text: str) -> tuple[float, float]:
    try:
        parts = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected W_MSP,W_NOVELTY (two numbers), got {text!r}") from None
    if len(parts) != 2 or min(parts) < 0 or sum(parts) <= 0:
        raise argparse.ArgumentTypeError(
            f"expected two non-negative numbers W_MSP,W_NOVELTY, not both 0; got {text!r}"
        )
    return parts[0], parts[1]


def add_parser(sub, name):
    p = sub.add_parser(
        name,
        help="open-set domain generalisation: fuse a closed-set classifier's MSP with the novelty score",
        description=(
            "Plug-and-play open-set domain generalisation (paper, Table 4). A closed-set classifier "
            "keeps its predicted class; its maximum softmax probability (MSP) is averaged with the "
            "detector's normality and samples below a threshold are rejected as unknown (-1). "
            "User mode: --probs with --support/--test/--root. Benchmark mode: a setting name ("
            + ", ".join(sorted(SETTINGS)) + ") with --data-root; the reference classifier is an "
            "ERM linear head on frozen backbone features trained on each target's source list. "
            "Threshold rule (default): accept 95% of the source samples, scored out-of-fold "
            "(no test label is used)."
        ),
    )
    p.add_argument("setting", nargs="?",
                   help="benchmark setting (benchmark mode); omit for user mode")
    p.add_argument("--data-root", default=None,
                   help="benchmark mode: directory with the datasets and lists (default: $RESEND_DATA)")
    g = p.add_argument_group("user mode")
    g.add_argument("--probs", default=None, metavar="FILE",
                   help="classifier probabilities of the test images (.csv or .npy): one row per "
                   "line of --test, in order; one column per known class (the support labels, "
                   "sorted); rows sum to 1. A CSV may start with a header line")
    g.add_argument("--support-probs", default=None, metavar="FILE",
                   help="the classifier's probabilities for the --support images (same format; "
                   "preferably out-of-fold / held-out predictions): needed to set the threshold "
                   "from source data or for --normalize zscore|minmax; otherwise pass --threshold")
    g.add_argument("--support", default=None, help="support (source) list: '<path> <label>' per line")
    g.add_argument("--test", default=None, help="test list: '<path> <label>' per line")
    g.add_argument("--root", default=None, help="directory the list paths are relative to")
    g.add_argument("--out-csv", default=None, metavar="OUT",
                   help="per test image: path, label, msp, novelty, fused, prediction (-1 = unknown)")
    g.add_argument("--atol", type=float, default=1e-3,
                   help="tolerance on the probability rows summing to 1 (default 1e-3)")
    f = p.add_argument_group("fusion and threshold")
    f.add_argument("--weights", type=_weights, default=(0.5, 0.5), metavar="W_MSP,W_NOV",
                   help="weights of the MSP and the novelty score in the fused mean "
                   "(default 0.5,0.5: the paper's plain mean)")
    f.add_argument("--normalize", default="auto", choices=["auto", "none", "zscore", "minmax"],
                   help="rescale MSP and novelty before averaging, with statistics of the "
                   "out-of-fold source scores: 'none' (paper rule), 'zscore', 'minmax'. 'auto' "
                   "(default): none for resend with the max-softmax normality (it lies in [1/K, 1] "
                   "like the MSP), zscore for every other score (other scales)")
    f.add_argument("--threshold", type=float, default=None,
                   help="fixed threshold on the fused score (applied to the MSP-alone row too); "
                   "default: set on source data by --accept")
    f.add_argument("--accept", type=float, default=0.95,
                   help="fraction of the (out-of-fold) source samples the threshold accepts "
                   "(default 0.95)")
    f.add_argument("--folds", type=int, default=5,
                   help="folds for the out-of-fold source scores (default 5)")
    f.add_argument("--seed", type=SEED, default=0, help="seed of the folds and the linear head (default 0)")
    p.add_argument("--classifier-backbone", default=None, metavar="NAME",
                   help="benchmark mode: frozen backbone under the ERM linear head (default: the "
                   "detector's own backbone, i.e. for --method resend the fine-tuned features of "
                   "the novelty score; efficientnet_lite0 = the ImageNet features used before)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the metrics as JSON to OUT")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --json/--out-csv file (refused otherwise)")
    add_detector_options(p)
    return p


def _normalize(args) -> str:
    if args.normalize != "auto":
        return args.normalize
    return default_normalization(args.method, args.model)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def run(args) -> int:
    for flag, path in (("--json", args.json), ("--out-csv", args.out_csv)):
        if path:  # checked before any work
            check_output(path, flag=flag, overwrite=args.overwrite)
    if args.setting:
        user = [o for o in ("probs", "support_probs", "support", "test", "root", "out_csv")
                if getattr(args, o) is not None]
        if user:
            raise ValueError(
                f"benchmark mode ({args.setting}) does not take --{user[0].replace('_', '-')}; "
                "omit the setting for user mode"
            )
        return _run_benchmark(args)
    missing = [o for o in ("probs", "support", "test", "root") if getattr(args, o) is None]
    if missing:
        raise ValueError(
            "user mode needs --probs, --support, --test and --root (missing: "
            + ", ".join("--" + m for m in missing) + "); or give a benchmark setting, e.g. "
            "'resend osdg pacs-multi --data-root DIR'"
        )
    return _run_user(args)


def _run_benchmark(args) -> int:
    setting = get_setting(args.setting)
    make = detector_factory(args)
    det0 = make()
    det_bb = det0.backbone

    def det_features(paths):
        return det0.features(paths, desc=f"{setting.name} features")[0]

    clf_features = None
    clf_name = args.classifier_backbone or det_bb.name
    if clf_name != det_bb.name:
        clf_bb = build_backbone(clf_name)
        cache = feature_cache(args)

        def clf_features(paths):
            return extract_features(
                clf_bb, paths, cache=cache, batch_size=args.batch_size, num_workers=args.workers,
                device=args.device, progress=not args.quiet, desc="classifier features",
                engine=args.engine,
            )

    norm = _normalize(args)
    result = run_osdg_benchmark(
        setting, args.data_root, make, det_features, clf_features, weights=args.weights,
        normalize=norm, threshold=args.threshold, accept=args.accept, folds=args.folds,
        seed=args.seed, progress=not args.quiet,
    )
    result.update(method=args.method, classifier=f"ERM linear head on {clf_name}")
    print(format_osdg_table(result, args.method))
    print(f"\nfusion weights {args.weights}, normalize {norm}, threshold "
          + (f"{args.threshold} (fixed)" if args.threshold is not None
             else f"accepting {args.accept:.0%} of the out-of-fold source scores")
          + f"; {result['seconds']:.1f} s")
    if args.json:
        write_json(args.json, result)
    return 0


def _run_user(args) -> int:
    support = read_list_file(args.support, args.root)
    test = read_list_file(args.test, args.root)
    s_lab = np.array([r.label for r in support])
    q_lab = np.array([r.label for r in test])
    classes = np.unique(s_lab)
    probs = load_probabilities(args.probs, len(test), len(classes), args.atol,
                               paths=[r.path for r in test])
    norm = _normalize(args)
    src_probs = None
    need_source = args.threshold is None or norm != "none"
    if need_source:
        if args.support_probs is None:
            raise ValueError(
                "the threshold is set on source data: pass --support-probs FILE (the classifier's "
                "probabilities for the --support images, preferably out-of-fold), or a fixed "
                "--threshold T" + (f" with --normalize none (now {norm})" if norm != "none" else "")
            )
        src_probs = load_probabilities(args.support_probs, len(support), len(classes), args.atol,
                                       paths=[r.path for r in support])
    make = detector_factory(args)
    det = make()
    s_feats = det.features([r.path for r in support], desc="support features")[0]
    q_feats = det.features([r.path for r in test], desc="test features")[0]
    src_nov = None
    if need_source:
        _, src_nov = crossfit_source_scores(s_lab, None, s_feats, make, folds=args.folds, seed=args.seed)
    det.fit_features(s_feats, s_lab)
    nov = det.score_features(q_feats)
    metrics, arrays = evaluate_osdg(probs, nov, q_lab, classes, src_probs, src_nov, args.weights,
                                    norm, args.threshold, args.accept)
    for row, value in oscr_metrics(arrays, q_lab, classes).items():
        metrics[row]["oscr"] = value
    metrics["method"] = args.method
    metrics["classes"] = classes.tolist()
    for row, title in (("msp", "classifier alone (MSP)"), ("fused", f"MSP + {args.method}")):
        m = metrics[row]
        print(f"{title:28s} AUROC {_fmt(m['auroc'])}  Acc {_fmt(m['acc'])}  H-score "
              f"{_fmt(m['h_score'])}  OSCR {_fmt(m['oscr'])}  (threshold {m['threshold']:.4f}, rejected {m['rejected']:.1%})")
    print(f"known {metrics['fused']['n_known']}, unknown {metrics['fused']['n_unknown']}")
    if args.out_csv:
        out = Path(args.out_csv)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "label", "msp", "novelty", "fused", "closed_prediction", "prediction"])
            for i, r in enumerate(test):
                w.writerow([r.path, r.label, f"{arrays['msp'][i]:.6f}", f"{arrays['novelty'][i]:.6f}",
                            f"{arrays['fused'][i]:.6f}", int(arrays["closed_prediction"][i]),
                            int(arrays["prediction"][i])])
    if args.json:
        write_json(args.json, metrics)
    return 0
