"""The pretraining configuration (paper Appendix A for the defaults)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["TrainConfig"]


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
    val_classes: int = 20  # reference classes held out for validation (never trained on)
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

    def to_dict(self) -> dict:
        return asdict(self)
