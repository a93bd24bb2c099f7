"""Scoring rules on the synthetic proxy (selection) and on PACS (test), side by side (issue 4).

The proxy (``resend_novelty.evaluation.proxy``) renders 30 held-out Tiny-ImageNet classes as photo,
sketch, cartoon and painting and runs PACS-like episodes (6 known + 1 unknown class; multi-source:
support in three domains, test in the fourth; single-source: photo support). It is the only
number used to choose a scoring rule or a checkpoint; the PACS columns are the test.

    python benchmarks/proxy_vs_pacs.py --data-root ../shared/data [--model PATH ...]

Writes the ``proxy-vs-pacs`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _report import machine, update_section

from resend_novelty.backbones import build_backbone
from resend_novelty.detectors import build_detector
from resend_novelty.evaluation import evaluate_proxy, load_proxy_set, run_benchmark
from resend_novelty.models import load_checkpoint

READING = ('Reading (2026-11-27): the proxy ranks the per-domain normalisations as PACS single-source does (none < centred <= standardised), but it misses the multi-source strength of kNN-style scoring: its supports hold 25 images per class and domain, PACS supports hundreds. The default was not switched after seeing these PACS numbers (proxy: tie, so the simpler rule stays); `--neighbors 10` is available. The shipped resend rows equal the standardised cosine rows: the relational module adds nothing measurable on this reference set (section *Pretraining ablations*).')

READING_ALL = ("Reading (2026-11-27): with supports three times larger, the proxy still ranks "
               "prototype scoring above kNN-style scoring: standardised cosine and the shipped "
               "model 0.740, knn standardised and resend with 10 neighbours 0.727 (on the "
               "selection proxy: 0.737 vs 0.736). Support size does not explain kNN's lead on PACS "
               "multi-source (0.744 vs 0.687). That lead must come from something the synthetic "
               "domains lack - one guess, not tested: PACS classes have several distinct looks "
               "within a domain (e.g. many painting styles), which one mean per class blurs. By "
               "the rule above the default stays. In the multi-source proxy, each support image "
               "also appears in the other two source domains (stylised twins); PACS supports "
               "have no twins.")

RULES = [  # (label, method, detector kwargs)
    ("cosine", "cosine", {}),
    ("cosine, centred", "cosine-centered", {}),
    ("cosine, standardised", "cosine-standardized", {}),
    ("knn (k=10)", "knn", {}),
    ("knn, centred", "knn", {"center": "center"}),
    ("knn, standardised", "knn", {"center": "standardize"}),
    ("mahalanobis", "mahalanobis", {}),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="holds tiny_imagenet_200/, pacs/, pacs_lists/")
    p.add_argument("--model", nargs="*", default=[None], metavar="PATH",
                   help="relational checkpoints to add as `resend` rows (default: the shipped one)")
    p.add_argument("--episodes", type=int, default=50, help="proxy episodes per setting")
    p.add_argument("--renderings", choices=("one", "all"), default="one",
                   help="'all': every proxy image rendered in all four domains, so that supports "
                   "reach PACS-like sizes (75 images x 3 domains per class; section "
                   "proxy-vs-pacs-all); default 'one' (the selection proxy)")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--ratios", action="store_true",
                   help="instead: proxy AUROC of cosine, cosine-standardized and the shipped resend "
                   "for several known/unknown class counts, incl. in-domain episodes (section "
                   "proxy-ratios): does the transductive normalisation depend on the share of "
                   "unknowns in the test batch?")
    args = p.parse_args(argv)
    if args.ratios:
        return ratios(args)

    t_all = time.perf_counter()
    ps = load_proxy_set(str(Path(args.data_root) / "tiny_imagenet_200" / "train"), 30, 0,
                        renderings=args.renderings)
    bb = build_backbone("efficientnet_lite0")
    rows = [(label, method, kw, None) for label, method, kw in RULES]
    for path in args.model:
        m = load_checkpoint(path)
        name = "shipped" if path is None else Path(path).parent.name
        for normality in ("softmax", "max-logit"):
            rows.append((f"resend ({name}, {m.config.domain_norm}, {normality})", "resend",
                         {"normality": normality}, m))
        rows.append((f"resend ({name}, {m.config.domain_norm}, {m.scoring.normality}, 10 nearest "
                     "support images per class)", "resend", {"neighbors": 10}, m))
    lines = ([
        "## Scoring rules: proxy with PACS-sized supports vs PACS",
        "",
        "As the section above, but every proxy image is rendered in all four domains: test images "
        "are those with index i % 4 == t, rendered in the target domain t; the support is every "
        "other image of the known classes, rendered in each source domain (75 images, 225 "
        "renderings per class multi-source; 75 photos single-source), against 25 / 75 in the "
        "selection proxy. Built to test whether kNN-style scoring gains with larger supports "
        "(the note above). Decision rule, written down on 2026-11-27 before the run: switch the resend default "
        "to `neighbors=10` if knn-standardised or resend with 10 neighbours beats the shipped rule "
        "(standardize, max-logit) on this proxy's mean by more than 0.002.",
        "",
    ] if args.renderings == "all" else [
        "## Scoring rules: proxy (selection) vs PACS (test)",
        "",
    ]) + [
        "**proxy** = `resend_novelty.evaluation.proxy`: 30 Tiny-ImageNet classes held out of pretraining, "
        "each image rendered in one of photo / sketch / cartoon / painting, PACS-like episodes "
        f"(6 known + 1 unknown class, {args.episodes} episodes), average AUROC over the target "
        "domains. Only the proxy is used to choose; PACS (default `resend benchmark` protocol; "
        "multi-source supports normalised per source domain where a rule normalises) is the test. "
        "Centred / standardised = transductive per-domain normalisation "
        "(`resend_novelty.transforms.domain_norm`).",
        "",
        "| rule | proxy multi | proxy single | proxy mean | PACS multi AUROC / FPR95 | PACS single AUROC / FPR95 |",
        "|---|---|---|---|---|---|",
    ]
    for label, method, kw, model in rows:
        def make(method=method, kw=kw, model=model):
            return build_detector(method, model=model, backbone=bb if method != "resend" else
                                  model.config.backbone, progress=False, **kw)
        px = evaluate_proxy(lambda: build_detector(method, model=model, backbone=None,
                                                   progress=False, **kw), ps,
                            n_episodes=args.episodes)
        pm, pss = px["multi"]["avg"]["auroc"], px["single"]["avg"]["auroc"]
        pacs = {s: run_benchmark(s, args.data_root, make, progress=False)["avg"]
                for s in ("pacs-multi", "pacs-single")}
        row = (f"| {label} | {pm:.3f} | {pss:.3f} | {(pm + pss) / 2:.3f} | "
               f"{pacs['pacs-multi']['auroc']:.3f} / {pacs['pacs-multi']['fpr95']:.3f} | "
               f"{pacs['pacs-single']['auroc']:.3f} / {pacs['pacs-single']['fpr95']:.3f} |")
        print(row, flush=True)
        lines.append(row)
    lines += ["", READING_ALL if args.renderings == "all" else READING]
    lines += ["", f"Command: `python benchmarks/proxy_vs_pacs.py --data-root ../shared/data"
              + (" --model " + " ".join(str(m) for m in args.model) if args.model != [None] else "")
              + (" --renderings all" if args.renderings == "all" else "")
              + "`  ", f"Machine: {machine()}; wall time {time.perf_counter() - t_all:.0f} s."]
    md = "\n".join(lines)
    print(md)
    if not args.no_write:
        update_section("proxy-vs-pacs-all" if args.renderings == "all" else "proxy-vs-pacs", md)
    return 0


def ratios(args) -> int:
    t_all = time.perf_counter()
    ps = load_proxy_set(str(Path(args.data_root) / "tiny_imagenet_200" / "train"), 30, 0)
    methods = ("cosine", "cosine-standardized", "resend")
    lines = ["## Proxy: robustness to the share of unknown classes",
             "",
             "Test batches are normalised with their own statistics, so their composition could "
             "matter. Proxy AUROC (multi-source / single-source / in-domain; in-domain = photo "
             f"support and photo test, disjoint images) for several numbers of known and unknown "
             f"classes per episode ({args.episodes} episodes each). `resend` = the shipped "
             "checkpoint.", "",
             "| known + unknown classes | " + " | ".join(methods) + " |",
             "|---|" + "---|" * len(methods)]
    for nk, nu in ((6, 1), (6, 6), (3, 12), (12, 12)):
        cells = []
        for name in methods:
            r = evaluate_proxy(lambda: build_detector(name, backbone=None, progress=False), ps,
                               n_episodes=args.episodes, n_known=nk, n_unknown=nu,
                               settings=("multi", "single", "in-domain"))
            cells.append(" / ".join(f"{r[s]['avg']['auroc']:.3f}"
                                    for s in ("multi", "single", "in-domain")))
        lines.append(f"| {nk} + {nu} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    lines += ["", "Command: `python benchmarks/proxy_vs_pacs.py --data-root ../shared/data "
              f"--ratios`  ", f"Machine: {machine()}; wall time "
              f"{time.perf_counter() - t_all:.0f} s."]
    md = "\n".join(lines)
    print(md)
    if not args.no_write:
        update_section("proxy-ratios", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
