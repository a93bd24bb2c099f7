"""Relational pretraining of ReSeND (paper Sec. 3.2): configuration, reference set, pairs,
objective, validation, resumable checkpoints, the training loop and its named recipes.

The library takes a typed :class:`TrainConfig`; the command line is ``resend pretrain``
(:mod:`resend_novelty.cli.pretrain`).
"""

from ..data import STYLE_ORDER, split_validation
from .batches import EndToEnd, backbone_features, load_batch, partner_sets, train_transform
from .checkpointing import (load_training_checkpoint, rng_state, save_training_checkpoint,
                            set_rng_state)
from .config import TrainConfig
from .distributed import (all_reduce_sum, init_distributed, is_distributed, is_main_process,
                          shutdown_distributed, training_device)
from .loop import train
from .objective import build_optimizer, pair_loss
from .pairs import PairSampler, Pairs
from .recipes import base_recipe, load_recipe, recipe_names, shipped_recipe
from .reference import ReferenceSet, center_by_domain, load_reference_features
from .validation import proxy_validation_auroc, validation_auroc

__all__ = [
    "STYLE_ORDER", "split_validation",
    "EndToEnd", "backbone_features", "load_batch", "partner_sets", "train_transform",
    "load_training_checkpoint", "rng_state", "save_training_checkpoint", "set_rng_state",
    "TrainConfig",
    "all_reduce_sum", "init_distributed", "is_distributed", "is_main_process",
    "shutdown_distributed", "training_device",
    "train",
    "build_optimizer", "pair_loss",
    "PairSampler", "Pairs",
    "base_recipe", "load_recipe", "recipe_names", "shipped_recipe",
    "ReferenceSet", "center_by_domain", "load_reference_features",
    "proxy_validation_auroc", "validation_auroc",
]
