"""Regenerate the relational checkpoint shipped inside the package.

    python tools/make_shipped_checkpoint.py --data-root ../shared/data

Pretrains the recipe chosen by the ablation study (the recipes of
``resend_novelty.training.load_recipe``; chosen on held-out Tiny-ImageNet classes only, never on
PACS) on the Tiny-ImageNet reference set with frozen features of the recipe's backbone
(EfficientNet-Lite0 and Lite1, concatenated), keeps the best step by validation AUROC, applies
the scoring defaults chosen afterwards on the proxy (``"scoring"`` of
``resend_novelty.training.shipped_recipe()``: ``neighbors``, ``neighbor_weight``) to the model's
scoring, sets the backbone chosen afterwards (``"backbone"``), and writes
``src/resend_novelty/weights/resend_lite0_lite1.safetensors`` (fp16) with its SHA-256 beside it.
Same seed -> same weights on the same machine/torch build (CPU); numbers agree within noise
elsewhere. Interrupted runs resume (``runs/shipped_lite0_lite1``).

    python tools/make_shipped_checkpoint.py --rescore

rewrites the shipped file with the scoring and backbone of the shipped recipe and the weights
it already holds (no training: for a scoring default chosen after training).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from resend_novelty.backbones import build_backbone
from resend_novelty.integrity import sha256_file
from resend_novelty.models import SHIPPED_NAME, load_checkpoint, read_metadata, save_checkpoint
from resend_novelty.training import TrainConfig, load_recipe, shipped_recipe, train

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "src" / "resend_novelty" / "weights"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=None, help="holds tiny_imagenet_200/train")
    p.add_argument("--rescore", action="store_true",
                   help="no training: apply the shipped recipe's scoring and backbone to the "
                   "weights of the shipped file and rewrite it")
    p.add_argument("--config", default=None,
                   help="name of a recipe (resend_novelty.training.recipe_names(); default: the "
                   "one recorded in resend_novelty.training.shipped_recipe(), with its overrides, "
                   "scoring and backbone)")
    p.add_argument("--out", default="runs/shipped_lite0_lite1", help="training directory (resumable)")
    p.add_argument("--steps", type=int, default=None, help="override the number of steps")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.rescore:
        return rescore()
    if args.data_root is None:
        p.error("--data-root is required (unless --rescore)")

    chosen = shipped_recipe()
    name = args.config or chosen["name"]
    kw = load_recipe(name, None if args.config else chosen.get("overrides"))  # e.g. normality
    if args.steps:
        kw["steps"] = args.steps
    kw["seed"] = args.seed
    cfg = TrainConfig(data=str(Path(args.data_root) / "tiny_imagenet_200" / "train"), out=args.out, **kw)
    summary = train(cfg, resume=True)
    model = load_checkpoint(Path(args.out) / "best.safetensors")
    if not args.config:
        apply_choices(model, shipped_recipe())
    training = {"config_name": name, "train_config": cfg.to_dict(),
                "best_val_auroc": summary["best_val_auroc"],
                "reference_set": "tiny_imagenet_200/train (no PACS)"}
    return write(model, training)


def apply_choices(model, chosen: dict) -> None:
    """The scoring defaults and the backbone chosen after training, applied to ``model``."""
    # scoring defaults chosen after training, on the trained model (e.g. neighbors): they change
    # how the detector scores, not the weights or the step selection of the run
    scoring = chosen.get("scoring", {})
    known = {f.name for f in dataclasses.fields(model.scoring)}
    for key in scoring:
        if key not in known:
            raise SystemExit(f"shipped recipe: unknown scoring key {key!r}")
    model.scoring = dataclasses.replace(model.scoring, **scoring)  # validates the values
    # features chosen after training (the backbones fine-tuned end to end by
    # tools/finetune_backbones.py): the relational weights read the same-sized features of
    # another backbone; the choice was made with these very weights
    backbone = chosen.get("backbone")
    if backbone:
        dim = build_backbone(backbone).feature_dim
        if dim != model.config.feature_dim:
            raise SystemExit(f"shipped recipe: backbone {backbone!r} gives {dim}-d features, "
                             f"the model takes {model.config.feature_dim}")
        model.config.backbone = backbone
    model.config.__post_init__()  # validate the values


def rescore() -> int:
    target = WEIGHTS / SHIPPED_NAME
    training = json.loads(read_metadata(target)["training"])
    model = load_checkpoint(target)  # fp16 weights, exact in fp32 and back
    apply_choices(model, shipped_recipe())
    return write(model, training)


def write(model, training: dict) -> int:
    WEIGHTS.mkdir(parents=True, exist_ok=True)
    target = WEIGHTS / SHIPPED_NAME
    save_checkpoint(model, target, dtype=torch.float16, metadata={"training": training})
    info = {"sha256": sha256_file(target), "config_name": training["config_name"],
            "best_val_auroc": training["best_val_auroc"],
            "command": "python tools/make_shipped_checkpoint.py --data-root ../shared/data "
                       "(scoring only: --rescore)"}
    (WEIGHTS / (SHIPPED_NAME + ".json")).write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB), scoring {model.scoring}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
