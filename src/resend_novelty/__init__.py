"""ReSeND: semantic novelty detection via relational reasoning (Cappio Borlino et al., ECCV 2022)."""

__version__ = "0.1.0"

from .backbones import Backbone, build_backbone  # noqa: E402
from .data import DataError, ImageDataset, read_list_file, scan_class_folders  # noqa: E402
from .detectors import (  # noqa: E402
    UNKNOWN,
    CosineDetector,
    EuclideanDetector,
    PrototypeDetector,
    ReSeNDDetector,
    build_detector,
    load_detector,
    save_detector,
)
from .features import FeatureCache, extract_features  # noqa: E402
from .models import (  # noqa: E402
    RelationalConfig,
    RelationalModule,
    ScoringConfig,
    load_checkpoint,
    save_checkpoint,
)

__all__ = [
    "Backbone", "build_backbone", "FeatureCache", "load_checkpoint", "save_checkpoint",
    "DataError", "ImageDataset", "read_list_file", "scan_class_folders", "UNKNOWN",
    "CosineDetector", "EuclideanDetector", "PrototypeDetector", "ReSeNDDetector",
    "build_detector", "load_detector", "save_detector", "extract_features", "RelationalConfig", "RelationalModule",
    "ScoringConfig",
]
