"""How the support images become class references: proxy (selection) and PACS (test) (issue 4).

Candidates of 2026-11-27, each on the shipped relational checkpoint and changing only how the support
of a class is compared with a test image ``x`` (the issue's "multiple prototypes per class"):

- **one prototype per class** (the default until 2026-11-27; mean support feature): u_c =
  logit(x, prototype_c).
- **neighbours (k=10)**: u_c = mean logit of ``x`` with the 10 support images of class c nearest
  to it by cosine (the library's ``neighbors=10``). On PACS it is the relational counterpart of
  the kNN baseline, which leads multi-source scoring there (section *Scoring rules*).
- **hybrid (0.5)**: u_c = 0.5 * the prototype logit + 0.5 * the neighbours logit (the library's
  ``neighbors=10, neighbor_weight=0.5``). The weight was fixed at 0.5 before any number.
- **per-domain prototypes**: in a multi-source support, one prototype per (class, source
  domain); u_c = the mean of the logits of ``x`` with the prototypes of class c. A single-source
  support has one domain, so this equals one prototype per class there.

Rule (written down on 2026-11-27 before any number of these candidates): make a candidate the
default only if its selection-proxy mean (6 known + 1 unknown class, seed 0, 50 episodes) beats
the first row (one prototype per class) by more than 0.002, and again on fresh episodes (seed 1,
200 episodes, run only for a candidate that passes the first test). PACS is computed after and
can only veto.

    python benchmarks/support_modes.py --data-root ../shared/data [--model PATH]

Writes the ``support-modes`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

from _report import machine, update_section

from resend_novelty.backbones import build_backbone
from resend_novelty.detectors import ReSeNDDetector
from resend_novelty.evaluation import evaluate_proxy, load_proxy_set, run_benchmark
from resend_novelty.models import load_checkpoint

import numpy as np
import torch


MARGIN = 0.002


class PerDomainReSeND(ReSeNDDetector):
    """One prototype per (class, source domain) of a multi-source support; u_c = mean logit with
    the prototypes of class c. Without ``domains``: one prototype per class."""

    def fit_features(self, features, labels, domains=None):
        super().fit_features(features, labels, domains=domains)
        self._domain_protos = None
        if domains is not None:
            f, labels, domains = self.support_features_, np.asarray(labels), np.asarray(domains)
            protos, owner = [], []
            for k, c in enumerate(self.classes_):
                for d in np.unique(domains[labels == c]):
                    rows = torch.as_tensor((labels == c) & (domains == d))
                    protos.append(f[rows].mean(0))
                    owner.append(k)
            self._domain_protos, self._owner = torch.stack(protos), torch.as_tensor(owner)
        return self

    @torch.inference_mode()
    def similarities_features(self, features, prototypes=None, neighbors=None):
        if self._domain_protos is None:
            return super().similarities_features(features, prototypes, neighbors)
        model = self.model.to(self.device)
        u = model.pairwise_logits(features, self._domain_protos.to(self.device),
                                  self.chunk_pairs or 4096).float().cpu()
        out = torch.zeros(len(features), len(self.classes_)).index_add_(1, self._owner, u)
        return out / torch.bincount(self._owner, minlength=len(self.classes_)).float()


def model_key(model) -> str:
    """What the rows depend on: the weights, the architecture and the normality - not the
    checkpoint's default ``neighbors`` (every row passes its own)."""
    cfg = {**model.config.to_dict(), "normality": model.scoring.normality}
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def candidates(model):
    # explicit neighbors= on every row: the rows do not depend on the checkpoint's defaults
    return [
        ("one prototype per class (default until 2026-11-27)", ReSeNDDetector, {"neighbors": 0}),
        ("hybrid (0.5 prototype + 0.5 neighbours, k=10)", ReSeNDDetector,
         {"neighbors": 10, "neighbor_weight": 0.5}),
        ("neighbours (k=10)", ReSeNDDetector, {"neighbors": 10, "neighbor_weight": 1.0}),
        ("per-domain prototypes (multi-source)", PerDomainReSeND, {"neighbors": 0}),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="holds tiny_imagenet_200/, pacs/, pacs_lists/")
    p.add_argument("--model", default=None, help="relational checkpoint (default: the shipped one)")
    p.add_argument("--episodes", type=int, default=50, help="proxy episodes per setting")
    p.add_argument("--no-pacs", action="store_true", help="proxy only (selection numbers)")
    p.add_argument("--results", default="runs/support_modes/results.json",
                   help="every number is stored here as soon as it is measured (keyed by the "
                   "checkpoint's SHA-256): a rerun or an interrupted run reuses them")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)

    t_all = time.perf_counter()
    model = load_checkpoint(args.model)
    name = Path(args.model).name if args.model else "the shipped checkpoint"
    bb = build_backbone(model.config.backbone)
    ps = load_proxy_set(str(Path(args.data_root) / "tiny_imagenet_200" / "train"), 30, 0,
                        backbone=bb)
    lines = [
        "## Support images as class references: prototypes, neighbours, per-domain (issue 4)",
        "",
        f"Relational model: {name} ({model.config.backbone} features, normality "
        f"{model.scoring.normality}). Each row changes only how the support images of a class are "
        "compared with a test image (script docstring). Rule fixed on 2026-11-27 before any number: adopt a "
        f"candidate only if its proxy mean beats the first row by more than {MARGIN}, then again "
        "on fresh episodes (seed 1, 200 episodes). Proxy: the selection proxy, "
        f"{args.episodes} episodes, 6 known + 1 unknown class. PACS: the default `resend "
        "benchmark` protocol, computed after.",
        "",
        "| candidate | proxy multi | proxy single | proxy mean | passes the rule | PACS multi AUROC / FPR95 (Art / Sketch / Cartoon / Photo) | PACS single AUROC / FPR95 |",
        "|---|---|---|---|---|---|---|",
    ]
    # every measured number is kept in --results as soon as it exists: an interrupted run resumes
    key = model_key(model)
    res_file = Path(args.results)
    store = json.loads(res_file.read_text()) if res_file.exists() else {}
    done = store.setdefault(key, {})

    def measured(what, fn):
        if what not in done:
            done[what] = fn()
            res_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = res_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(store, indent=1))
            tmp.replace(res_file)
        return done[what]

    def proxy(make, seed, n):
        r = evaluate_proxy(make, ps, n_episodes=n, seed=seed)
        return [r["multi"]["avg"]["auroc"], r["single"]["avg"]["auroc"]]

    def makers(cls, kw):
        return lambda backbone=None: cls(model=model, backbone=backbone, progress=False, **kw)

    # 1. selection: proxy only, then fresh episodes for the candidates that pass
    rows, base, confirm = [], None, []
    for label, cls, kw in candidates(model):
        t0 = time.perf_counter()
        pm, pss = measured(f"proxy|{label}|0|{args.episodes}", lambda: proxy(makers(cls, kw), 0,
                                                                             args.episodes))
        mean = (pm + pss) / 2
        first = base is None
        base = mean if first else base
        verdict = "-" if first else ("yes" if mean > base + MARGIN else "no")
        rows.append([label, cls, kw, pm, pss, mean, verdict])
        print(f"{label}: proxy {pm:.4f} / {pss:.4f} mean {mean:.4f} {verdict} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if verdict == "yes":  # fresh episodes right away (the decision needs them first)
            for r in ([rows[0]] if not confirm else []) + [rows[-1]]:
                cm, cs = measured(f"proxy|{r[0]}|1|200",
                                  lambda: proxy(makers(r[1], r[2]), 1, 200))
                confirm.append((r[0], cm, cs))
                print(f"fresh episodes, {r[0]}: {cm:.4f} / {cs:.4f} mean {(cm + cs) / 2:.4f}",
                      flush=True)
    # 2. test: PACS, after every choice
    for r in rows:
        cells = ["-", "-"]
        if not args.no_pacs:
            def pacs(cls=r[1], kw=r[2]):
                out = {}
                for s in ("pacs-multi", "pacs-single"):
                    res = run_benchmark(s, args.data_root, lambda: makers(cls, kw)(backbone=bb),
                                        progress=False)
                    out[s] = {"avg": res["avg"],
                              "targets": {t: v["auroc"] for t, v in res["targets"].items()}}
                return out
            res = measured(f"pacs|{r[0]}", pacs)
            m, si = res["pacs-multi"], res["pacs-single"]
            per = " / ".join(f"{v:.3f}" for v in m["targets"].values())
            cells = [f"{m['avg']['auroc']:.3f} / {m['avg']['fpr95']:.3f} ({per})",
                     f"{si['avg']['auroc']:.3f} / {si['avg']['fpr95']:.3f}"]
        lines.append(f"| {r[0]} | {r[3]:.4f} | {r[4]:.4f} | {r[5]:.4f} | {r[6]} | "
                     + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    if confirm:
        lines += ["", "**Fresh proxy episodes** (seed 1, 200 episodes):", ""]
        base2 = (confirm[0][1] + confirm[0][2]) / 2
        for i, (label, cm, cs) in enumerate(confirm):
            mean = (cm + cs) / 2
            verdict = "" if i == 0 else (" - passes" if mean > base2 + MARGIN else " - fails")
            lines.append(f"- {label}: multi {cm:.4f}, single {cs:.4f}, mean {mean:.4f}{verdict}")
    lines += ["", READING, "",
              "Command: `python benchmarks/support_modes.py --data-root ../shared/data`  ",
              f"Machine: {machine()}; wall time of this invocation "
              f"{time.perf_counter() - t_all:.0f} s (features from the cache; numbers already in "
              "`--results` are reused, not re-measured: the run that measured them took 2229 s)."]
    md = "\n".join(lines)
    print(md)
    if not args.no_write:
        update_section("support-modes", md)
    return 0


READING = (
    "Reading (2026-11-27). On the shipped Lite0+Lite1 checkpoint the hybrid passed both tests "
    "(proxy 0.7559 vs 0.7519; fresh episodes 0.7613 vs 0.7586) and became the default scoring "
    "(`neighbors=10, neighbor_weight=0.5` stored in the checkpoint's config; "
    "src/resend_novelty/training/shipped_recipe.json). Neighbours alone and per-domain prototypes lose on the "
    "proxy. PACS, computed after: the hybrid gives multi 0.764 / 0.840 and single 0.769 / 0.884 "
    "(one prototype: 0.743 / 0.835 and 0.734 / 0.900); every multi-source target stays above "
    "the issue's floors (Sketch 0.742 vs 0.719). Neighbours alone are stronger on the PACS Art "
    "target and on single-source but weaker on Sketch, as the kNN baseline was; the proxy "
    "preferred the mix. On the vetoed Lite0+Lite1+Lite2 checkpoint (*Pretraining ablations*) "
    "the hybrid also passed the first test (0.7584 vs 0.7552). Cost: about 11x the pairs of "
    "one prototype per class (10 neighbours + the prototype per class).")


if __name__ == "__main__":
    raise SystemExit(main())
