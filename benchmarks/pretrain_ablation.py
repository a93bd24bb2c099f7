"""What moves the number: pretraining ablations of the relational model (issue 4).

Each named recipe of the package (``resend_novelty.training.recipe_names()``, stored in
``src/resend_novelty/training/recipes.json``) is pretrained (frozen EfficientNet-Lite0 features of the Tiny-ImageNet
reference set, no PACS anywhere in training or selection), then reported with

- ``val``: the validation AUROC on held-out Tiny-ImageNet classes (photo prototypes, test items
  incl. stylised views) - the ONLY number used to choose a configuration;
- PACS multi-source / single-source average AUROC and FPR95 (the test, never used to choose).

Results are appended to ``runs/ablation/results.jsonl`` (an interrupted run resumes where it
stopped) and written to BENCHMARKS.md (section ``pretrain-ablation``).

    python benchmarks/pretrain_ablation.py --data-root ../shared/data [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _report import machine, update_section

from resend_novelty.backbones import build_backbone
from resend_novelty.detectors import ReSeNDDetector
from resend_novelty.evaluation import evaluate_proxy, load_proxy_set, run_benchmark
from resend_novelty.models import load_checkpoint
from resend_novelty.training import (TrainConfig, base_recipe, load_recipe,
                                     load_reference_features, recipe_names, split_validation,
                                     train, validation_auroc)

# name -> TrainConfig overrides (the recipes of the package: resend_novelty.training.load_recipe)
CONFIGS = {name: load_recipe(name) for name in recipe_names()}
BASE = base_recipe()


def evaluate_pacs(model_path: str, data_root: str) -> dict:
    model = load_checkpoint(model_path)
    bb = build_backbone(model.config.backbone)
    out = {}
    for setting in ("pacs-multi", "pacs-single"):
        r = run_benchmark(setting, data_root,
                          lambda: ReSeNDDetector(model=model, backbone=bb, progress=False))
        out[setting] = {"avg": r["avg"], "targets": {k: {"auroc": v["auroc"], "fpr95": v["fpr95"]}
                                                     for k, v in r["targets"].items()}}
    return out


def common_validation(run_dir: str, data_root: str, _cache={}) -> float:
    """Validation AUROC of a run's best checkpoint under one protocol for all runs: the held-out
    classes with their stylised views (mean of in-domain and cross-domain AUROC)."""
    m = load_checkpoint(Path(run_dir) / "best.safetensors")
    key = m.config.backbone  # features of the backbone the run was trained on
    if key not in _cache:
        ref = load_reference_features(str(Path(data_root) / "tiny_imagenet_200" / "train"), key,
                                      max_per_class=BASE["max_per_class"], style_views=24,
                                      workers=0, progress=False)
        _cache[key] = (ref, split_validation(ref.labels, BASE["val_classes"], 0)[1])
    ref, val = _cache[key]
    return float(validation_auroc(m, ref.features, ref.labels, ref.is_view, val, 0,
                                  center=m.config.domain_norm))


PROXY_EPISODES = 50
# the proxy column is computed for the runs validated on the proxy (from 2026-11-27) and for the previously
# shipped recipe; older runs keep "-" (their CPU cost is not worth it: they lose on every column)
PROXY_ALSO = ("centered + cosine skip + views",)


def proxy_score(run_dir, data_root: str, _cache={}) -> dict:
    """The best checkpoint on the synthetic domain-shift episodes of held-out Tiny-ImageNet classes
    (resend_novelty.evaluation.proxy, PROXY_EPISODES episodes): multi/single average AUROC and their mean - the
    selection criterion from 2026-11-27 (PACS never used)."""
    m = load_checkpoint(Path(run_dir) / "best.safetensors")
    key = m.config.backbone  # features of the backbone the run was trained on
    if key not in _cache:
        _cache[key] = load_proxy_set(str(Path(data_root) / "tiny_imagenet_200" / "train"),
                                     BASE["val_classes"], 0, backbone=key, progress=False)
    out = {}
    for normality in ("softmax", "max-logit"):
        r = evaluate_proxy(lambda: ReSeNDDetector(model=m, backbone=None, progress=False,
                                                  normality=normality),
                           _cache[key], n_episodes=PROXY_EPISODES)
        multi, single = r["multi"]["avg"]["auroc"], r["single"]["avg"]["auroc"]
        out[normality] = {"multi": multi, "single": single, "mean": 0.5 * (multi + single)}
    return {**out["softmax"], "max-logit": out["max-logit"]}


def table(rows: list[dict], command: str) -> str:
    lines = [
        "## Pretraining ablations (issue 4)",
        "",
        "Frozen EfficientNet-Lite0 features (Lite1, or Lite0 and Lite1 concatenated, where the name",
        "says so); reference set Tiny-ImageNet-200 (50 images/class, 30",
        "classes held out for validation); PACS is only the test. **val (own run)** = best validation",
        "AUROC during the run (held-out Tiny-ImageNet classes; runs with stylised views also test on",
        "views: mean of in-domain and cross-domain AUROC); **val (common)** = the best checkpoint of",
        "every run re-scored under one protocol (with views). PACS columns: average AUROC / FPR95 with",
        "the default `resend benchmark` scoring (max softmax of the relational logits), best checkpoint.",
        "",
        "**proxy** = the best checkpoint on the synthetic domain-shift episodes of the held-out",
        "classes (`resend_novelty.evaluation.proxy`: photo/sketch/cartoon/painting renderings, 6 known + 1",
        f"unknown class per episode, {PROXY_EPISODES} episodes; multi-source / single-source average",
        "AUROC with the max-softmax normality, and with max-logit): the selection criterion from",
        "2026-11-27 to 2026-12-01.",
        "",
        "| config | val (own run) | val (common) | proxy multi / single | PACS multi AUROC | multi FPR95 | PACS single AUROC | single FPR95 | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m, s = r["pacs"]["pacs-multi"]["avg"], r["pacs"]["pacs-single"]["avg"]
        px = r.get("proxy")
        pxs = "-"
        if px:
            ml = px["max-logit"]
            pxs = (f"{px['multi']:.3f} / {px['single']:.3f} (max-logit {ml['multi']:.3f} / "
                   f"{ml['single']:.3f})")
        lines.append(f"| {r['name']} | {r['val']:.3f} | {r.get('val_common', float('nan')):.3f} | {pxs} | "
                     f"{m['auroc']:.3f} | {m['fpr95']:.3f} | "
                     f"{s['auroc']:.3f} | {s['fpr95']:.3f} | {r['seconds']:.0f} |")
    lines += ["", "Baselines on Lite0 features (no training), PACS multi / single: max cosine to "
              "prototypes 0.644 / 0.623; centred cosine (`--method cosine-centered`, multi-source "
              "support centred per source domain) 0.693 / 0.691; standardised cosine "
              "(`cosine-standardized`) 0.687 / 0.698; on Lite1 0.734 / 0.712, on Lite0+Lite1 "
              "0.733 / 0.722, on Lite0+Lite1+Lite2 0.730 / 0.760 (sections *PACS* and *Backbones*). The "
              "shipped checkpoint (since 2026-11-27) is the recipe `standardized + cosine skip + views, "
              "proxy val, Lite0+Lite1` with the max-logit normality "
              "(src/resend_novelty/training/shipped_recipe.json): PACS 0.743 / 0.835 multi, "
              "0.734 / 0.900 single with one prototype per class; with the hybrid default scoring of 2026-11-27 (hybrid support "
              "references, section *Support images as class references*) 0.764 / 0.769. "
              "Before, on 2026-11-27, it was the same recipe on Lite0 (0.687 / 0.883, 0.698 / 0.890). "
              "Runs of 2026-11-26 were scored on PACS with the "
              "multi-source support centred on its pooled mean (the benchmark now normalises each "
              "source domain on its own, as in training).", "",
              "What we saw (all runs 400 steps x 512 pairs, seed 0, one run each: differences of ~0.01 "
              "are within noise):",
              "- The paper's module trained from scratch on these features generalises poorly to held-out "
              "classes (val ~0.55 vs 0.84 for cosine) and collapses below chance in the single-source "
              "setting (0.39), as the issue warned; L2 normalisation and stylised views alone do not fix it.",
              "- The cosine skip (training starts from the cosine detector) keeps validation at the cosine "
              "level; alone it does not beat cosine on PACS.",
              "- Transductive per-domain normalisation is what moves the numbers: centring took "
              "single-source from 0.53 to 0.71; standardising (mean and std per dimension) is the best "
              "rule on the proxy (multi 0.757 / single 0.716 for plain cosine, vs 0.747 / 0.704 centred).",
              "- Proxy validation (2026-11-27): in every run the proxy peaks at step 50-100 and then "
              "declines (e.g. 0.742 -> 0.68 at step 400), whatever the regularisation (lr 1e-4, input "
              "dropout 0.3 + weight decay 0.05, width 64 x 2 blocks, half of the pairs cross-domain). "
              "All standardised runs tie on the proxy (0.7366-0.7368 with max-logit): the module does not "
              "learn a similarity that transfers to held-out classes beyond the cosine it starts from, "
              "and the chosen step ranks PACS images exactly as standardised cosine does.",
              "- Max-logit normality beats the paper's max-softmax on the proxy for every checkpoint "
              "(+0.013 to +0.014 mean proxy AUROC).",
              "- 100 images per class (2026-11-27): all 100 images of every training class (twice the reference photos) "
              "change nothing: the proxy again peaks at the start (0.742) and declines to 0.721 at "
              "step 400, and ties the shipped run (0.7366 vs 0.7368 with max-logit); not adopted "
              "(rule written down before the run: adopt only above 0.7368 + 0.002).",
              "- Backbones (2026-11-27, section *Backbones*): the same recipe on EfficientNet-Lite1 "
              "features reaches proxy 0.7404 with max-logit (Lite0: 0.7366), and on Lite0+Lite1 "
              "concatenated 0.7497; each passed the rule written before its run (beat the "
              "checkpoint before it by more than 0.002), and the Lite0+Lite1 run ships. Its PACS columns "
              "here (max-softmax, best step by the softmax proxy: step 50) are 0.735 / 0.737; the "
              "shipped regeneration selects its step with its own max-logit normality (step 200) "
              "and gives 0.743 / 0.734 with the default scoring, about +0.01 over standardised "
              "cosine on the same features in both settings: the first checkpoint here whose "
              "ranking differs measurably from its cosine start. Half of the pairs cross-domain "
              "on Lite0+Lite1 ties it exactly (proxy 0.7497, same best step 50): not adopted "
              "(rule: above 0.7497 + 0.002).",
              "- Lite0+Lite1+Lite2 (2026-11-27): the recipe on Lite0+Lite1+Lite2 (3840-d), once the Lite2 features of "
              "Tiny-ImageNet were cached (its train s include that extraction), reaches proxy 0.7552 "
              "with max-logit and passed the rule "
              "written before the run (above 0.7497 + 0.002). Its regeneration as the shipped "
              "checkpoint (best step 50 by the max-logit proxy) gave PACS, default scoring, multi "
              "0.730 / 0.849 (Art 0.664, Sketch 0.714, Cartoon 0.726, Photo 0.814) and single "
              "0.760 / 0.887: the same numbers as standardised cosine on those features. Sketch "
              "is more than 0.03 below its Lite0 cosine baseline (0.749), which issue 4 forbids, "
              "so it was vetoed, as the prototype refinement was: the Lite0+Lite1 checkpoint "
              "stays. The proxy averages both settings; PACS gained single-source (+0.026) and "
              "lost multi-source (-0.013).",
              "- Nothing here reaches the multi-source target (0.78) with frozen backbones.",
              "- Fine-tuned backbones (2026-11-27, on a GPU): end-to-end fine-tuning of the backbones (section "
              "*End-to-end fine-tuned backbones*) reaches it: the shipped relational weights on "
              "the fine-tuned Lite0+Lite1 give PACS 0.812 / 0.830. Not run: longer relational "
              "schedules, a reference set with more classes.", "",
              f"Command: `{command}`  ", f"Machine: {machine()}"]
    return "\n".join(lines)


def _run_dir(out: Path, name: str) -> Path:
    for ch, rep in ((" ", "_"), ("/", "-"), ("(", ""), (")", ""), (",", ""), ("+", "")):
        name = name.replace(ch, rep)
    return out / name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="holds tiny_imagenet_200/, pacs/, pacs_lists/")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--only", nargs="*", default=None, help="run only these config names")
    p.add_argument("--steps", type=int, default=None, help="override steps of every config")
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.jsonl"
    done = {}
    if results_file.exists():
        for line in results_file.read_text().splitlines():
            r = json.loads(line)
            done[r["name"]] = r
    names = args.only or list(CONFIGS)
    for name in names:
        if name not in CONFIGS:
            raise SystemExit(f"unknown config {name!r}; known: {list(CONFIGS)}")
        if name in done:
            continue
        kw = dict(CONFIGS[name])
        if args.steps:
            kw["steps"] = args.steps
        run_dir = _run_dir(out, name)
        c = TrainConfig(data=str(Path(args.data_root) / "tiny_imagenet_200" / "train"),
                        out=str(run_dir), **kw)
        t0 = time.perf_counter()
        summary = train(c, resume=True, progress=True)
        secs = time.perf_counter() - t0
        pacs = evaluate_pacs(str(run_dir / "best.safetensors"), args.data_root)
        r = {"name": name, "config": c.to_dict(), "val": summary["best_val_auroc"],
             "pacs": pacs, "seconds": secs}
        with open(results_file, "a") as fh:
            fh.write(json.dumps(r) + "\n")
        done[name] = r
        m, s = pacs["pacs-multi"]["avg"], pacs["pacs-single"]["avg"]
        print(f"{name}: val {r['val']:.3f}  multi {m['auroc']:.3f}/{m['fpr95']:.3f}  "
              f"single {s['auroc']:.3f}/{s['fpr95']:.3f}", flush=True)
    rows = [done[n] for n in CONFIGS if n in done and (not args.only or n in args.only
                                                       or not args.no_write)]
    for r in rows:  # derived scores, kept beside each run (runs may execute in parallel)
        dfile = _run_dir(out, r["name"]) / "derived.json"
        derived = json.loads(dfile.read_text()) if dfile.exists() else {}
        if "val_common" not in derived:
            derived["val_common"] = common_validation(_run_dir(out, r["name"]), args.data_root)
        if "proxy" not in derived and (r["config"].get("val_protocol") == "proxy"
                                       or r["name"] in PROXY_ALSO):
            derived["proxy"] = proxy_score(_run_dir(out, r["name"]), args.data_root)
        tmp = dfile.with_suffix(".tmp")
        tmp.write_text(json.dumps(derived))
        tmp.replace(dfile)
        r.update(derived)
    cmd = "python benchmarks/pretrain_ablation.py --data-root ../shared/data"
    md = table(rows, cmd)
    print(md)
    if not args.no_write:
        update_section("pretrain-ablation", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
