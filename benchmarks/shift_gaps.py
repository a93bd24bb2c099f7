"""Support-test gaps of the shift gate on the data here: which shifts the default pools.

    RESEND_CACHE=... python benchmarks/shift_gaps.py --data-root ../shared/data

The shift gate (``ScoringConfig.shift_threshold``, docs/scoring.md) pools the statistics of
support and test when g = 1 - cos(mean unit support feature, mean unit test feature) is at most
the threshold (:func:`resend_novelty.transforms.shift_gap`). This script measures g, on the
features of the shipped backbones (cached), for

- every pair of PACS domains (all images of one domain as the support, all of the other as the
  test);
- the held-out Tiny-ImageNet photos against their stylised views (the suite's biased cells);
- the episodes of the suite's intra-domain cells (no shift; seed 0, 10 episodes, support 10 and
  all): mean and largest g, which the unknown classes of each episode make non-zero;

and writes the section ``shift-gaps`` of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _report import machine, update_section
from generalisation import FT, IN, cells, episodes_of

from resend_novelty.backbones import build_backbone
from resend_novelty.evaluation import PACS_DOMAINS, TINY_STYLES, load_pools
from resend_novelty.models import load_checkpoint
from resend_novelty.transforms import mean_direction, shift_gap


def domain_gaps(features: torch.Tensor, domain: np.ndarray, names) -> list[list[float]]:
    """g of each (support domain, test domain) pair of ``names``: all rows of each."""
    rows = {d: features[torch.as_tensor(domain == d)] for d in names}
    return [[shift_gap(mean_direction(rows[s]), rows[t]) for t in names] for s in names]


def episode_gaps(pools, n: int, seed: int) -> list[tuple[str, str, float, float]]:
    """(cell label, support, mean g, largest g) over the episodes of the intra-domain cells."""
    out = []
    for cell in cells(False):
        if cell["kind"] != "intra" or cell["share"] is not None or cell["support"] not in (10, None):
            continue
        (pool, _, eps), = episodes_of(cell, pools, None, n, seed)
        f = pool.features[FT]
        g = [shift_gap(mean_direction(f[ep.support]), f[ep.test]) for ep in eps]
        out.append((cell["label"], "all" if cell["support"] is None else str(cell["support"]),
                    float(np.mean(g)), float(np.max(g))))
    return out


def section(pacs, tiny, episodes, threshold: float, n: int, seed: int) -> str:
    def mark(g):
        g = max(g, 0.0)  # rounding: the gap of a set to itself is 0, not -0.000
        return f"**{g:.3f}**" if g > threshold else f"{g:.3f}"
    lines = ["## Shift gaps on the data here", "",
             f"The gap g = 1 - cos(mean unit support feature, mean unit test feature) of the shift "
             f"gate, on the shipped backbones' features. The default pools the statistics of "
             f"support and test when g <= {threshold} (docs/scoring.md); **bold**: above it (each "
             "domain its own statistics).", "",
             "PACS, all images of the support domain (rows) against all of the test domain "
             "(columns):", "",
             "| support \\ test | " + " | ".join(PACS_DOMAINS) + " |",
             "|---|" + "---|" * len(PACS_DOMAINS)]
    for d, row in zip(PACS_DOMAINS, pacs):
        lines.append(f"| {d} | " + " | ".join(mark(g) for g in row) + " |")
    lines += ["", "Held-out Tiny-ImageNet photos against their stylised views (the styles the "
              "fine-tuning trains on): " + ", ".join(f"{s} {mark(g)}" for s, g in tiny) + ".",
              "", f"Intra-domain suite episodes (no shift; {n} episodes, seed {seed}; half the "
              "test classes unknown in flowers12 and Tiny-ImageNet, 4 of 7 in the PACS domains):", "",
              "| cell | support / class | mean g | largest g |", "|---|---|---|---|"]
    lines += [f"| {label} | {sup} | {m:.3f} | {mark(x)} |" for label, sup, m, x in episodes]
    lines += ["", "Command: `python benchmarks/shift_gaps.py --data-root ../shared/data`  ",
              f"Machine: {machine()}; features from the feature cache."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True)
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    args = p.parse_args(argv)
    threshold = load_checkpoint(None).scoring.shift_threshold
    pools = load_pools(args.data_root, {FT: build_backbone(FT)}, {IN: build_backbone(IN)})
    pacs = domain_gaps(pools["pacs"].features[FT], pools["pacs"].domain, PACS_DOMAINS)
    t = pools["tiny"]
    photo = t.features[FT][torch.as_tensor(t.domain == "photo")]
    tiny = [(s, shift_gap(mean_direction(photo), t.features[FT][torch.as_tensor(t.domain == s)]))
            for s in TINY_STYLES]
    md = section(pacs, tiny, episode_gaps(pools, args.episodes, args.seed), threshold,
                 args.episodes, args.seed)
    if not args.no_write:
        update_section("shift-gaps", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
