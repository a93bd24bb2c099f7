"""ResNet-18 backbone (the paper's): torchvision's ImageNet weights, classifier removed.

Registered as ``resnet18``; needs torchvision to fetch its ImageNet weights, so it only works
where that download is possible (or the weights are already cached). 512-d features.
"""

from __future__ import annotations

import pickle

import torch
from torch import nn

from .base import Backbone, Preprocessing

__all__ = ["ResNet18"]


class ResNet18(Backbone):
    """torchvision ResNet-18 (the paper's backbone). Weights are downloaded by torchvision."""

    name = "resnet18"
    feature_dim = 512

    def __init__(self, preprocessing: Preprocessing | None = None, pretrained: bool = True):
        super().__init__(
            preprocessing
            or Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        )
        from torchvision.models import ResNet18_Weights, resnet18

        net = resnet18(weights=None)
        try:
            if pretrained:
                # weights_only=True: torchvision's own loader would unpickle a cached file as is
                state = ResNet18_Weights.IMAGENET1K_V1.get_state_dict(
                    progress=True, check_hash=True, weights_only=True
                )
                net.load_state_dict(state)
        except pickle.UnpicklingError as exc:
            raise RuntimeError(
                "refusing the cached ResNet-18 weights in $TORCH_HOME/hub/checkpoints: the file "
                f"holds more than tensors ({exc.__class__.__name__}); delete it to re-download"
            ) from None
        except Exception as exc:  # network errors come in many types
            raise RuntimeError(
                "Could not load the ImageNet weights of ResNet-18: torchvision downloads them on "
                "first use and this machine could not fetch them "
                f"({type(exc).__name__}: {exc}). Use the offline default backbone "
                "'efficientnet_lite0', or place the weights in torchvision's cache "
                "($TORCH_HOME/hub/checkpoints/resnet18-f37072fd.pth)."
            ) from exc
        net.fc = nn.Identity()
        self.net = net
        self._weights_id = "imagenet1k-v1" if pretrained else "random-init"

    @property
    def weights_id(self) -> str:
        return self._weights_id

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)
