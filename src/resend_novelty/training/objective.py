"""The pretraining objective and its optimiser (paper Sec. 3.2 and Appendix A).

The relational model regresses sigma_ij = sigmoid(logit) onto the pair label (MSE, the paper's
choice) or classifies it (BCE). Optimiser: LARS with momentum (the paper's) or AdamW, weight
decay on weight matrices only, linear warm-up to a constant learning rate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import TrainConfig

__all__ = ["pair_loss", "build_optimizer"]


def pair_loss(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-pair loss: ``"mse"`` = (sigmoid(logit) - y)^2, ``"bce"`` = binary cross-entropy."""
    if kind == "mse":
        return (torch.sigmoid(logits) - y) ** 2
    return F.binary_cross_entropy_with_logits(logits, y, reduction="none")


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    """``(optimizer, scheduler)`` of ``cfg`` for the trainable parameters of ``model``; biases,
    norms and tokens get no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "token" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "lars":
        # imported here: pytorch_optimizer loads hundreds of optimisers (about 1 s), LARS only
        from pytorch_optimizer import LARS

        opt = LARS(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                   foreach=False)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(0, cfg.warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0
    )
    return opt, sched
