"""End-to-end fine-tuned backbones: the GPU run, the selection proxy and PACS (issue 4).

Reads the log of ``tools/finetune_backbones.py`` (default: ``benchmarks/finetune_log.json``, the
log of the GPU run of 2026-11-27, kept in the repo as its record), then on this machine:

1. **selection** (proxy only): the frozen ImageNet Lite0+Lite1 ensemble and the fine-tuned one
   (``efficientnet_lite0_ft+efficientnet_lite1_ft``, the weights shipped in the package), each
   scored with standardised cosine and with the relational checkpoint under its default scoring;
   seed 0 / 50 episodes, then fresh episodes (seed 1, 200 episodes). Rule, written on 2026-11-27
   before any number (``RULE`` below, quoted in the section): adopt the fine-tuned backbones if the
   relational model on them beats the frozen features by more than 0.002 on both;
2. **test**: PACS multi- and single-source with the default ``resend benchmark`` protocol,
   computed after.

    python benchmarks/finetune.py --data-root ../shared/data [--log PATH] [--model PATH]

Every number is stored in ``--results`` as soon as it exists, so a rerun or an interrupted run
reuses them. Writes the ``finetune`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

from _report import machine, update_section

from resend_novelty.backbones import build_backbone
from resend_novelty.detectors import ReSeNDDetector, build_detector
from resend_novelty.evaluation import evaluate_proxy, load_proxy_set, run_benchmark
from resend_novelty.models import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
FROZEN, TUNED = "efficientnet_lite0+efficientnet_lite1", "efficientnet_lite0_ft+efficientnet_lite1_ft"
MARGIN = 0.002
RULE = """\
1. Per backbone and config, the epoch with the highest proxy mean (standardised cosine, 50
   episodes, seed 0); epoch 0 = the frozen backbone competes.
2. The candidate: the best Lite0 + best Lite1 of the config whose ensemble scores higher on the
   proxy with the shipped relational model and its default (hybrid) scoring.
3. Adopt it if, with the shipped relational model and default scoring, its proxy mean beats the
   frozen Lite0+Lite1 features on the same device by more than 0.002 (seed 0, 50 episodes), and
   beats them again on fresh episodes (seed 1, 200 episodes).
4. PACS is computed after; as for the earlier vetoed candidates a PACS target more than 0.03
   below its Lite0 cosine baseline (issue 4's floor) vetoes it. Nothing else about PACS changes the choice.
Configs fixed with it: "distill" (lambda 1) then "plain" (lambda 0), 5 epochs each; no other
values are tried."""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="holds tiny_imagenet_200/, pacs/, pacs_lists/")
    p.add_argument("--log", default=str(ROOT / "benchmarks" / "finetune_log.json"),
                   help="log.json of tools/finetune_backbones.py")
    p.add_argument("--model", default=None, help="relational checkpoint (default: the shipped one)")
    p.add_argument("--results", default="runs/finetune_bench/results.json",
                   help="measured numbers, reused by reruns")
    p.add_argument("--skip-pacs", action="store_true", help="proxy only")
    p.add_argument("--pacs-only", action="store_true",
                   help="only measure the PACS numbers into --results (no section)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)

    t_all = time.perf_counter()
    log = json.loads(Path(args.log).read_text())
    base_model = load_checkpoint(args.model)
    res_file = Path(args.results)
    store = json.loads(res_file.read_text()) if res_file.exists() else {}

    def measured(key, fn):
        if key not in store:
            value = fn()
            # merge with what another run may have stored meanwhile, then write atomically
            store.update(json.loads(res_file.read_text()) if res_file.exists() else {})
            store[key] = value
            res_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = res_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(store, indent=1))
            tmp.replace(res_file)
        return store[key]

    def model_for(backbone):  # the relational weights, read on the features of ``backbone``
        m = copy.deepcopy(base_model)
        m.config.backbone = backbone
        return m

    rules = {
        "cosine, standardised": lambda bb, backbone=None: build_detector(
            "cosine-standardized", backbone=backbone, progress=False),
        "relational model, default scoring": lambda bb, backbone=None: ReSeNDDetector(
            model=model_for(bb), backbone=backbone, progress=False),
    }
    proxy_sets: dict = {}

    def proxy_set(bb_name):  # loaded once per backbone, only if a number must be measured
        if bb_name not in proxy_sets:
            proxy_sets[bb_name] = load_proxy_set(
                str(Path(args.data_root) / "tiny_imagenet_200" / "train"), 30, 0,
                backbone=build_backbone(bb_name))
        return proxy_sets[bb_name]

    proxy: dict = {}
    for bb_name in (() if args.pacs_only else (FROZEN, TUNED)):
        for rule, make in rules.items():
            for seed, n in ((0, 50), (1, 200)):
                def run(bb_name=bb_name, make=make, seed=seed, n=n):
                    r = evaluate_proxy(lambda: make(bb_name), proxy_set(bb_name), n_episodes=n,
                                       seed=seed)
                    return [r["multi"]["avg"]["auroc"], r["single"]["avg"]["auroc"]]

                proxy[(bb_name, rule, seed)] = measured(f"proxy|{bb_name}|{rule}|{seed}|{n}", run)
                m, s = proxy[(bb_name, rule, seed)]
                print(f"proxy {bb_name} | {rule} | seed {seed}: {m:.4f} / {s:.4f} / "
                      f"{(m + s) / 2:.4f}", flush=True)

    # no domain shift: photo support and photo test of the held-out classes (the proxy's
    # "in-domain" setting), a check that the fine-tuning did not trade plain novelty detection
    in_domain: dict = {}
    for bb_name in (() if args.pacs_only else (FROZEN, TUNED)):
        for rule in ("cosine", "cosine-standardized"):
            def run(bb_name=bb_name, rule=rule):
                r = evaluate_proxy(lambda: build_detector(rule, backbone=None, progress=False),
                                   proxy_set(bb_name), n_episodes=50, settings=("in-domain",))
                return r["in-domain"]["avg"]["auroc"]

            in_domain[(bb_name, rule)] = measured(f"in-domain|{bb_name}|{rule}", run)

    def mean(x):
        return (x[0] + x[1]) / 2

    if args.pacs_only:
        _pacs(args, rules, measured)
        return 0
    rel = "relational model, default scoring"
    passes = all(mean(proxy[(TUNED, rel, s)]) > mean(proxy[(FROZEN, rel, s)]) + MARGIN
                 for s in (0, 1))
    pacs = {} if args.skip_pacs else _pacs(args, rules, measured)

    # ------------------------------------------------------------------ the section
    a = log["args"]
    curve = {}
    for e in log["epochs"]:
        curve.setdefault((e["config"], e["backbone"]), []).append(e)
    lines = [
        "## End-to-end fine-tuned backbones (issue 4)",
        "",
        "EfficientNet-Lite0 and Lite1 fine-tuned end to end on the Tiny-ImageNet reference set "
        "(`tools/finetune_backbones.py`; the 30 classes held out for the proxy are never trained "
        f"on; {a['per_class']} images per training class). Recipe, fixed on 2026-11-27 before any number "
        "(below): every training image rendered at random as a photo or one of the "
        "domain-shift styles of `resend_novelty.data.augment` (sketch, cartoon, painting, grayscale, "
        "colour, low resolution), random resized crop (scale 0.5-1) and flip; loss = cosine "
        f"classifier cross-entropy (scale {a['scale']:g}, initialised at the class means of the "
        "frozen features) + 1 x the relative squared distance to the frozen ImageNet features of "
        f"the same rendering (config `distill`); AdamW, lr {a['lr']:g} backbone / {a['head_lr']:g} "
        f"classifier, batch {a['batch']}, {a['epochs']} epochs, cosine schedule, BatchNorm "
        f"statistics frozen, bf16, seed {a['seed']}. GPU run of 2026-11-27 (numbers of the "
        f"fine-tuning recorded from its log, `benchmarks/finetune_log.json`): {log['device']}, "
        f"torch {log['torch']}, command in the log's `args` "
        "(the Tiny-ImageNet images travelled as one archive; "
        "`--key-root` keeps the proxy's renderings identical to this machine's).",
        "",
        "Rule, written down on 2026-11-27 before any number of the fine-tuning:",
        "",
        *[f"> {line}" for line in RULE.splitlines()],
        "",
        "Proxy after each epoch (standardised cosine, 50 episodes; epoch 0 = the frozen ImageNet "
        "backbone, computed on the GPU with fp16-stored starting weights; seconds per epoch "
        "include the proxy's feature extraction):",
        "",
        "| config | backbone | " + " | ".join(f"epoch {i}" for i in range(a["epochs"] + 1))
        + " | best | s / epoch |",
        "|---|---|" + "---|" * (a["epochs"] + 3),
    ]
    for (cfg, bb), es in curve.items():
        cells = [f"{e['proxy']['mean']:.4f}" for e in es] + ["-"] * (a["epochs"] + 1 - len(es))
        secs = [e["train_s"] for e in es if e["epoch"] > 0]
        lines.append(f"| {cfg} | {bb} | " + " | ".join(cells)
                     + f" | {log['best_epoch'][f'{cfg}|{bb}']} | "
                     + (f"{sum(secs) / len(secs):.0f}" if secs else "-") + " |")
    lines += [
        "",
        "Selection on this machine (fine-tuned = the best epoch of each member, the weights "
        "shipped as `efficientnet_lite0_ft` / `efficientnet_lite1_ft`). Cells: proxy multi / "
        "single / mean.",
        "",
        "| features | rule | seed 0, 50 episodes | seed 1, 200 episodes |",
        "|---|---|---|---|",
    ]
    for bb_name in (FROZEN, TUNED):
        for rule in rules:
            c = [" / ".join(f"{v:.4f}" for v in (*proxy[(bb_name, rule, s)],
                                                  mean(proxy[(bb_name, rule, s)]))) for s in (0, 1)]
            lines.append(f"| {bb_name} | {rule} | {c[0]} | {c[1]} |")
    lines += ["", "Without a domain shift (the proxy's in-domain setting: photo support and photo "
              "test of the held-out classes, 50 episodes, seed 0; AUROC): "
              + "; ".join(f"{rule} {in_domain[(FROZEN, rule)]:.4f} frozen vs "
                          f"{in_domain[(TUNED, rule)]:.4f} fine-tuned"
                          for rule in ("cosine", "cosine-standardized"))
              + ". On unseen classes of the reference set, the fine-tuning did not trade plain "
              "novelty detection for style invariance (a weak check: same image source as the "
              "fine-tuning data)."]
    if "_gpu_measured" in store:
        lines += ["", "The two relational rows of the fine-tuned features were measured on the "
                  "NVIDIA H200 of the GPU run (torch 2.11.0+cu130) with the same code (`evaluate_proxy`, "
                  "`ReSeNDDetector`) on this machine's cached fp32 proxy features: on 2 CPU cores "
                  "the hybrid scoring of 200 episodes takes over 40 minutes. Every other cell was "
                  "measured here."]
    lines += ["", "Deviation from the rule's wording: the GPU run timed out before it scored the "
              "fine-tuned ensemble, so \"on the same device\" could not hold as planned. The "
              "fine-tuned relational rows come from the GPU, the frozen ones from this CPU; the "
              "GPU run's own frozen ensemble (its log) gave 0.7539 (seed 0) and 0.7593 (seed 1), "
              "so the verdict is the same against either."]
    lines += ["", f"Rule: the relational model on the fine-tuned features must beat it on the "
              f"frozen ones by more than {MARGIN} on both episode sets: "
              f"**{'passed' if passes else 'not passed'}**."]
    if pacs:
        lines += [
            "",
            "PACS (computed after the selection; default `resend benchmark` protocol). Cells: "
            "average AUROC / FPR95 (per target AUROC).",
            "",
            "| features | rule | PACS multi (Art / Sketch / Cartoon / Photo) | PACS single (Art / Sketch / Cartoon) |",
            "|---|---|---|---|",
        ]
        for bb_name in (FROZEN, TUNED):
            for rule in rules:
                c = []
                for setting in ("pacs-multi", "pacs-single"):
                    r = pacs[(bb_name, rule, setting)]
                    per = " / ".join(f"{v:.3f}" for v in r["targets"].values())
                    c.append(f"{r['avg']['auroc']:.3f} / {r['avg']['fpr95']:.3f} ({per})")
                lines.append(f"| {bb_name} | {rule} | {c[0]} | {c[1]} |")
    if pacs:
        floors = {"ArtPainting": 0.585, "Sketch": 0.749, "Cartoon": 0.618, "Photo": 0.623}
        tuned = pacs[(TUNED, rel, "pacs-multi")]["targets"]
        worst = min(tuned, key=lambda t: tuned[t] - floors[t])
        ok = all(tuned[t] >= floors[t] - 0.03 for t in floors)
        d = {k: pacs[(TUNED, r, k)]["avg"]["auroc"] - pacs[(FROZEN, r, k)]["avg"]["auroc"]
             for r in rules for k in ("pacs-multi", "pacs-single")}
        gain_rel = {k: pacs[(TUNED, rel, k)]["avg"]["auroc"]
                    - pacs[(TUNED, "cosine, standardised", k)]["avg"]["auroc"]
                    for k in ("pacs-multi", "pacs-single")}
        lines += [
            "",
            f"Veto check (issue 4: no multi-source target more than 0.03 below its Lite0 cosine "
            f"baseline): {'none vetoes' if ok else 'VETOED'}; the closest is {worst} "
            f"({tuned[worst]:.3f} vs baseline {floors[worst]:.3f}).",
            "",
            "What we saw:",
            f"- Fine-tuning moves PACS more than any earlier lever: with the relational model "
            f"{d['pacs-multi']:+.3f} multi-source and {d['pacs-single']:+.3f} single-source AUROC "
            "over the same module on the frozen features, and FPR95 drops in both settings.",
            f"- The relational module, trained on the frozen features, still adds "
            f"{gain_rel['pacs-multi']:+.3f} / {gain_rel['pacs-single']:+.3f} over standardised "
            "cosine on the fine-tuned ones (on the proxy only +0.004 / +0.002).",
            "- The proxy overstates the gain (+0.109 vs +0.05-0.06 on PACS): it renders its held-out "
            "classes with the very style functions the fine-tuning trains on. It chose right "
            "here, but its margin no longer predicts the size of a real-domain gain.",
            "- The proxy curve is flat after epoch 3 (Lite0: 0.8452, 0.8450, 0.8451); the Lite1 "
            "run stopped after epoch 3 at its time budget, so its epochs 4-5 were never measured.",
            "- Not run: config `plain` (no distillation; it did not fit in the GPU run's time), "
            "retraining the relational module on the fine-tuned features, Lite2.",
        ]
    lines += [
        "",
        "Command: `python benchmarks/finetune.py --data-root ../shared/data` (fine-tuning itself: "
        "`python tools/finetune_backbones.py --data-root ../shared/data --ship distill`, on a GPU)  ",
        f"Machine: {machine()}; this run {time.perf_counter() - t_all:.0f} s (numbers reused from "
        f"`{args.results}` are not re-measured)",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        update_section("finetune", text)
    return 0


def _pacs(args, rules, measured) -> dict:
    pacs = {}
    for bb_name in (FROZEN, TUNED):
        for rule, make in rules.items():
            for setting in ("pacs-multi", "pacs-single"):
                def run(bb_name=bb_name, make=make, setting=setting):
                    bb = build_backbone(bb_name)
                    r = run_benchmark(setting, args.data_root, lambda: make(bb_name, bb),
                                      progress=True)
                    return {"avg": r["avg"], "targets": {k: v["auroc"]
                                                         for k, v in r["targets"].items()}}

                pacs[(bb_name, rule, setting)] = measured(f"pacs|{bb_name}|{rule}|{setting}", run)
                r = pacs[(bb_name, rule, setting)]
                print(f"{setting} {bb_name} | {rule}: {r['avg']['auroc']:.4f} / "
                      f"{r['avg']['fpr95']:.4f} {r['targets']}", flush=True)
    return pacs


if __name__ == "__main__":
    sys.exit(main())
