"""PIL images as inputs: each network preprocesses them itself, ensembles included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from resend_novelty.backbones.ensemble import BackboneEnsemble
from resend_novelty.detectors import CosineDetector
from resend_novelty.features.inputs import input_features


@pytest.fixture
def ensemble(tiny_backbone):
    """Two tiny CNNs with different preprocessing (32 px and 24 px crops)."""
    from resend_novelty.backbones.base import Preprocessing

    other = type(tiny_backbone)()
    other.name = "tiny_test_cnn_b"
    other.preprocessing = Preprocessing(resize=28, crop=24)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1.5)
    return BackboneEnsemble([tiny_backbone, other])


def _images(tmp_path, n=5):
    rng = np.random.default_rng(0)
    images, paths = [], []
    for i in range(n):
        im = Image.fromarray((rng.random((40, 36, 3)) * 255).astype("uint8"))
        images.append(im)
        paths.append(str(tmp_path / f"{i}.png"))
        im.save(paths[-1])  # lossless: the same pixels as the PIL image
    return images, paths


def test_pil_images_give_the_features_of_their_files(ensemble, tmp_path):
    images, paths = _images(tmp_path)
    kw = dict(cache=False, progress=False, device="cpu", engine="torch", num_workers=0)
    from_pil = input_features(images, ensemble, **kw).features
    from_files = input_features(paths, ensemble, **kw).features
    assert from_pil.shape == (5, 32)
    torch.testing.assert_close(from_pil, from_files, rtol=1e-5, atol=1e-5)
    # each member used its own preprocessing: the halves differ from one shared transform
    first = input_features(images, ensemble.members[0], **kw).features
    torch.testing.assert_close(from_pil[:, :16], first, rtol=1e-5, atol=1e-5)


def test_a_detector_on_an_ensemble_scores_pil_images(ensemble, tmp_path):
    images, paths = _images(tmp_path, n=6)
    det = CosineDetector(backbone=ensemble, progress=False, cache=False, engine="torch")
    det.fit(images, [0, 0, 0, 1, 1, 1])
    np.testing.assert_allclose(det.score(images[:2]), det.score(paths[:2]), rtol=1e-5, atol=1e-5)


def test_image_tensors_for_an_ensemble_are_refused_with_a_reason(ensemble):
    with pytest.raises(TypeError, match="has no single preprocessing"):
        input_features(torch.zeros(2, 3, 32, 32), ensemble, cache=False, progress=False,
                       device="cpu")
