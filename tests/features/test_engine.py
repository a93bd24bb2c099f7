"""Inference engines: ONNX Runtime vs torch features, the shared cache entry, the stored graph's
integrity check, refusals and the fast decoding path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_image
from resend_novelty.backbones import BackboneEnsemble, Preprocessing, build_backbone
from resend_novelty.features import FeatureCache, extract_features, resolve_engine
from resend_novelty.features import engine as engine_mod


@pytest.fixture(autouse=True)
def _fresh_sessions():
    engine_mod.clear_sessions()
    yield
    engine_mod.clear_sessions()


@pytest.fixture
def images(tmp_path) -> list[str]:
    return [str(make_image(tmp_path / "img" / f"{i}.png", (40 * i, 200 - 30 * i, 90),
                           size=(40 + 3 * i, 32), noise_seed=i)) for i in range(5)]


def _onnx_files(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "onnx").glob("*.onnx"))


def test_resolve_engine():
    assert resolve_engine("auto", torch.device("cpu")) == "onnx"
    assert resolve_engine("auto", torch.device("cuda")) == "torch"
    assert resolve_engine("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="CPU only"):
        resolve_engine("onnx", torch.device("cuda"))
    with pytest.raises(ValueError, match="unknown engine 'tensorrt'"):
        resolve_engine("tensorrt", torch.device("cpu"))


def test_onnx_matches_torch_and_shares_the_cache_entry(tiny_backbone, images, tmp_path):
    cache = FeatureCache(tmp_path / "c")
    f_onnx = extract_features(tiny_backbone, images, cache=cache, engine="onnx", progress=False)
    assert len(_onnx_files(cache.directory)) == 1  # exported into the cache folder
    f_torch = extract_features(tiny_backbone, images, cache=False, engine="torch", progress=False)
    assert (f_onnx - f_torch).abs().max().item() < 1e-4
    assert cache.count(tiny_backbone.cache_namespace) == len(images)

    def boom(*_a, **_k):
        raise AssertionError("the backbone ran although the features are cached")

    tiny_backbone.forward = boom  # torch engine: every feature must come from the onnx entries
    again = extract_features(tiny_backbone, images, cache=cache, engine="torch", progress=False)
    assert torch.equal(again, f_onnx)


def test_shipped_lite0_onnx_matches_torch(images):
    bb = build_backbone("efficientnet_lite0_ft")
    f_onnx = extract_features(bb, images[:3], cache=False, engine="onnx", progress=False)
    f_torch = extract_features(bb, images[:3], cache=False, engine="torch", progress=False)
    assert f_onnx.shape == (3, bb.feature_dim)
    assert (f_onnx - f_torch).abs().max().item() < 1e-4


def test_graph_hash_is_recorded_and_a_corrupted_graph_is_refused_and_reexported(
        tiny_backbone, images, tmp_path):
    cache = FeatureCache(tmp_path / "c")
    ref = extract_features(tiny_backbone, images, cache=False, engine="onnx", progress=False)
    extract_features(tiny_backbone, images[:1], cache=cache, engine="onnx", progress=False)
    (graph,) = _onnx_files(cache.directory)
    meta = json.loads(graph.with_name(graph.name + ".json").read_text())
    assert meta["sha256"] == engine_mod.sha256_file(graph)
    assert meta["probe_max_abs_diff"] <= engine_mod.PARITY_ATOL
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    engine_mod.clear_sessions()
    with pytest.warns(UserWarning, match=r"ONNX graph .*\.onnx is corrupt or altered.*exporting it again"):
        feats = extract_features(tiny_backbone, images, cache=cache, engine="onnx", progress=False)
    assert (feats - ref).abs().max().item() < 1e-6
    assert meta["sha256"] == engine_mod.sha256_file(graph)  # re-exported, same graph


def test_new_weights_get_a_new_graph(tiny_backbone, images, tmp_path):
    cache = FeatureCache(tmp_path / "c")
    extract_features(tiny_backbone, images[:1], cache=False, engine="onnx", progress=False)
    a = engine_mod.onnx_backbone(tiny_backbone, cache.directory)
    with torch.no_grad():
        tiny_backbone.net[0].bias.add_(1.0)
    b = engine_mod.onnx_backbone(tiny_backbone, cache.directory)
    assert a is not b and len(_onnx_files(cache.directory)) == 2


@pytest.mark.parametrize("kind, message", [
    ("python-constant", "backbone odd_cnn: ONNX graph differs from torch by .* on the probe batch; "
                        "using the torch engine"),
    ("numpy", "backbone odd_cnn: ONNX export failed .*; using the torch engine"),
])
def test_a_backbone_onnx_cannot_reproduce_falls_back_to_torch(tiny_backbone, images, kind,
                                                              message):
    class Odd(type(tiny_backbone)):
        name = "odd_cnn"

        def forward(self, x):
            if kind == "numpy":  # not traceable at all
                return torch.from_numpy(self.net(x).detach().numpy().copy())
            # traced as a constant (the export input's mean): the graph differs from torch
            return self.net(x) * (1.0 + float(x.mean()))

    bb = Odd()
    with pytest.warns(UserWarning, match=message):
        f = extract_features(bb, images, cache=False, engine="onnx", progress=False)
    want = extract_features(bb, images, cache=False, engine="torch", progress=False)
    assert torch.equal(f, want)  # fell back to torch


def test_fast_decoding_gives_the_torchvision_values(images):
    pre = Preprocessing(resize=36, crop=32, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    img = pre.load(images[2])
    want = pre.transform()(img)
    got = pre.to_batch([pre.pixels(img)])[0]
    assert got.dtype == np.float32 and got.shape == tuple(want.shape)
    assert np.array_equal(got, want.numpy())


def test_decode_options_change_the_namespace(tiny_backbone):
    plain, draft = Preprocessing(), Preprocessing(draft=True)
    assert plain.describe() != draft.describe() and plain.decode_key != draft.decode_key
    ns = tiny_backbone.cache_namespace
    tiny_backbone.preprocessing = Preprocessing(resize=32, crop=32, draft=True)
    assert tiny_backbone.cache_namespace != ns


def test_ensemble_decodes_each_image_once(tiny_backbone, images, monkeypatch):
    other = type(tiny_backbone)()
    other.name = "tiny_test_cnn_b"
    other.preprocessing = Preprocessing(resize=36, crop=32)
    calls = []
    real = Preprocessing.load
    monkeypatch.setattr(Preprocessing, "load", lambda self, p: calls.append(p) or real(self, p))
    ens = BackboneEnsemble([tiny_backbone, other])
    f = extract_features(ens, images, cache=False, engine="torch", progress=False)
    assert sorted(calls) == sorted(images)  # once per image, not once per member
    parts = [extract_features(m, images, cache=False, engine="torch", progress=False)
             for m in (tiny_backbone, other)]
    assert torch.equal(f, torch.cat(parts, dim=1))


@pytest.mark.parametrize("workers", [0, 2])
def test_decode_errors_name_the_file_and_computed_features_are_kept(tiny_backbone, images,
                                                                    tmp_path, workers):
    bad = tmp_path / "img" / "zz_bad.png"
    bad.write_bytes(b"not an image")
    cache = FeatureCache(tmp_path / f"c{workers}")
    with pytest.raises(Exception, match="zz_bad.png"):
        extract_features(tiny_backbone, images + [str(bad)], cache=cache, batch_size=2,
                         num_workers=workers, engine="torch", progress=False)
    assert cache.count(tiny_backbone.cache_namespace) == 4  # the two batches before the bad one


def test_engine_value_is_checked_up_front(tiny_backbone, images):
    with pytest.raises(ValueError, match="unknown engine"):
        extract_features(tiny_backbone, images, cache=False, engine="fast", progress=False)


def test_jpeg_draft_decodes_large_images_near_twice_the_target(tmp_path):
    big = make_image(tmp_path / "big.jpg", (120, 80, 40), size=(1200, 900), fmt="JPEG")
    small = make_image(tmp_path / "small.jpg", (120, 80, 40), size=(60, 50), fmt="JPEG")
    plain, draft = Preprocessing(resize=36, crop=32), Preprocessing(resize=36, crop=32, draft=True)
    img = draft.load(big)
    assert min(img.size) >= 72 and img.size[0] < 1200  # reduced DCT scale, still >= 2x target
    assert plain.load(big).size == (1200, 900)
    a = plain.to_batch([plain.pixels(plain.load(big))])
    b = draft.to_batch([draft.pixels(draft.load(big))])
    assert np.abs(a - b).mean() < 0.05  # near the same pixels, not the same: own namespace
    assert np.array_equal(np.asarray(draft.load(small)), np.asarray(plain.load(small)))
