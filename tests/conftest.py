"""Shared fixtures: tiny generated image sets (no network, no shared data needed)."""

from __future__ import annotations

import os
import pickle
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

DATA_ROOT = Path(os.environ.get("RESEND_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def make_image(path: Path, color, size=(40, 32), mode="RGB", fmt=None, noise_seed=0) -> Path:
    """A small image: a solid colour plus seeded noise, so classes differ in colour."""
    rng = np.random.default_rng(noise_seed)
    arr = np.clip(np.array(color, float)[None, None, :] + rng.normal(0, 12, (size[1], size[0], 3)), 0, 255)
    img = Image.fromarray(arr.astype(np.uint8), "RGB").convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def eval_cli_error(tmp_path: Path, capsys, *extra: str) -> str:
    """Run ``resend eval`` with the tiny test backbone on a 2-class list of generated images
    plus ``extra`` options; assert it is a user error (exit 2, one line, no traceback) and
    return the line."""
    from resend_novelty.cli.main import main

    root = tmp_path / "data"
    lines = []
    for label, c in enumerate(list(COLORS)[:2]):
        for i in range(2):
            make_image(root / f"{c}/{i}.png", COLORS[c], noise_seed=i)
            lines.append(f"{c}/{i}.png {label}\n")
    (tmp_path / "list.txt").write_text("".join(lines))
    lst = str(tmp_path / "list.txt")
    rc = main(["eval", "--root", str(root), "--support", lst, "--test", lst, "--workers", "0",
               "--quiet", "--device", "cpu", "--backbone", "tiny_test_cnn", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert err.startswith("resend eval: error:") and len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture
def class_folders(tmp_path) -> Path:
    """tmp/support/<red|green|blue>/*.png (4 each) and tmp/test/<red|green|blue|yellow>/*.png."""
    for split, classes, n in (("support", ["red", "green", "blue"], 4), ("test", list(COLORS), 3)):
        for c in classes:
            for i in range(n):
                make_image(tmp_path / split / c / f"{i}.png", COLORS[c], noise_seed=zlib.crc32(f"{split}{c}{i}".encode()))
    return tmp_path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own feature cache; the user's cache is never touched."""
    monkeypatch.setenv("RESEND_CACHE", str(tmp_path / "_cache"))
    torch.manual_seed(0)


@pytest.fixture
def tiny_backbone():
    """A tiny random CNN backbone (fast on CPU) with the Backbone interface."""
    from resend_novelty.backbones.base import Backbone, Preprocessing

    class Tiny(Backbone):
        name = "tiny_test_cnn"
        feature_dim = 16

        def __init__(self):
            super().__init__(Preprocessing(resize=32, crop=32))
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(
                torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                torch.nn.Flatten(),
            )

        def forward(self, x):
            return self.net(x)

    return Tiny()


class _Exploit:
    """Unpickling this creates a file: a stand-in for arbitrary code execution."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


@pytest.fixture
def tiny_registered(tiny_backbone, monkeypatch):
    """The tiny test backbone's class, registered under its name as ``--backbone`` resolves it."""
    from resend_novelty.backbones import BACKBONES

    cls = type(tiny_backbone)
    monkeypatch.setitem(BACKBONES, cls.name, cls)
    return cls


@pytest.fixture(scope="session")
def reference_features():
    """``reference_features(path, n_classes=8, per=8, dim=12, dtype=torch.int64)``: write a
    synthetic reference set of clustered features (``{"features", "labels"}`` safetensors, as
    ``resend features --export`` writes) to ``path`` and return the path as a string."""
    from safetensors.torch import save_file

    def write(path, n_classes=8, per=8, dim=12, dtype=torch.int64) -> str:
        g = torch.Generator().manual_seed(0)
        centers = torch.randn(n_classes, dim, generator=g) * 2
        labels = torch.arange(n_classes).repeat_interleave(per)
        feats = (centers[labels] + torch.randn(len(labels), dim, generator=g)).relu()
        save_file({"features": feats, "labels": labels.to(dtype)}, str(path))
        return str(path)

    return write


@pytest.fixture(scope="session")
def evil_pickle():
    """``evil_pickle(path, marker)``: write a pickle at ``path`` whose unpickling creates ``marker``."""

    def write(path: Path, marker: Path) -> Path:
        with open(path, "wb") as fh:
            pickle.dump({"weight": _Exploit(marker)}, fh)
        return path

    return write


@pytest.fixture(scope="session")
def spread_model():
    """``spread_model(depth=2, seed=0, **config)``: a small relational module (24-d features) with
    weights spread out (the default init makes all outputs nearly equal)."""
    from resend_novelty.models import RelationalConfig, RelationalModule

    def build(depth=2, seed=0, **kw) -> RelationalModule:
        torch.manual_seed(seed)
        m = RelationalModule(RelationalConfig(feature_dim=24, dim=32, depth=depth, heads=4, **kw))
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        return m.eval()

    return build


@pytest.fixture(params=["cosine", "resend", "resend-neighbors", "resend-candidates"])
def make_case(request, spread_model):
    """``make_case(**kw)``: an unfitted detector (backbone=None) of each case: cosine, ReSeND
    with one prototype per class, with the candidate shortcut (2 of 3 classes), with k-NN
    support references."""
    from resend_novelty.detectors import CosineDetector, ReSeNDDetector

    model = spread_model(cosine_skip=True, input_norm="l2")

    def build(**kw):
        kw = {"backbone": None, "progress": False, **kw}
        if request.param == "cosine":
            return CosineDetector(**kw)
        extra = {"resend": dict(neighbors=0),
                 "resend-candidates": dict(neighbors=0, normality="max-logit", candidates=2),
                 "resend-neighbors": dict(neighbors=3, neighbor_weight=0.5)}[request.param]
        return ReSeNDDetector(model=model, **extra, **kw)

    return build
