"""Open-set domain generalisation on PACS (paper, Table 4): ERM classifier alone vs + novelty score.

    python benchmarks/osdg_pacs.py --data-root ../shared/data --methods resend [--model CKPT]
    python benchmarks/osdg_pacs.py --data-root ../shared/data --methods cosine --normalize auto none

For every target of pacs-multi and pacs-single, an ERM linear head is trained on the support
(source) list only (``osdg.train_linear_classifier``, seed 0), on the frozen features the novelty
score uses (``--classifier-backbone detector``, default: for resend the fine-tuned
Lite0+Lite1 features of the shipped checkpoint; ``efficientnet_lite0`` = the ImageNet features
used before). Its predictions give Acc; its MSP alone and its MSP averaged with each method's
normality give AUROC, H-score and OSCR. The threshold accepts 95% of the source samples, scored out-of-fold (5 folds),
so no test label is used. Writes the table, the command, the machine and the wall time to
BENCHMARKS.md (section ``osdg-pacs``; a rerun replaces it, so list every method to keep).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _report import load_note, machine, update_section

from resend_novelty.backbones import build_backbone
from resend_novelty.detectors import build_detector
from resend_novelty.evaluation import get_setting
from resend_novelty.features import extract_features
from resend_novelty.models import load_checkpoint
from resend_novelty.osdg import default_normalization, run_osdg_benchmark

SETTINGS = ("pacs-multi", "pacs-single")


def _cell(m: dict) -> str:
    f = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
    return f"{f(m['acc'])} / {f(m['h_score'])} / {f(m['auroc'])} / {f(m.get('oscr'))}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True)
    p.add_argument("--methods", nargs="+", default=["resend"],
                   help="novelty scores fused with the MSP (resend, cosine, euclidean)")
    p.add_argument("--model", default=None, help="relational checkpoint for resend (default: shipped)")
    p.add_argument("--normalize", nargs="+", default=["auto"],
                   choices=["auto", "none", "zscore", "minmax"],
                   help="score normalisation(s) before averaging; auto = none for resend, zscore "
                   "otherwise (several values: one row each)")
    p.add_argument("--classifier-backbone", default="detector",
                   help="frozen features under the linear head: 'detector' (the first method's "
                   "own backbone, default) or a backbone name, e.g. efficientnet_lite0")
    p.add_argument("--detector-backbone", default=None,
                   help="backbone of the non-resend methods (default efficientnet_lite0; resend "
                   "uses its checkpoint's)")
    p.add_argument("--accept", type=float, default=0.95)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = p.parse_args(argv)

    t_all = time.perf_counter()
    load = load_note()
    first_model = load_checkpoint(args.model) if args.methods[0] == "resend" else None
    clf_name = args.classifier_backbone
    if clf_name == "detector":
        clf_name = (first_model.config.backbone if first_model is not None
                    else args.detector_backbone or "efficientnet_lite0")
    clf_bb = build_backbone(clf_name)

    def clf_features(paths):
        return extract_features(clf_bb, paths, progress=False)

    clf_cache: dict = {}
    results: dict = {}
    for method in args.methods:
        model = load_checkpoint(args.model) if method == "resend" else None
        det_name = (model.config.backbone if model is not None
                    else args.detector_backbone or "efficientnet_lite0")
        det_bb = clf_bb if det_name == clf_bb.name else build_backbone(det_name)

        def make(method=method, model=model, det_bb=det_bb):
            return build_detector(method, model=model, backbone=det_bb, progress=False)

        det_features = (clf_features if det_bb is clf_bb
                        else lambda paths, bb=det_bb: extract_features(bb, paths, progress=False))
        for norm in args.normalize:
            norm_eff = default_normalization(method, model) if norm == "auto" else norm
            for name in SETTINGS:
                t0 = time.perf_counter()
                r = run_osdg_benchmark(
                    name, args.data_root, make, det_features,
                    None if det_bb is clf_bb else clf_features,
                    normalize=norm_eff, accept=args.accept, folds=args.folds, seed=args.seed,
                    progress=False, classifier_cache=clf_cache,
                )
                r["wall_s"] = time.perf_counter() - t0
                results[(method, norm_eff, name)] = r
                a = r["avg"]
                print(f"{name:12s} {method:9s} norm={norm_eff:6s} Acc {a['fused']['acc']:.3f}  "
                      f"MSP: H {a['msp']['h_score']:.3f} AUROC {a['msp']['auroc']:.3f}  "
                      f"fused: H {a['fused']['h_score']:.3f} AUROC {a['fused']['auroc']:.3f}  "
                      f"({r['wall_s']:.1f} s)", flush=True)
    wall = time.perf_counter() - t_all

    cmd = "python benchmarks/osdg_pacs.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "## Open-set domain generalisation on PACS (paper Table 4 protocol, issue 6)", "",
        "Cells: **Acc / H-score / AUROC / OSCR** (%). Classifier: ERM linear head (multinomial "
        "logistic regression, L-BFGS, weight decay 1e-2, seed 0) on the frozen features "
        f"`{clf_name}`, "
        "trained on each target's support (source) list only. `MSP` = the classifier alone "
        "(max softmax probability); `MSP + m` = mean of the MSP and method m's normality "
        "(weights 0.5/0.5; `zscore` = both scores standardised with out-of-fold source statistics "
        "first, `none` = raw scores, the paper's rule for ReSeND). Acc is the classifier's "
        "closed-set accuracy on the known test samples, identical in every row. Threshold: accept "
        f"{args.accept:.0%} of the source samples scored out-of-fold ({args.folds} stratified "
        "folds), no test label used; H-score = harmonic mean of known-class accuracy (correct "
        "and accepted) and unknown rejection rate. AUROC: known = positive. OSCR (Dhamija et al. "
        "2018): area under correct-classification rate of the knowns vs accepted unknowns, over "
        "all thresholds.", "",
    ]
    for name in SETTINGS:
        targets = [t.name for t in get_setting(name).targets]
        lines += [f"**{name}**", "",
                  "| model | " + " | ".join(targets) + " | avg | wall s |",
                  "|---|" + "---|" * (len(targets) + 2)]
        first = next(r for (m, n, s), r in results.items() if s == name)
        lines.append("| MSP (classifier alone) | " + " | ".join(
            _cell(first["targets"][t]["msp"]) for t in targets) + f" | **{_cell(first['avg']['msp'])}** | |")
        for (method, norm, s), r in results.items():
            if s != name:
                continue
            lines.append(f"| MSP + {method} ({norm}) | " + " | ".join(
                _cell(r["targets"][t]["fused"]) for t in targets)
                + f" | **{_cell(r['avg']['fused'])}** | {r['wall_s']:.1f} |")
        nov = {m: r["avg"]["novelty_auroc"] for (m, n, s), r in results.items() if s == name}
        lines.append("")
        lines.append("Novelty score alone, avg AUROC: " + ", ".join(
            f"{m} {100 * v:.1f}" for m, v in nov.items() if v is not None) + ".")
        lines.append("")
    lines += [
        f"Command: `{cmd}`  ",
        f"Machine: {machine()}; {load}; backbone features read from the on-disk cache (warm). "
        f"Total wall time {wall:.0f} s (the first row of each setting includes training the "
        "classifier on every target, 5 out-of-fold fits + 1; later rows reuse it).",
    ]
    md = "\n".join(lines)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {f"{m}|{n}|{s}": r for (m, n, s), r in results.items()}, indent=2))
    if not args.no_write:
        update_section("osdg-pacs", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
