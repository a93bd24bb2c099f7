"""Configuration of a relational model: its architecture and its default scoring policy.

:class:`RelationalConfig` fixes the function the weights compute (token width, depth, input
normalisation, the per-domain feature normalisation it was trained on, ...); a checkpoint always
rebuilds the same module from it. :class:`ScoringConfig` is how a detector turns the module's
pair logits into a novelty score by default (normality function and support references); it is
stored next to the architecture in a checkpoint but changes no weight.

Older checkpoints and training recipes hold both in one dict; :func:`split_config` separates
them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

__all__ = ["ARCHS", "NORMALITIES", "SCORING_KEYS", "check_raw_weight", "check_shift_threshold",
           "RelationalConfig", "ScoringConfig", "split_config", "resolve_configs"]

# "transformer": the paper's relational module; the others are the ablations of the paper's
# Table 5 (hand-designed aggregation of the two tokens + MLP, resend_novelty.models.aggregation)
ARCHS = ("transformer", "max", "sum", "concat")
# "softmax" = max(softmax(u)) over the classes (the paper); "max-logit" = max(u)
NORMALITIES = ("softmax", "max-logit")


def _check_number(name: str, v, high: float) -> float:
    """``v`` as a float if it is a number in [0, ``high``] (0 = off); else an error naming it."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= high:
        raise ValueError(f"{name} must be a number in [0, {high:g}] (0 = off), got {v!r}")
    return float(v)


def check_raw_weight(w) -> float:
    """``w`` as a float in [0, 1]: the weight of the unnormalised features in per-image scoring
    (:attr:`ScoringConfig.raw_weight`); anything else is an error naming the value."""
    return _check_number("raw_weight", w, 1.0)


def check_shift_threshold(t) -> float:
    """``t`` as a float if it is a valid shift-gate threshold (a number in [0, 2]; 0 = off)."""
    return _check_number("shift_threshold", t, 2.0)


def _from_dict(cls, d: dict, what: str):
    if not isinstance(d, dict):
        raise ValueError(f"the {what} config must be a table of settings, got "
                         f"{type(d).__name__}")
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown {what}-config keys: {unknown}")
    return cls(**d)


#: the largest sizes a relational config may claim (a crafted checkpoint must not make the
#: package build a huge module); raise them here for a larger model
SIZE_LIMITS = {"feature_dim": 1 << 16, "dim": 1 << 14, "depth": 256, "heads": 1024}


@dataclass
class RelationalConfig:
    """Architecture of the relational module (and of the features it was trained on)."""

    feature_dim: int = 1280  # backbone feature size (1280 EfficientNet-Lite0, 512 ResNet-18)
    dim: int = 256  # token width
    depth: int = 4  # B, number of transformer blocks (paper: 4)
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0  # dropout inside the blocks
    input_norm: str = "l2"  # "l2" | "none": normalisation of backbone features
    input_dropout: float = 0.0  # dropout on the (normalised) features while training
    backbone: str = "efficientnet_lite0"  # the backbone the module was trained on
    cosine_skip: bool = False  # add gamma * (cos(f_i, f_j) - delta) to the logit (not in the paper)
    center_features: bool = False  # trained on per-domain centred features: detectors centre
    # support features on the support mean and test features on the test mean (not in the paper)
    arch: str = "transformer"  # relational module; "max"/"sum"/"concat": Table 5 ablations
    standardize_features: bool = False  # trained on per-domain standardised features (mean and
    # std per dimension, resend_novelty.transforms.domain_norm); detectors do the same (not in the paper)

    @property
    def domain_norm(self) -> str:
        """The per-domain feature normalisation the module was trained with (``domain_norm``)."""
        if self.standardize_features:
            return "standardize"
        return "center" if self.center_features else "none"

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.input_norm not in ("l2", "none"):
            raise ValueError(f"input_norm must be 'l2' or 'none', got {self.input_norm!r}")
        for name in ("feature_dim", "dim", "depth", "heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an integer, got {v!r}")
            if v <= 0:
                raise ValueError(f"{name} must be positive, got {v}")
            if v > SIZE_LIMITS[name]:  # checked before any module is built
                raise ValueError(f"{name} must be at most {SIZE_LIMITS[name]} (SIZE_LIMITS), "
                                 f"got {v}")
        for name, lo, hi, hi_open in (("mlp_ratio", 0.0, 64.0, False), ("dropout", 0.0, 1.0, True),
                                      ("input_dropout", 0.0, 1.0, True)):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or v < lo or v > hi or (hi_open and v == hi) or (name == "mlp_ratio" and v == 0):
                raise ValueError(f"{name} must be a number in {'(' if name == 'mlp_ratio' else '['}"
                                 f"{lo:g}, {hi:g}{')' if hi_open else ']'}, got {v!r}")
        if int(self.dim * self.mlp_ratio) < 1:
            raise ValueError(f"dim x mlp_ratio must be >= 1, got {self.dim} x {self.mlp_ratio}")
        for name in ("cosine_skip", "center_features", "standardize_features"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.backbone, str) or not self.backbone:
            raise ValueError(f"backbone must be a backbone name, got {self.backbone!r}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RelationalConfig":
        """The config of ``d``; unknown keys are an error (see :func:`split_config` for dicts
        that also hold the scoring)."""
        return _from_dict(cls, d, "relational")


@dataclass
class ScoringConfig:
    """Default scoring policy of a detector built on the module (no effect on the weights)."""

    normality: str = "softmax"  # "softmax" = max(softmax(u)) (the paper), "max-logit" = max(u)
    # (the similarity to the nearest prototype); one of NORMALITIES
    neighbors: int = 0  # support references: 0 = one prototype per class (the paper);
    # k = also the k support images of each class nearest to the test image
    neighbor_weight: float = 1.0  # with neighbors = k: u_c = (1 - w) * logit with the class
    # prototype + w * mean logit with the k nearest support images of class c (not in the paper)
    candidates: int = 3  # classes scored by the relational module per test image: the M
    # nearest by cosine (the others get -inf); 0 = every class (not in the paper). 3: the rule
    # of benchmarks/_speed_scale.py (BENCHMARKS.md, speed part f)
    shift_threshold: float = 0.0  # shift gate of the domain normalisation (not in the paper):
    # a test batch whose support-test gap (transforms.shift_gap) is at most this is normalised
    # with the support by pooled statistics; 0 = per-domain statistics always
    raw_weight: float = 0.0  # per-image scoring with one support domain (not in the paper):
    # normality = (1 - w) * normality on the support-normalised features + w * normality on the
    # unnormalised features; 0 = normalised features only

    def __post_init__(self):
        if self.normality not in NORMALITIES:
            raise ValueError(f"normality must be one of {NORMALITIES}, got {self.normality!r}")
        if isinstance(self.neighbors, bool) or not isinstance(self.neighbors, int) \
                or self.neighbors < 0:
            raise ValueError(f"neighbors must be >= 0 (0 = class prototypes), got {self.neighbors}")
        if not 0.0 <= float(self.neighbor_weight) <= 1.0:
            raise ValueError(f"neighbor_weight must be in [0, 1], got {self.neighbor_weight}")
        check_shift_threshold(self.shift_threshold)
        check_raw_weight(self.raw_weight)
        if isinstance(self.candidates, bool) or int(self.candidates) != self.candidates \
                or int(self.candidates) < 0:
            raise ValueError(f"candidates must be an integer >= 0 (0 = every class), got "
                             f"{self.candidates!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ScoringConfig":
        """The scoring of ``d``; unknown keys are an error."""
        return _from_dict(cls, d, "scoring")


SCORING_KEYS = tuple(f.name for f in fields(ScoringConfig))


def split_config(d: dict) -> tuple[RelationalConfig, ScoringConfig]:
    """Split a combined dict (architecture and scoring keys together, as in checkpoints written
    before the two were separated, or a training recipe) into its two configs.

    Missing keys take their defaults; keys of neither config are an error.
    """
    if not isinstance(d, dict):
        raise ValueError(f"the config must be a table of settings, got {type(d).__name__}")
    arch = {k: v for k, v in d.items() if k not in SCORING_KEYS}
    scoring = {k: v for k, v in d.items() if k in SCORING_KEYS}
    return RelationalConfig.from_dict(arch), ScoringConfig(**scoring)


def resolve_configs(
    config: RelationalConfig | None, scoring: ScoringConfig | None, kwargs: dict
) -> tuple[RelationalConfig, ScoringConfig]:
    """The configs of a model built with ``config`` / ``scoring`` or with keyword arguments
    ``kwargs`` (fields of either config, as accepted by :func:`split_config`), not both."""
    if kwargs and config is not None:
        raise TypeError("pass either a config or keyword arguments, not both")
    if config is None:
        arch = {k: v for k, v in kwargs.items() if k not in SCORING_KEYS}
        given = {k: v for k, v in kwargs.items() if k in SCORING_KEYS}
        if given and scoring is not None:
            raise TypeError("pass either a scoring config or scoring keyword arguments, not both")
        config = RelationalConfig(**arch)
        if given:
            scoring = ScoringConfig(**given)
    return config, scoring if scoring is not None else ScoringConfig()
