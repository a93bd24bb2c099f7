"""How close each threshold rule gets to the asked recall of the known classes, on PACS.

    RESEND_CACHE=DIR python benchmarks/thresholds.py --data-root ../shared/data

Rules (``resend score --threshold-from support|test``):

- ``support``: leave-one-out on the support set (``PrototypeDetector.calibrate``): the
  threshold accepting a fraction R of the support images, each scored without itself;
- ``test``: the unlabelled test images scored together
  (``resend_novelty.detectors.test_mode_threshold``): a 2-component Gaussian mixture of their
  normality, the upper component taken as the known mode, threshold at its (1-R) quantile.

For every target of pacs-single and pacs-multi and for the README's ``resend score`` example
(support: photos of dog, horse, house; test: every art painting), the table gives the recall
of the known test images actually reached (asked: R) and the fraction of unknown test images
rejected, for each rule. Writes section ``thresholds`` of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from _report import load_note, machine, update_section

from resend_novelty.detectors import build_detector, test_mode_threshold
from resend_novelty.detectors.calibration import threshold_at_recall
from resend_novelty.evaluation import get_setting, load_setting_lists, setting_paths
from resend_novelty.models import load_checkpoint
from resend_novelty.report import scan_support, scan_test

SETTINGS = ("pacs-single", "pacs-multi")
EXAMPLE_CLASSES = ("dog", "horse", "house")


def _rules(det, s_feats, s_labels, domains, q_feats, is_known, tprs) -> dict:
    """{tpr: {rule: {recall, unknown_rejected, threshold}}}; one fit and one LOO pass."""
    det.fit_features(s_feats, s_labels, domains=domains)
    det._calibrate_fitted(s_feats, s_labels, tprs[0], domains=domains)  # as calibrate
    scores = det.score_features(q_feats)
    # the left-out scores the decision rests on (read again for a batch the shift gate pools)
    reference = det.calibration_scores_features(q_feats)
    out = {}
    for tpr in tprs:
        t_support = threshold_at_recall(reference, tpr)  # the rule of calibrate
        t_test, _ = test_mode_threshold(scores, tpr=tpr)
        out[tpr] = {}
        for rule, t in (("support", t_support), ("test", t_test)):
            acc = scores >= t
            out[tpr][rule] = {"recall": float(acc[is_known].mean()),
                              "unknown_rejected": float((~acc[~is_known]).mean())
                              if (~is_known).any() else None, "threshold": float(t)}
    return out


def _example(det_factory, data_root: Path, tprs):
    pacs = data_root / "pacs"
    paths, lab, classes = scan_support(pacs / "photo")
    keep = [i for i, c in enumerate(lab) if classes[c] in EXAMPLE_CLASSES]
    support_paths = [paths[i] for i in keep]
    labels = np.array([EXAMPLE_CLASSES.index(classes[lab[i]]) for i in keep])
    test = scan_test(pacs / "art_painting")
    det = det_factory()
    s = det.features(support_paths, desc="support")[0]
    q = det.features(test.paths, desc="test")[0]
    is_known = np.array([t in EXAMPLE_CLASSES for t in test.labels])
    return _rules(det, s, labels, None, q, is_known, tprs)


def _write(rows, methods, tprs, argv, t_all, write: bool, load: str) -> None:
    wall = time.perf_counter() - t_all

    f = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
    cmd = "python benchmarks/thresholds.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["## Thresholds in the target domain: support leave-one-out vs test-score mixture", "",
             "Asked: a recall R of the known test images. Cells: **known recall reached / "
             "unknown rejected** (%). `support` = leave-one-out on the support set "
             "(`--threshold-from support`, default); `test` = known mode of a 2-component "
             "Gaussian mixture fitted to the unlabelled test scores (`--threshold-from test`). "
             "No test label is used by either rule. |gap| = mean over the rows of "
             "|recall reached - R|.", ""]
    for method in methods:
        for tpr in tprs:
            sel = [r for r in rows if r[0] == method and r[3] == tpr]
            lines += [f"**{method}, R = {tpr:.0%}**", "",
                      "| setting | target | support | test |", "|---|---|---|---|"]
            for _, name, target, _, r in sel:
                lines.append(f"| {name} | {target} | {f(r['support']['recall'])} / "
                             f"{f(r['support']['unknown_rejected'])} | {f(r['test']['recall'])} / "
                             f"{f(r['test']['unknown_rejected'])} |")
            gap = {k: np.mean([abs(r[k]["recall"] - tpr) for *_, r in sel]) for k in ("support", "test")}
            lines += ["", f"mean |gap|: support {100 * gap['support']:.1f}, test "
                      f"{100 * gap['test']:.1f} points.", ""]
    lines += [f"Command: `RESEND_CACHE=DIR {cmd}`  ",
              f"Machine: {machine()}; {load}; backbone features from the warm on-disk cache. "
              f"Wall time {wall:.0f} s."]
    if write:
        update_section("thresholds", "\n".join(lines))
    print("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True)
    p.add_argument("--methods", nargs="+", default=["cosine", "resend"],
                   help="detectors, in order; BENCHMARKS.md is rewritten after each one, so a "
                   "long run keeps the methods already measured")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    p.add_argument("--no-example", action="store_true", help="skip the README score example")
    p.add_argument("--tpr", nargs="+", type=float, default=[0.95, 0.8])
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = p.parse_args(argv)
    t_all = time.perf_counter()
    load = load_note()
    rows = []
    for method in args.methods:
        model = load_checkpoint() if method == "resend" else None

        def make(method=method, model=model):
            return build_detector(method, model=model, progress=False)

        res = {} if args.no_example else _example(make, Path(args.data_root), args.tpr)
        for tpr, r in res.items():
            rows.append((method, "README example", "photo 3 cls -> art", tpr, r))
            print(method, "example", tpr, r, flush=True)
        _write(rows, args.methods[:args.methods.index(method)] + [method], args.tpr, argv,
               t_all, not args.no_write, load)
        for name in args.settings:
            setting = get_setting(name)
            lists = load_setting_lists(setting, args.data_root)
            all_paths, index = setting_paths(lists)
            feats = make().features(all_paths, desc=name)[0]
            for t in setting.targets:
                support, test = lists[t.name]
                s_idx = [index[r.path] for r in support]
                q_idx = [index[r.path] for r in test]
                s_lab = np.array([r.label for r in support])
                q_lab = np.array([r.label for r in test])
                res = _rules(make(), feats[s_idx], s_lab, setting.support_domains(support),
                             feats[q_idx], np.isin(q_lab, s_lab), args.tpr)
                for tpr, r in res.items():
                    rows.append((method, name, t.name, tpr, r))
                    print(method, name, t.name, tpr, r, flush=True)
                _write(rows, args.methods[:args.methods.index(method) + 1], args.tpr, argv,
                       t_all, not args.no_write, load)  # after each target: a long run keeps its rows
        done = args.methods[:args.methods.index(method) + 1]
        _write(rows, done, args.tpr, argv, t_all, not args.no_write, load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
