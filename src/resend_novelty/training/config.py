"""The pretraining configuration (paper Appendix A for the defaults)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

__all__ = ["TrainConfig", "default_val_classes"]


def default_val_classes(n_classes: int) -> int:
    """Held-out validation classes for ``n_classes`` reference classes: a quarter of them,
    between 2 and 20, leaving at least 2 training classes (0 = no validation if impossible)."""
    v = min(20, max(2, n_classes // 4))
    return v if n_classes - v >= 2 else 0


@dataclass
class TrainConfig:
    """Every option of a pretraining run; defaults follow the paper (LARS, lr 0.008, 500 warm-up
    steps, 4096 pairs a step, MSE, 13000 steps).

    ``model`` holds overrides of the relational model: architecture fields of
    :class:`resend_novelty.models.RelationalConfig` and, optionally, the scoring fields of
    :class:`resend_novelty.models.ScoringConfig` (e.g. ``{"dim": 128, "normality": "max-logit"}``;
    :func:`resend_novelty.models.split_config` separates them when the model is built).
    """

    data: str = ""  # class-folder root, list file, or .safetensors features file
    out: str = "runs/pretrain"
    root: str | None = None  # root of list-file paths
    backbone: str = "efficientnet_lite0"
    frozen_backbone: bool = True
    steps: int = 13000
    batch_pairs: int = 4096  # global batch (pairs per optimiser step)
    micro_batch: int = 0  # pairs per forward/backward (0 = whole local batch): gradient accumulation
    lr: float = 0.008
    warmup: int = 500
    optimizer: str = "lars"  # lars | adamw
    momentum: float = 0.9
    weight_decay: float = 5e-5
    loss: str = "mse"  # mse | bce
    neg_per_pos: int = 1
    balance: bool = True
    seed: int = 0
    checkpoint_every: int = 500
    val_every: int = 500
    # reference classes held out for validation (never trained on); None = scaled to the data
    # (:func:`default_val_classes`: 20 from 80 classes on, fewer below)
    val_classes: int | None = None
    # "halves": known held-out classes split in support/test halves (+ stylised views);
    # "proxy": the synthetic multi/single-source domain-shift episodes of resend_novelty.evaluation.proxy
    val_protocol: str = "halves"
    val_episodes: int = 20  # episodes per proxy setting ("proxy" protocol)
    style_views: int = 0  # images per class that get one stylised view (frozen mode)
    max_per_class: int = 0  # use at most this many images per class (0 = all)
    partner_set: int = 1  # frozen mode: partner = mean feature of this many same-class items
    cross_domain: float = 0.0  # share of positives across domains / negatives within a domain
    amp: bool = True  # bf16 autocast on CUDA
    device: str | None = None
    workers: int = 4
    model: dict = field(default_factory=dict)  # relational model overrides (see above)

    def __post_init__(self):
        if self.loss not in ("mse", "bce"):
            raise ValueError(f"loss must be 'mse' or 'bce', got {self.loss!r}")
        if self.optimizer not in ("lars", "adamw"):
            raise ValueError(f"optimizer must be 'lars' or 'adamw', got {self.optimizer!r}")
        if self.val_protocol not in ("halves", "proxy"):
            raise ValueError(f"val_protocol must be 'halves' or 'proxy', got {self.val_protocol!r}")
        if self.val_protocol == "proxy" and not self.frozen_backbone:
            raise ValueError("val_protocol='proxy' needs frozen_backbone (cached features)")
        if "+" in self.backbone and not self.frozen_backbone:
            raise ValueError(f"end-to-end training needs a single backbone, not the ensemble "
                             f"{self.backbone!r} (its members preprocess images differently)")
        if self.steps < 1 or self.batch_pairs < 1:
            raise ValueError("steps and batch_pairs must be positive")
        for name, lo in (("micro_batch", 0), ("warmup", 0), ("neg_per_pos", 1),
                         ("checkpoint_every", 1), ("val_every", 0), ("val_episodes", 1),
                         ("style_views", 0), ("max_per_class", 0), ("partner_set", 1),
                         ("workers", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if self.val_classes is not None and (not isinstance(self.val_classes, int)
                                             or self.val_classes < 0):
            raise ValueError(f"val_classes must be an integer >= 0, got {self.val_classes!r}")
        for name, lo, hi, lo_open in (("lr", 0.0, math.inf, True), ("momentum", 0.0, 1.0, False),
                                      ("weight_decay", 0.0, math.inf, False),
                                      ("cross_domain", 0.0, 1.0, False)):
            v = getattr(self, name)
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a number, got {v!r}") from None
            if not math.isfinite(f) or f < lo or (lo_open and f == lo) or f > hi:
                raise ValueError(f"{name} must be a finite number in {'(' if lo_open else '['}"
                                 f"{lo:g}, {hi:g}], got {v!r}")

    def to_dict(self) -> dict:
        return asdict(self)
