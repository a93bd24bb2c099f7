"""Relational models: the module of the paper, its Table 5 ablations, configs and checkpoints.

- :mod:`.config`: :class:`RelationalConfig` (architecture), :class:`ScoringConfig` (default
  scoring of detectors), :func:`split_config` for dicts holding both;
- :mod:`.blocks`: the transformer block (eq. 4) and its short-sequence attention;
- :mod:`.relational`: :class:`RelationalModule`, the relational module r and head c (eqs. 2-5);
- :mod:`.aggregation`: :class:`AggregationModule`, the max / sum / concat ablations;
- :mod:`.registry`: :func:`build_relational`, the model of a config's ``arch``;
- :mod:`.checkpoint`: safetensors save / load.
"""

from ..integrity import sha256_file, state_mismatch, verify_recorded_sha256
from .aggregation import AggregationModule, mlp_width, transformer_relation_params
from .blocks import Attention, TransformerBlock, sdpa_attention, short_attention
from .checkpoint import (
    FORMAT,
    SHIPPED_NAME,
    CheckpointError,
    default_checkpoint_path,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from .config import (
    ARCHS,
    NORMALITIES,
    SCORING_KEYS,
    RelationalConfig,
    ScoringConfig,
    check_raw_weight,
    check_shift_threshold,
    resolve_configs,
    split_config,
)
from .registry import ARCH_CLASSES, build_relational
from .relational import RelationalModule

__all__ = [
    "ARCHS", "NORMALITIES", "SCORING_KEYS", "RelationalConfig", "ScoringConfig", "split_config",
    "check_raw_weight", "check_shift_threshold", "resolve_configs", "Attention", "TransformerBlock", "short_attention", "sdpa_attention",
    "RelationalModule", "AggregationModule", "mlp_width", "transformer_relation_params",
    "ARCH_CLASSES", "build_relational", "FORMAT", "SHIPPED_NAME", "CheckpointError",
    "default_checkpoint_path", "load_checkpoint", "read_metadata", "save_checkpoint",
    "sha256_file", "state_mismatch", "verify_recorded_sha256",
]
