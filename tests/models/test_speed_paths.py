"""Speed paths of the relational scorer: the shared-work fast path of pairwise_logits equals
relate(), the generic path is used in train mode and by subclasses, the detector streams test
features in chunks, and the broadcast short-sequence attention equals SDPA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resend_novelty.detectors import ReSeNDDetector
from resend_novelty.models import RelationalConfig, RelationalModule, sdpa_attention, short_attention



@pytest.mark.parametrize("depth", [1, 2, 3])
def test_fast_pairwise_path_equals_relate_and_is_used(depth, monkeypatch, spread_model):
    m = spread_model(depth=depth, seed=depth)
    q, k = torch.randn(9, 24), torch.randn(4, 24)
    with torch.no_grad():
        ref = m(q.repeat_interleave(4, 0), k.repeat(9, 1)).view(9, 4)  # relate(), query-major
        assert m._fast_pairs()

        def boom(*a, **kw):
            raise AssertionError("eval-mode pairwise_logits should not call relate()")

        monkeypatch.setattr(m, "relate", boom)  # instance attribute: class relate unchanged
        fast = m.pairwise_logits(q, k, chunk_pairs=5)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    assert ref.std() > 1e-2


def test_train_mode_and_subclasses_use_relate(spread_model):
    m = spread_model()
    m.train()
    assert not m._fast_pairs()

    class Custom(RelationalModule):
        def relate(self, z_i, z_j):
            return super().relate(z_i, z_j) + 1.0

    torch.manual_seed(0)
    c = Custom(RelationalConfig(feature_dim=24, dim=32, depth=2, heads=4)).eval()
    assert not c._fast_pairs()
    q, k = torch.randn(3, 24), torch.randn(2, 24)
    with torch.no_grad():
        base = RelationalModule.pairwise_logits(c, q, k)
        torch.testing.assert_close(base, RelationalModule.relate(c, *_pairs(c, q, k)).view(3, 2) + 1.0)


def _pairs(m, q, k):
    zq, zk = m.encode(q), m.encode(k)
    return (zq.repeat_interleave(len(k), 0), zk.repeat(len(q), 1))


def test_detector_streams_test_features_in_chunks(monkeypatch, spread_model):
    m = spread_model()
    det = ReSeNDDetector(model=m, backbone=None, device="cpu", progress=False, chunk_pairs=3 * 4)
    det.fit_features(torch.randn(6, 24), np.array([0, 0, 1, 1, 2, 2]))
    seen = []
    encode = RelationalModule.encode

    def spy(self, f):
        seen.append(f.shape[0])
        return encode(self, f)

    monkeypatch.setattr(RelationalModule, "encode", spy)
    scores = det.score_features(torch.randn(50, 24))
    assert scores.shape == (50,)
    # prototypes (3), an empty dimension check (0), then query chunks of <= 12 // 3 rows
    assert seen[0] == 3 and max(seen[1:]) <= 4 and sum(seen[1:]) == 50


def test_default_chunk_is_small_on_cpu(monkeypatch, spread_model):
    m = spread_model()
    det = ReSeNDDetector(model=m, backbone=None, device="cpu", progress=False)
    det.fit_features(torch.randn(4, 24), np.array([0, 0, 1, 1]))
    got = {}
    orig = RelationalModule.pairwise_logits

    def spy(self, q, k, chunk_pairs=65536):
        got["chunk"] = chunk_pairs
        return orig(self, q, k, chunk_pairs)

    monkeypatch.setattr(RelationalModule, "pairwise_logits", spy)
    det.score_features(torch.randn(5, 24))
    assert got["chunk"] == 4096


def test_broadcast_attention_equals_sdpa():
    g = torch.Generator().manual_seed(0)
    for lq in (3, 1):
        q = torch.randn(50, lq, 32, generator=g)
        k, v = torch.randn(50, 3, 32, generator=g), torch.randn(50, 3, 32, generator=g)
        torch.testing.assert_close(short_attention(q, k, v, 4), sdpa_attention(q, k, v, 4),
                                   atol=1e-5, rtol=1e-5)
