"""Part f of ``benchmarks/speed.py``: scoring cost at many classes with candidate classes
(``ReSeNDDetector(candidates=M)``, issue 24), and the accuracy of the shortcut on PACS.

Rule for the default M, fixed on 2026-12-01 before any measurement: the default ``ScoringConfig.candidates``
is the smallest M in (3, 5, 10, 20) whose AUROC differs from exact scoring (``candidates=0``)
by at most 0.002 on EVERY target of pacs-multi and pacs-single (shipped model, its own scoring
otherwise, features from the cache). PACS has 6 known classes, so M >= 6 is exact there by
construction and the check only discriminates M = 3 and 5. Targets of the cost curve: at 1,000
classes x 20 support images, default scoring <= 5 ms per test image on 2 CPU cores (features
given) and per-image time from 100 to 1,000 classes growing by less than 2x.

Cost curve: synthetic clustered features of the shipped model's ``feature_dim`` (timing only),
classes x support images per class over the grid of ``--f-grid``; for each point the fit time
(support tokens and index included), the per-test-image time of ``score_features`` on
``--f-test`` test features in one call (the fastest of ``--f-repeats``), and the peak RSS during
fit + scoring (:class:`~resend_novelty.report.PeakMemory`). Exact scoring is timed too up to
``--f-exact-max`` classes (it grows linearly with the classes).
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from resend_novelty.backbones import build_backbone
from resend_novelty.detectors import ReSeNDDetector, build_detector
from resend_novelty.evaluation import intra_episodes, load_pools, run_benchmark, score_episodes
from resend_novelty.models import ScoringConfig, load_checkpoint
from resend_novelty.report import PeakMemory

__all__ = ["part_f", "format_f", "DEFAULT_GRID", "RULE_CANDIDATES", "RULE_TOLERANCE"]

DEFAULT_GRID = ((6, 20), (25, 20), (100, 20), (1000, 20), (1000, 1), (1000, 5), (1000, 100))
RULE_CANDIDATES = (3, 5, 10, 20)
RULE_TOLERANCE = 0.002
SETTINGS = ("pacs-multi", "pacs-single")
# the selection suite's cells with more known classes than the smallest M (benchmarks/
# generalisation.py): the shortcut can only change a score where it drops a class. The issue
# asks for <= RULE_TOLERANCE on PACS *and* the suite; the rule's M is the smallest of
# RULE_CANDIDATES that passes both (this extension was fixed on 2026-12-01 before any suite number of it)
SUITE_CELLS = (
    ("flowers12, 6 known / 6 unknown, support 10", "flowers12",
     dict(n_known=6, n_unknown=6, support=10, test_per_class=10)),
    ("Tiny-ImageNet held-out photo, 5 / 5, support 10", "tiny",
     dict(n_known=5, n_unknown=5, support=10, test_per_class=10, support_domain="photo",
          test_domain="photo")),
    ("Tiny-ImageNet held-out photo, 10 / 10, all support", "tiny",
     dict(n_known=10, n_unknown=10, support=None, support_domain="photo", test_domain="photo")),
)
SUITE_EPISODES = 10


def _synthetic(n_classes: int, per_class: int, n_test: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_classes, dim, generator=g)
    support = centers.repeat_interleave(per_class, 0) + torch.randn(n_classes * per_class, dim,
                                                                    generator=g)
    pick = torch.randint(0, n_classes, (n_test,), generator=g)
    test = centers[pick] + torch.randn(n_test, dim, generator=g)
    return support, np.repeat(np.arange(n_classes), per_class), test


def time_point(model, device, n_classes: int, per_class: int, n_test: int, candidates,
               repeats: int) -> dict:
    """Fit + score one synthetic support set; per-image time and peak RSS."""
    support, labels, test = _synthetic(n_classes, per_class, n_test, model.config.feature_dim)
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        det = ReSeNDDetector(model=model, backbone=None, device=device, progress=False,
                             candidates=candidates).fit_features(support, labels)
        fit_s = time.perf_counter() - t0
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            det.score_features(test)
            best = min(best, time.perf_counter() - t0)
    scored = min(det.candidates or n_classes, n_classes)  # classes through the module
    refs = (0 if det.neighbor_weight >= 1 and det.neighbors else 1) + min(det.neighbors or 0,
                                                                          per_class)
    return {"classes": n_classes, "per_class": per_class, "support": len(labels),
            "candidates": det.candidates, "pairs_per_image": scored * refs,
            "cosine_macs_per_image": (len(labels) + n_classes) * model.config.feature_dim, "fit_s": fit_s, "ms_per_image": 1e3 * best / n_test,
            "peak_rss_mb": mem.rss_mb, "start_rss_mb": mem.start_mb, "gpu_mb": mem.gpu_mb}


def accuracy(model, data_root, ms: tuple[int, ...], progress: bool) -> dict:
    """AUROC per target of the PACS settings, exact (M = 0) and with each M."""
    backbone = build_backbone(model.config.backbone)
    out = {}
    for name in SETTINGS:
        for m in (0, *ms):
            t0 = time.perf_counter()
            r = run_benchmark(name, data_root, lambda: build_detector(
                "resend", model=model, backbone=backbone, progress=False, candidates=m),
                progress=progress)
            out[f"{name}|{m}"] = {"targets": {t: v["auroc"] for t, v in r["targets"].items()},
                                  "avg": r["avg"]["auroc"], "wall_s": time.perf_counter() - t0}
            print(f"  {name} M={m}: avg AUROC {r['avg']['auroc']:.4f}", flush=True)
    return out


def suite_accuracy(model, data_root, ms: tuple[int, ...], episodes: int = SUITE_EPISODES
                   ) -> dict:
    """Mean AUROC over seeded episodes of :data:`SUITE_CELLS`, exact (M = 0) and with each M."""
    name = model.config.backbone
    pools = load_pools(data_root, {name: build_backbone(name)}, progress=False)
    out = {}
    for label, pool_name, kw in SUITE_CELLS:
        pool = pools[pool_name]
        eps = intra_episodes(pool, n_episodes=episodes, seed=0, **kw)
        for m in (0, *ms):
            scores = score_episodes(lambda m=m: build_detector(
                "resend", model=model, backbone=None, progress=False, device="cpu",
                candidates=m), pool.features[name], pool.labels, eps)
            out[f"{label}|{m}"] = {"auroc": scores}
            print(f"  {label} M={m}: mean AUROC {np.mean(scores):.4f}", flush=True)
    return out


def suite_max_diff(acc: dict, m: int) -> float:
    """Largest |mean AUROC - exact mean AUROC| over the suite cells."""
    return max(abs(np.mean(acc[f"{label}|{m}"]["auroc"]) - np.mean(acc[f"{label}|0"]["auroc"]))
               for label, _, _ in SUITE_CELLS)


def max_diff(acc: dict, m: int) -> float:
    return max(abs(acc[f"{s}|{m}"]["targets"][t] - v)
               for s in SETTINGS for t, v in acc[f"{s}|0"]["targets"].items())


def part_f(device: torch.device, data_root, grid=DEFAULT_GRID, n_test: int = 200,
           repeats: int = 2, exact_max: int = 100, accuracy_check: bool = True,
           progress: bool = False) -> dict:
    model = load_checkpoint(None).eval()
    res: dict = {"default_m": ScoringConfig().candidates, "scoring": model.scoring.to_dict(),
                 "feature_dim": model.config.feature_dim, "n_test": n_test, "points": []}
    if accuracy_check:
        acc = accuracy(model, data_root, RULE_CANDIDATES[:2], progress)
        res["accuracy"] = acc
        res["max_diff"] = {m: (max_diff(acc, m) if f"{SETTINGS[0]}|{m}" in acc else 0.0)
                           for m in RULE_CANDIDATES}
        suite = suite_accuracy(model, data_root, RULE_CANDIDATES[:2])
        res["suite_accuracy"] = suite
        res["suite_max_diff"] = {m: suite_max_diff(suite, m) for m in RULE_CANDIDATES[:2]}
        res["rule_m"] = next((m for m in RULE_CANDIDATES
                              if res["max_diff"][m] <= RULE_TOLERANCE
                              and res["suite_max_diff"].get(m, 0.0) <= RULE_TOLERANCE), None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, per in grid:
            for cand in ((None, 0) if k <= exact_max else (None,)):
                p = time_point(model, device, k, per, n_test, cand, repeats)
                p["mode"] = "exact" if cand == 0 else "default"
                res["points"].append(p)
                print(f"  {k} classes x {per}: {p['mode']} {p['ms_per_image']:.2f} ms/image, "
                      f"fit {p['fit_s']:.1f} s, peak RSS {p['peak_rss_mb']:.0f} MB", flush=True)
    default = {(p["classes"], p["per_class"]): p for p in res["points"] if p["mode"] == "default"}
    if (1000, 20) in default:
        res["target_ms"] = default[(1000, 20)]["ms_per_image"]
    if (100, 20) in default and (1000, 20) in default:
        res["growth_100_1000"] = (default[(1000, 20)]["ms_per_image"]
                                  / default[(100, 20)]["ms_per_image"])
    return res


def format_f(res: dict, device: torch.device) -> str:
    s = res["scoring"]
    lines = [f"Shipped model (features {res['feature_dim']}-d, normality {s['normality']}, "
             f"neighbors {s['neighbors']}, neighbor_weight {s['neighbor_weight']}); default "
             f"candidates M = {res['default_m']} (`ScoringConfig.candidates`). Rule fixed on "
             f"2026-12-01, before measuring: the smallest M in {RULE_CANDIDATES} whose AUROC differs from exact "
             f"scoring by <= {RULE_TOLERANCE} on every PACS target (multi and single source) "
             "and on the selection suite's cells with more than 3 known classes; "
             "PACS has 6 known classes, so M >= 6 is exact there by construction.", ""]
    if "accuracy" in res:
        acc = res["accuracy"]
        lines += ["**Accuracy of the shortcut (PACS, cached features): AUROC per target**", "",
                  "| setting | M | " + " | ".join(["targets"]) + " | avg | max abs diff vs exact |",
                  "|---|---|---|---|---|"]
        for name in SETTINGS:
            for key in sorted((k for k in acc if k.startswith(name + "|")),
                              key=lambda k: int(k.split("|")[1])):
                m = int(key.split("|")[1])
                r = acc[key]
                cells = ", ".join(f"{t} {v:.4f}" for t, v in r["targets"].items())
                diff = "-" if m == 0 else f"{max(abs(v - acc[name + '|0']['targets'][t]) for t, v in r['targets'].items()):.4f}"
                lines.append(f"| {name} | {'exact' if m == 0 else m} | {cells} | "
                             f"{r['avg']:.4f} | {diff} |")
        suite = res.get("suite_accuracy", {})
        if suite:
            lines += ["", f"**Accuracy of the shortcut on the selection suite** (cells with more "
                      f"than 3 known classes, {SUITE_EPISODES} seeded episodes each, default "
                      "scoring, transductive; mean AUROC)", "",
                      "| cell | exact | " + " | ".join(f"M={m}" for m in RULE_CANDIDATES[:2])
                      + " |", "|---|---|" + "---|" * 2]
            for label, _, _ in SUITE_CELLS:
                lines.append(f"| {label} | " + " | ".join(
                    f"{np.mean(suite[f'{label}|{m}']['auroc']):.4f}"
                    for m in (0, *RULE_CANDIDATES[:2])) + " |")
            lines += ["", "Largest difference of a cell's mean AUROC from exact: " + ", ".join(
                f"M={m}: {d:.4f}" for m, d in res["suite_max_diff"].items()) + "."]
        lines += ["", "Largest per-target difference over both settings: " + ", ".join(
            f"M={m}: {d:.4f}" for m, d in res["max_diff"].items()) +
            f". Rule's choice: M = {res['rule_m']}.", ""]
    lines += [f"**Cost curve** (synthetic features, {res['n_test']} test features scored in one "
              "call; time per test image = the fastest of the repeats / test images; peak RSS of "
              "the process during fit + scoring, start = RSS before)", "",
              "| classes | support images / class | support images | scoring | relational pairs "
              "/ test image | cosine MMAC / test image | ms / test image | fit s | peak RSS MB "
              "(start) |", "|---|---|---|---|---|---|---|---|---|"]
    for p in res["points"]:
        mode = "exact" if p["mode"] == "exact" else f"default (M={p['candidates'] or 'all'})"
        lines.append(f"| {p['classes']} | {p['per_class']} | {p['support']} | {mode} | "
                     f"{p['pairs_per_image']} | {p['cosine_macs_per_image'] / 1e6:.1f} | "
                     f"{p['ms_per_image']:.2f} | {p['fit_s']:.2f} | {p['peak_rss_mb']:.0f} "
                     f"({p['start_rss_mb']:.0f}) |")
    if "target_ms" in res:
        lines += ["", f"Targets: 1,000 classes x 20, default: {res['target_ms']:.2f} ms per test "
                  f"image (target <= 5 on 2 CPU cores: "
                  f"{'met' if res['target_ms'] <= 5 else 'NOT met'} on this machine)"
                  + (f"; growth 100 -> 1,000 classes: {res['growth_100_1000']:.2f}x (target < 2: "
                     f"{'met' if res['growth_100_1000'] < 2 else 'NOT met'})"
                     if "growth_100_1000" in res else "") + "."]
    return "\n".join(lines)
