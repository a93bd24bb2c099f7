"""Backbones by name: the registry :data:`BACKBONES` and :func:`build_backbone`.

Registered names: ``efficientnet_lite0`` (default), ``efficientnet_lite1``,
``efficientnet_lite2``, ``efficientnet_lite0_ft``, ``efficientnet_lite1_ft`` (fine-tuned, weights
in the package), ``resnet18``; besides them ``identity`` (precomputed features, ``feature_dim``
given by the caller) and names joined by ``+`` (a :class:`~.ensemble.BackboneEnsemble`).
"""

from __future__ import annotations

from .base import Backbone, IdentityBackbone
from .efficientnet import (
    EfficientNetLite0,
    EfficientNetLite0FT,
    EfficientNetLite1,
    EfficientNetLite1FT,
    EfficientNetLite2,
)
from .ensemble import BackboneEnsemble
from .resnet import ResNet18

__all__ = ["BACKBONES", "build_backbone"]

BACKBONES: dict[str, type[Backbone]] = {
    "efficientnet_lite0": EfficientNetLite0,
    "efficientnet_lite1": EfficientNetLite1,
    "efficientnet_lite2": EfficientNetLite2,
    "efficientnet_lite0_ft": EfficientNetLite0FT,
    "efficientnet_lite1_ft": EfficientNetLite1FT,
    "resnet18": ResNet18,
}


def build_backbone(name: str = "efficientnet_lite0", **kwargs) -> Backbone:
    """Build a registered backbone by name (``efficientnet_lite0``, ``efficientnet_lite0_ft``
    (fine-tuned, weights in the package), ``resnet18``, ``identity``, ...);
    names joined by ``+`` build a :class:`BackboneEnsemble` (``kwargs`` go to every member)."""
    if "+" in name:
        return BackboneEnsemble([build_backbone(n.strip(), **kwargs) for n in name.split("+")])
    if name == "identity":
        return IdentityBackbone(**kwargs)
    if name not in BACKBONES:
        raise ValueError(
            f"unknown backbone {name!r}; choose one of {sorted(BACKBONES) + ['identity']}"
        )
    return BACKBONES[name](**kwargs)
