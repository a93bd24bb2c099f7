"""The backbone weights shipped in the package: what each file is, where it came from.

Each entry of :data:`SHIPPED_WEIGHTS` (keyed by the registered backbone name) names a file in
``resend_novelty/weights/``, its SHA-256 (as recorded in the ``<file>.json`` written next to it
when it was shipped), the recipe that made it and what it was trained on. Loading a shipped file
goes through :meth:`ShippedWeights.verified_path`, which checks the file against the recorded
``<file>.json`` (:func:`resend_novelty.integrity.verified_file`).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from ..integrity import verified_file

__all__ = ["ShippedWeights", "SHIPPED_WEIGHTS", "shipped_weights_path"]

_RECIPE = ("tools/finetune_backbones.py --ship distill (config distill: cosine-classifier "
           "cross-entropy + 1 x distance to the frozen ImageNet features; AdamW, 5 epochs, seed 0; "
           "best epoch 3 on the domain-shift proxy)")
_TRAINED_ON = ("the Tiny-ImageNet reference-set classes that pretraining trains on (the 30 "
               "proxy classes held out), each image rendered as a photo or a domain-shift style "
               "of resend_novelty.data.augment; started from the ImageNet weights")


def shipped_weights_path(file: str) -> str:
    """Path of ``file`` in the package's ``weights/`` folder (not checked)."""
    return str(resources.files("resend_novelty") / "weights" / file)


@dataclass(frozen=True)
class ShippedWeights:
    """One backbone weights file shipped in the package."""

    file: str  # name in resend_novelty/weights/
    sha256: str  # as recorded in <file>.json
    recipe: str  # the tool and configuration that made it
    trained_on: str  # the data it was trained on

    @property
    def path(self) -> str:
        return shipped_weights_path(self.file)

    def verified_path(self) -> str:
        """:attr:`path`, checked to exist and to match the SHA-256 recorded in ``<file>.json``."""
        return verified_file(self.path, "shipped backbone weights")


SHIPPED_WEIGHTS: dict[str, ShippedWeights] = {
    "efficientnet_lite0_ft": ShippedWeights(
        file="efficientnet_lite0_ft.safetensors",
        sha256="b4683ecd6bf3fedae68f89ecd4143377e4cf317b202b9c7b70d7089fc1454db4",
        recipe=_RECIPE,
        trained_on=_TRAINED_ON,
    ),
    "efficientnet_lite1_ft": ShippedWeights(
        file="efficientnet_lite1_ft.safetensors",
        sha256="cf4284e8cfd315f64742c01572c54eb96b5598fba31a62537f6baeafaa290615",
        recipe=_RECIPE,
        trained_on=_TRAINED_ON,
    ),
}
