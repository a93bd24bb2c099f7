"""ReSeND: semantic novelty detection via relational reasoning (Cappio Borlino et al., ECCV 2022)."""

__version__ = "0.1.0"

from .backbones.base import Backbone, build_backbone  # noqa: E402
from .features.cache import FeatureCache  # noqa: E402
from .models.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from .data.images import DataError, ImageDataset, read_list_file, scan_class_folders  # noqa: E402
from .detectors.base import (  # noqa: E402
    UNKNOWN,
    CosineDetector,
    EuclideanDetector,
    PrototypeDetector,
    ReSeNDDetector,
    build_detector,
)
from .features.extract import extract_features  # noqa: E402
from .models.relational import RelationalConfig, RelationalModule  # noqa: E402

__all__ = [
    "Backbone", "build_backbone", "FeatureCache", "load_checkpoint", "save_checkpoint",
    "DataError", "ImageDataset", "read_list_file", "scan_class_folders", "UNKNOWN",
    "CosineDetector", "EuclideanDetector", "PrototypeDetector", "ReSeNDDetector",
    "build_detector", "extract_features", "RelationalConfig", "RelationalModule",
]
