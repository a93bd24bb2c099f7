"""Backbones f: ImageNet-pretrained (or fine-tuned) CNNs with the classifier removed.

- :mod:`.base`: the :class:`Backbone` interface, :class:`Preprocessing`, :class:`IdentityBackbone`;
- :mod:`.efficientnet`: EfficientNet-Lite0/1/2 and the fine-tuned Lite0/Lite1;
- :mod:`.resnet`: ResNet-18 (the paper's backbone);
- :mod:`.ensemble`: :class:`BackboneEnsemble`, concatenated features of several backbones;
- :mod:`.registry`: :data:`BACKBONES` and :func:`build_backbone` (by name, ``"a+b"`` = ensemble);
- :mod:`.weights`: the table of weights files shipped in the package.
"""

from .base import Backbone, IdentityBackbone, Preprocessing
from .efficientnet import (
    EfficientNetLite,
    EfficientNetLite0,
    EfficientNetLite0FT,
    EfficientNetLite1,
    EfficientNetLite1FT,
    EfficientNetLite2,
)
from .ensemble import BackboneEnsemble
from .registry import BACKBONES, build_backbone
from .resnet import ResNet18
from .weights import SHIPPED_WEIGHTS, ShippedWeights, shipped_weights_path

__all__ = [
    "Backbone", "BackboneEnsemble", "EfficientNetLite", "EfficientNetLite0", "EfficientNetLite1",
    "EfficientNetLite2", "EfficientNetLite0FT", "EfficientNetLite1FT", "ResNet18",
    "IdentityBackbone", "build_backbone", "BACKBONES", "Preprocessing", "SHIPPED_WEIGHTS",
    "ShippedWeights", "shipped_weights_path",
]
