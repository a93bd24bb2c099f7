"""The deploy routes on real photos: one decision whichever way a user scores.

    RESEND_CACHE=DIR python benchmarks/deploy_routes.py --data-root ../shared/data

flowers12: 6 known species x 10 support images (train split), 60 known + 60 unknown test images
(10 per species of the test split), linked into a temporary folder. The shipped default is run
through every route a user has, with the command-line interface in this process:

- per image: ``resend score --support --per-image``; ``resend fit`` (transductive) then
  ``resend score --detector --per-image``; ``resend fit --per-image`` then ``resend score
  --detector``; ``resend score --detector --watch -`` (image paths on stdin); Python
  ``load_detector(...).set_policy(True).predict(paths, names=True)``;
- transductive: ``resend score --support``; ``resend fit`` then ``resend score --detector``;
  Python ``load_detector(...).predict(paths, names=True)``.

For each route the table gives the threshold, the known test images accepted (asked: 95%), the
unknowns rejected and whether its predictions equal those of the first route of its policy.
Writes section ``deploy-routes`` of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from _report import load_note, machine, update_section

from resend_novelty.cli.main import main as resend_main
from resend_novelty.detectors import load_detector

KNOWN, UNKNOWN_SPECIES, SHOTS, PER_CLASS = 6, 6, 10, 10


def build_case(data_root: Path, work: Path, seed: int = 0) -> tuple[Path, Path, set]:
    """``(support, test, known species)``: links to the flowers12 images (module doc)."""
    rng = np.random.default_rng(seed)
    species = sorted(p.name for p in (data_root / "flowers12" / "train").iterdir() if p.is_dir())
    order = rng.permutation(species)
    known = set(order[:KNOWN])
    for name in order[:KNOWN + UNKNOWN_SPECIES]:
        if name in known:
            imgs = sorted((data_root / "flowers12" / "train" / name).iterdir())
            for p in rng.choice(imgs, SHOTS, replace=False):
                _link(p, work / "support" / name / p.name)
        imgs = sorted((data_root / "flowers12" / "test" / name).iterdir())
        for p in rng.choice(imgs, PER_CLASS, replace=False):
            _link(p, work / "test" / name / p.name)
    return work / "support", work / "test", known


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src.resolve(), dst)


def _run(*argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = resend_main([*map(str, argv), "--quiet"])
    if rc != 0:
        raise SystemExit(f"resend {' '.join(map(str, argv))} failed: {err.getvalue()}")
    return rc, err.getvalue()


def _csv(path: Path) -> dict:
    with open(path, newline="") as fh:
        return {r["path"]: r["prediction"] for r in csv.DictReader(fh)}


def _threshold(folder: Path) -> float:
    return json.loads((folder / "summary.json").read_text())["threshold"]


def run(data_root: Path, work: Path) -> list[dict]:
    sup, test, known = build_case(data_root, work)
    paths = sorted(str(p) for p in test.rglob("*") if p.is_file() or p.is_symlink())
    paths = [p for p in paths if not Path(p).is_dir()]
    out = work / "out"
    rows = []

    def add(policy, route, preds, threshold):
        rows.append({"policy": policy, "route": route, "preds": preds, "threshold": threshold})

    # per image
    _run("score", "--support", sup, "--test", test, "--per-image", "--out", out / "a",
         "--no-plots", "--no-html")
    add("per image", "`score --support --per-image`", _csv(out / "a" / "scores.csv"),
        _threshold(out / "a"))
    _run("fit", "--support", sup, "--out", out / "t.safetensors")
    _run("score", "--detector", out / "t.safetensors", "--test", test, "--per-image", "--out",
         out / "b", "--no-plots", "--no-html")
    add("per image", "`fit`, then `score --detector --per-image`", _csv(out / "b" / "scores.csv"),
        _threshold(out / "b"))
    _run("fit", "--support", sup, "--out", out / "p.safetensors", "--per-image")
    _run("score", "--detector", out / "p.safetensors", "--test", test, "--out", out / "c",
         "--no-plots", "--no-html")
    add("per image", "`fit --per-image`, then `score --detector`", _csv(out / "c" / "scores.csv"),
        _threshold(out / "c"))
    stdin = sys.stdin
    sys.stdin = io.StringIO("".join(p + "\n" for p in paths))
    try:
        _run("score", "--detector", out / "t.safetensors", "--watch", "-", "--out", out / "d")
    finally:
        sys.stdin = stdin
    add("per image", "`fit`, then `score --detector --watch -`", _csv(out / "d" / "scores.csv"),
        None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = load_detector(out / "t.safetensors", progress=False).set_policy(True)
        add("per image", "Python: `load_detector`, `set_policy(True)`, `predict(names=True)`",
            dict(zip(paths, det.predict(paths, names=True))), det.threshold_)
    # transductive
    _run("score", "--support", sup, "--test", test, "--out", out / "e", "--no-plots", "--no-html")
    add("transductive", "`score --support`", _csv(out / "e" / "scores.csv"), _threshold(out / "e"))
    _run("score", "--detector", out / "t.safetensors", "--test", test, "--out", out / "f",
         "--no-plots", "--no-html")
    add("transductive", "`fit`, then `score --detector`", _csv(out / "f" / "scores.csv"),
        _threshold(out / "f"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = load_detector(out / "t.safetensors", progress=False)
        add("transductive", "Python: `load_detector`, `predict(names=True)`",
            dict(zip(paths, det.predict(paths, names=True))), None)
    for r in rows:
        is_known = np.array([Path(p).parent.name in known for p in paths])
        pred = np.array([r["preds"][p] for p in paths])
        r["known_accepted"] = float((pred[is_known] != "unknown").mean())
        r["unknown_rejected"] = float((pred[~is_known] == "unknown").mean())
        first = next(x for x in rows if x["policy"] == r["policy"])
        r["same"] = all(r["preds"][p] == first["preds"][p] for p in paths)
    return rows


def render(rows: list[dict], seconds: float) -> str:
    lines = [
        "## Deploy routes on real photos: the same decision on every route",
        "",
        f"flowers12, {KNOWN} known species x {SHOTS} support images, {KNOWN * PER_CLASS} known + "
        f"{UNKNOWN_SPECIES * PER_CLASS} unknown test images; the shipped default, threshold "
        "for 95% recall of the known (support leave-one-out, calibrated for the policy in use; "
        "transductive thresholds read again on a batch the shift gate pools). *same*: the "
        "predictions equal those of the first route of the policy, image by image.",
        "",
        "| policy | route | threshold | known accepted | unknowns rejected | same |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = "-" if r["threshold"] is None else f"{r['threshold']:.4g}"
        lines.append(f"| {r['policy']} | {r['route']} | {t} | {r['known_accepted']:.3f} | "
                     f"{r['unknown_rejected']:.3f} | {'yes' if r['same'] else '**no**'} |")
    lines += ["",
              "Command: `RESEND_CACHE=DIR python benchmarks/deploy_routes.py --data-root "
              "../shared/data`  ",
              f"Machine: {machine()}; {seconds:.0f} s with cached features."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", default="../shared/data", type=Path)
    ap.add_argument("--no-write", action="store_true", help="print, do not touch BENCHMARKS.md")
    args = ap.parse_args(argv)
    print(load_note(), file=sys.stderr)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args.data_root.resolve(), Path(tmp))
    md = render(rows, time.time() - t0)
    print(md)
    if not args.no_write:
        update_section("deploy-routes", md)
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
