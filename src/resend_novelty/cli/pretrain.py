"""``resend pretrain``: relational pretraining (:func:`resend_novelty.training.train`).

Multi-GPU: ``torchrun --nproc_per_node N -m resend_novelty.cli pretrain ...`` with the same
options (``python -m resend_novelty.cli`` runs ``resend``).
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from ..training import TrainConfig, is_main_process, shutdown_distributed, train
from .common import SEED, number

# command-line options that override fields of the relational model (TrainConfig.model)
_MODEL_OPTIONS = ("dim", "depth", "heads", "dropout", "input_dropout", "input_norm", "cosine_skip",
                  "center_features", "standardize_features", "normality")


def add_parser(sub, name):
    p = sub.add_parser(
        name,
        help="pretrain the relational model on a labelled reference set",
        description=(
            "Pretrain ReSeND's relational module on pairs of reference images (same class -> 1, "
            "different classes -> 0). Defaults follow the paper (LARS, lr 0.008, 500 warm-up "
            "steps, 4096 pairs a step, MSE). Multi-GPU: torchrun --nproc_per_node N -m "
            "resend_novelty.cli pretrain with the same options. Ctrl-C writes a checkpoint; "
            "--resume continues exactly; an OUT holding a run is never overwritten without --overwrite. "
            "Exit status 130 / 143 after Ctrl-C / SIGTERM (the checkpoint is written first)."
        ),
    )
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``resend pretrain``: the fields of TrainConfig, model overrides, --resume."""
    d = TrainConfig()
    p.add_argument("--data", required=True,
                   help="reference set: class-folder root (DIR/<class>/<image>), list file "
                   "('<path> <label>', with --root), or a .safetensors file with 'features' and "
                   "'labels' (from `resend features --export`)")
    p.add_argument("--out", required=True, help="output directory (checkpoints, best/final model)")
    p.add_argument("--root", default=None, help="root of the list file's paths")
    p.add_argument("--backbone", default=d.backbone,
                   help=f"backbone (default {d.backbone}; efficientnet_lite1, efficientnet_lite2, "
                   "resnet18, or names joined by '+' for concatenated features: the shipped "
                   "checkpoint was trained on efficientnet_lite0+efficientnet_lite1 and reads "
                   "the fine-tuned efficientnet_lite0_ft+efficientnet_lite1_ft)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--frozen-backbone", dest="frozen_backbone", action="store_true",
                      default=True, help="train only the relational module on cached features "
                      "(default; fast on CPU)")
    mode.add_argument("--end-to-end", dest="frozen_backbone", action="store_false",
                      help="fine-tune the backbone too (images in; meant for a GPU)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimiser steps (paper {d.steps})")
    p.add_argument("--batch-pairs", type=int, default=d.batch_pairs,
                   help=f"pairs per optimiser step, all processes together (paper {d.batch_pairs})")
    p.add_argument("--micro-batch", type=int, default=0,
                   help="pairs per forward/backward pass; smaller values accumulate gradients so "
                   "a large batch fits any device (default: whole batch)")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (paper {d.lr})")
    p.add_argument("--warmup", type=int, default=d.warmup,
                   help=f"linear warm-up steps, then constant lr (paper {d.warmup})")
    p.add_argument("--optimizer", choices=("lars", "adamw"), default=d.optimizer,
                   help="LARS (paper; momentum 0.9) or AdamW")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="(paper 5e-5)")
    p.add_argument("--momentum", type=float, default=d.momentum, help="LARS momentum (paper 0.9)")
    p.add_argument("--loss", choices=("mse", "bce"), default=d.loss,
                   help="mse: regression of sigma on the pair label (paper); bce: classification")
    p.add_argument("--neg-per-pos", type=int, default=d.neg_per_pos,
                   help="different-class partners per anchor (paper 1; official code 20)")
    p.add_argument("--no-balance", dest="balance", action="store_false",
                   help="draw negatives proportionally to class size and weight all pairs equally")
    p.add_argument("--seed", type=SEED, default=d.seed,
                   help="seed of pair sampling, initialisation and validation split")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="write a resumable checkpoint every K steps (also on SIGINT/SIGTERM)")
    p.add_argument("--cross-domain", type=float, default=d.cross_domain,
                   help="fraction of positive pairs drawn across domains (photo vs stylised view "
                   "of the same class) and of negative pairs within one domain (needs "
                   "--style-views; not in the paper)")
    p.add_argument("--val-protocol", choices=("halves", "proxy"), default=d.val_protocol,
                   help="validation on the held-out classes: 'halves' (support/test halves of the "
                   "known held-out classes, plus stylised views) or 'proxy' (mean multi- and "
                   "single-source AUROC of the synthetic domain-shift episodes of "
                   "resend_novelty.evaluation.proxy; frozen mode)")
    p.add_argument("--val-episodes", type=int, default=d.val_episodes,
                   help="episodes per proxy setting (--val-protocol proxy)")
    p.add_argument("--val-every", type=int, default=d.val_every,
                   help="validation AUROC on held-out reference classes every K steps (0 = never)")
    p.add_argument("--val-classes", type=int, default=d.val_classes,
                   help="reference classes held out from training for validation (default: a "
                   "quarter of the classes, between 2 and 20, leaving >= 2 to train on; 0 = none)")
    p.add_argument("--style-views", type=int, default=0,
                   help="frozen mode: the first N images of each class get one stylised view "
                   "(sketch/cartoon/painting/grayscale in turn) added to the reference set")
    p.add_argument("--max-per-class", type=int, default=0, help="cap images per class (0 = all)")
    p.add_argument("--partner-set", type=int, default=1,
                   help="frozen mode: the partner of each pair is the mean feature of this many "
                   "items of its class, like the class prototypes used at evaluation (paper: 1)")
    p.add_argument("--dim", type=int, default=None, help="token width (default 256)")
    p.add_argument("--depth", type=int, default=None, help="transformer blocks B (default 4)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default 4)")
    p.add_argument("--dropout", type=float, default=None, help="dropout inside the blocks")
    p.add_argument("--input-dropout", type=float, default=None,
                   help="dropout on the input features while training")
    p.add_argument("--input-norm", choices=("l2", "none"), default=None,
                   help="feature normalisation before the projection (default l2)")
    p.add_argument("--cosine-skip", dest="cosine_skip", action="store_true", default=None,
                   help="add a learnable cosine skip gamma*(cos(f_i,f_j)-delta) to the logit; the "
                   "head starts at zero, so training starts from the cosine detector (not in the paper)")
    p.add_argument("--center-features", dest="center_features", action="store_true",
                   default=None, help="train on features centred per domain (original images, "
                   "each stylised view); detectors then centre support and test features on their "
                   "own means (transductive; not in the paper)")
    p.add_argument("--standardize-features", dest="standardize_features", action="store_true",
                   default=None, help="like --center-features, and also divide by the per-domain "
                   "std of each feature dimension (resend_novelty.transforms; not in the paper)")
    p.add_argument("--normality", choices=("softmax", "max-logit"), default=None,
                   help="the detector's default normality, stored in the checkpoint: 'softmax' "
                   "(paper: max softmax of the similarities to the prototypes) or 'max-logit'")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no bf16 autocast on GPU")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--workers", type=number(int, 0, 256), default=d.workers,
                   help="image-decoding worker processes")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/latest.json exactly where the run stopped")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an OUT that already holds a run or other files: the run's "
                   "files there (checkpoints, models, history) are deleted first")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed ``resend pretrain`` options (model options left unset are not
    overrides)."""
    model = {k: getattr(args, k) for k in _MODEL_OPTIONS if getattr(args, k) is not None}
    names = {f.name for f in fields(TrainConfig)} - {"model"}
    kw = {n: getattr(args, n) for n in names if hasattr(args, n)}
    return TrainConfig(model=model, **kw)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    summary = train(cfg, resume=args.resume, progress=not args.quiet,
                    overwrite=getattr(args, "overwrite", False))
    if is_main_process():
        best = summary["best_val_auroc"]
        print(f"step {summary['step']}  pairs/s {summary['pairs_per_s']:.0f}  "
              f"best val AUROC {'n/a' if best is None else f'{best:.4f}'}  -> {cfg.out}")
    shutdown_distributed()
    sig = summary.get("interrupted")
    return 128 + int(sig) if sig else 0  # 130 after SIGINT, 143 after SIGTERM (checkpoint written)
