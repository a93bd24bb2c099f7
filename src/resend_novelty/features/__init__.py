"""Backbone features: the on-disk cache, the inference engines, the extraction that fills the
cache, and detector inputs."""

from .cache import FeatureCache, default_cache_dir, image_key
from .engine import ENGINES, OnnxBackbone, onnx_backbone, resolve_engine
from .extract import check_features, default_device, extract_features
from .inputs import InputFeatures, input_features

__all__ = ["FeatureCache", "default_cache_dir", "image_key", "check_features", "default_device",
           "extract_features", "InputFeatures", "input_features", "ENGINES", "OnnxBackbone",
           "onnx_backbone", "resolve_engine"]
