"""Feature cache: hits skip the backbone; invalidation; concurrent processes; dimension checks."""

from __future__ import annotations

import multiprocessing as mp
import os
import sqlite3

import numpy as np
import pytest
import torch
from conftest import make_image

from resend_novelty.backbones import Preprocessing
from resend_novelty.data import DataError
from resend_novelty.features import FeatureCache, check_features, extract_features, image_key


class _Counter:
    """Counts images passed through a backbone (forward hook)."""

    def __init__(self, backbone):
        self.images = 0
        self.calls = 0
        backbone.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        self.calls += 1
        self.images += args[0].shape[0]


def _extract(bb, paths, **kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("progress", False)
    kw.setdefault("device", "cpu")
    kw.setdefault("engine", "torch")  # the forward hooks count torch calls (engines: test_engine)
    return extract_features(bb, paths, **kw)


def _paths(class_folders):
    return sorted(str(p) for p in (class_folders / "support").rglob("*.png"))


def test_second_extraction_does_not_call_the_backbone(class_folders, tiny_backbone):
    paths = _paths(class_folders)
    count = _Counter(tiny_backbone)
    a = _extract(tiny_backbone, paths, batch_size=5)
    assert count.images == len(paths) and count.calls == 3
    b = _extract(tiny_backbone, paths)
    assert count.images == len(paths), "cached features must not be recomputed"
    assert torch.equal(a, b) and a.shape == (12, 16) and a.dtype == torch.float32
    # order follows the requested paths, including repeats
    c = _extract(tiny_backbone, [paths[3], paths[0], paths[3]])
    assert torch.equal(c, a[[3, 0, 3]]) and count.images == len(paths)
    # only new images are computed
    new = make_image(class_folders / "extra" / "x.png", (9, 9, 9))
    _extract(tiny_backbone, paths + [str(new)])
    assert count.images == len(paths) + 1
    # cache=False never reads nor writes
    _extract(tiny_backbone, paths[:2], cache=False)
    assert count.images == len(paths) + 3
    assert FeatureCache().count(tiny_backbone.cache_namespace) == 13


def test_cached_features_equal_fresh_features(class_folders, tiny_backbone):
    paths = _paths(class_folders)
    cached = _extract(tiny_backbone, paths)
    cached = _extract(tiny_backbone, paths)  # from the DB
    fresh = _extract(tiny_backbone, paths, cache=False)
    torch.testing.assert_close(cached, fresh, atol=1e-6, rtol=0)


def test_invalidated_when_the_image_file_changes(class_folders, tiny_backbone):
    paths = _paths(class_folders)
    count = _Counter(tiny_backbone)
    before = _extract(tiny_backbone, paths)
    target = paths[0]
    st = os.stat(target)
    make_image(type(class_folders)(target), (0, 0, 255), noise_seed=99)  # rewrite: other content
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    after = _extract(tiny_backbone, paths)
    assert count.images == len(paths) + 1  # only the changed image is recomputed
    assert not torch.allclose(after[0], before[0])
    assert torch.equal(after[1:], before[1:])
    # a touch alone (same bytes, new mtime: a copied or re-mounted dataset) keeps the features
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    again = _extract(tiny_backbone, paths)
    assert count.images == len(paths) + 1
    torch.testing.assert_close(again[1], before[1], atol=1e-6, rtol=0)


def test_image_key_follows_the_content_not_the_mtime(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"12345")
    k1 = image_key(p)
    os.utime(p, ns=(0, 10**18))
    assert image_key(p) == k1  # same bytes, other mtime
    p.write_bytes(b"12346")  # same size, other bytes
    os.utime(p, ns=(0, 10**18))
    k2 = image_key(p)
    p.write_bytes(b"123456")
    k3 = image_key(p)
    assert len({k1, k2, k3}) == 3 and k1.startswith(os.path.realpath(p) + "|5|")
    # a symlink shares the key of its target
    (tmp_path / "link.bin").symlink_to(p)
    assert image_key(tmp_path / "link.bin") == k3


def test_invalidated_when_preprocessing_weights_or_namespace_change(class_folders, tiny_backbone):
    paths = _paths(class_folders)[:4]
    count = _Counter(tiny_backbone)
    _extract(tiny_backbone, paths)
    assert count.images == 4
    ns0 = tiny_backbone.cache_namespace

    tiny_backbone.preprocessing = Preprocessing(resize=24, crop=24)  # other preprocessing
    assert tiny_backbone.cache_namespace != ns0
    _extract(tiny_backbone, paths)
    assert count.images == 8

    _extract(tiny_backbone, paths, namespace_suffix="|hflip",
             transform=Preprocessing(resize=24, crop=24).transform())
    assert count.images == 12
    _extract(tiny_backbone, paths, namespace_suffix="|hflip",
             transform=Preprocessing(resize=24, crop=24).transform())
    assert count.images == 12
    with pytest.raises(ValueError, match="namespace_suffix"):
        _extract(tiny_backbone, paths, transform=lambda im: im)

    # other weights: the weights id is part of the namespace
    type(tiny_backbone).weights_id = property(lambda self: "finetuned-abc")
    try:
        assert "finetuned-abc" in tiny_backbone.cache_namespace
        _extract(tiny_backbone, paths)
        assert count.images == 16
    finally:
        del type(tiny_backbone).weights_id


def test_efficientnet_namespace_names_its_weights_and_preprocessing():
    from resend_novelty.backbones import Backbone

    bb = Backbone(Preprocessing(resize=256, crop=224))
    bb.name = "x"
    ns = bb.cache_namespace
    assert ns.startswith("x|none|resize256-crop224")
    bb.preprocessing = Preprocessing(resize=256, crop=224, mean=(0.1, 0.2, 0.3))
    assert bb.cache_namespace != ns


def test_cached_vector_of_wrong_dimension_is_an_error(class_folders, tiny_backbone):
    paths = _paths(class_folders)[:2]
    cache = FeatureCache()
    cache.put_many(tiny_backbone.cache_namespace, [image_key(p) for p in paths], np.ones((2, 8)))
    with pytest.raises(ValueError, match=r"cached feature of .*0\.png has dimension 8.*gives 16"):
        _extract(tiny_backbone, paths)


def test_nan_features_are_rejected(class_folders, tiny_backbone):
    tiny_backbone.net[0].bias.data[0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf values in 12 row\(s\), first at index 0"):
        _extract(tiny_backbone, _paths(class_folders), cache=False)
    with pytest.raises(ValueError, match=r"1 row\(s\), first at index 2"):
        check_features(torch.tensor([[0.0], [1.0], [float("inf")]]))


def test_missing_and_bad_images(class_folders, tiny_backbone):
    paths = _paths(class_folders)
    with pytest.raises(DataError, match="image not found: .*nope.png"):
        _extract(tiny_backbone, paths + [str(class_folders / "nope.png")])
    with pytest.raises(DataError, match="no images given"):
        _extract(tiny_backbone, [])
    bad = class_folders / "bad.png"
    bad.write_bytes(open(paths[0], "rb").read()[:60])
    with pytest.raises(DataError, match=f"cannot decode image {bad}"):
        _extract(tiny_backbone, paths + [str(bad)])


def test_cache_roundtrip_and_namespaces(tmp_path):
    c = FeatureCache(tmp_path / "c")
    v = np.arange(12, dtype=np.float32).reshape(3, 4)
    c.put_many("ns-a", ["k1", "k2", "k3"], v)
    c.put_many("ns-b", ["k1"], np.zeros((1, 2)))
    got = c.get_many("ns-a", ["k3", "k1", "missing"])
    assert set(got) == {"k1", "k3"} and np.array_equal(got["k3"], v[2])
    assert c.get_many("ns-b", ["k1"])["k1"].shape == (2,)
    assert c.count() == 4 and c.count("ns-a") == 3 and c.count("ns-c") == 0
    # many keys (more than the 500-key chunk of a query)
    keys = [f"key{i}" for i in range(1200)]
    c.put_many("big", keys, np.random.default_rng(0).normal(size=(1200, 3)))
    assert len(c.get_many("big", keys)) == 1200
    c.close()
    assert FeatureCache(tmp_path / "c").count("ns-a") == 3  # persisted


def _vec(key: str, dim: int = 32) -> np.ndarray:
    seed = int.from_bytes(key.encode()[-8:].rjust(8, b"\0"), "little") % (2**32)
    return np.random.default_rng(seed).normal(size=dim).astype(np.float32)


def _writer_reader(directory, worker, n_batches, q):
    """Write batches of keys (half shared with the other worker) and read them back."""
    try:
        cache = FeatureCache(directory)
        errors = 0
        for b in range(n_batches):
            keys = [f"shared-{b}-{i}" for i in range(20)] + [f"own{worker}-{b}-{i}" for i in range(20)]
            cache.put_many("ns", keys, np.stack([_vec(k) for k in keys]))
            got = cache.get_many("ns", keys + [f"shared-{b + 1}-0"])
            for k in keys:
                if not np.array_equal(got[k], _vec(k)):
                    errors += 1
            other = f"shared-{b + 1}-0"  # may or may not be there yet: never half-written
            if other in got and not np.array_equal(got[other], _vec(other)):
                errors += 1
        q.put(("ok", worker, errors))
    except BaseException as exc:  # pragma: no cover - reported to the parent
        q.put(("error", worker, repr(exc)))


def test_concurrent_processes_keep_the_cache_valid(tmp_path):
    directory = tmp_path / "shared_cache"
    FeatureCache(directory).put_many("ns", ["seed"], _vec("seed")[None])  # create the DB
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    n_batches = 25
    procs = [ctx.Process(target=_writer_reader, args=(directory, w, n_batches, q)) for w in (0, 1)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(results) == [("ok", 0, 0), ("ok", 1, 0)], results
    conn = sqlite3.connect(directory / "features.sqlite")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    cache = FeatureCache(directory)
    keys = ["seed"] + [f"shared-{b}-{i}" for b in range(n_batches) for i in range(20)] + [
        f"own{w}-{b}-{i}" for w in (0, 1) for b in range(n_batches) for i in range(20)]
    got = cache.get_many("ns", keys)
    assert len(got) == len(keys) == cache.count("ns")
    assert all(np.array_equal(got[k], _vec(k)) for k in keys)


def _extract_in_child(backbone, directory, paths, q):
    torch.set_num_threads(1)  # a forked child must not reuse the parent's thread pool
    try:
        feats = extract_features(backbone, paths, cache=FeatureCache(directory), num_workers=0,
                                 device="cpu", progress=False, batch_size=3)
        q.put(("ok", feats.numpy()))
    except BaseException as exc:  # pragma: no cover - reported to the parent
        q.put(("error", repr(exc)))


def test_two_processes_extracting_the_same_images(class_folders, tiny_backbone, tmp_path):
    """Two processes fill the same cache with the same images at once: same, correct vectors."""
    paths = _paths(class_folders) + sorted(str(p) for p in (class_folders / "test").rglob("*.png"))
    directory = tmp_path / "cc"
    ref = _extract(tiny_backbone, paths, cache=False)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_extract_in_child, args=(tiny_backbone, directory, paths, q))
             for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    for status, feats in results:
        assert status == "ok", feats
        np.testing.assert_allclose(feats, ref.numpy(), atol=1e-6)
    cache = FeatureCache(directory)
    assert cache.count(tiny_backbone.cache_namespace) == len(paths)
    count = _Counter(tiny_backbone)
    again = _extract(tiny_backbone, paths, cache=cache)
    assert count.images == 0
    torch.testing.assert_close(again, ref, atol=1e-6, rtol=0)
