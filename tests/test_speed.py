"""Speed paths: the batched scorer equals the one-at-a-time loop, the shared-work fast path of
pairwise_logits equals relate(), test features are streamed in chunks, and the helpers of
benchmarks/speed.py (exported-features lookup, report merging, peak memory) work."""

from __future__ import annotations

import importlib.util
import json
import mmap
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from resend_novelty.detectors.base import ReSeNDDetector
from resend_novelty.models.relational import RelationalConfig, RelationalModule

SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("speed_bench", SPEED)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["speed_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


def _spread_model(depth=2, seed=0, **kw) -> RelationalModule:
    """Small model with weights spread out (the default init makes all outputs nearly equal)."""
    torch.manual_seed(seed)
    m = RelationalModule(RelationalConfig(feature_dim=24, dim=32, depth=depth, heads=4, **kw))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m.eval()


def test_part_a_batched_scores_equal_the_loop(speed):
    model = _spread_model()
    res = speed.part_a(torch.device("cpu"), n_test=13, n_protos=3, loop_n=13,
                       thread_counts=(1,), chunk_pairs=7, model=model)
    b, loop = res["batched_scores"], res["loop_scores"]
    assert b.shape == loop.shape == (13,)
    assert b.std() > 1e-3, "scores should vary between test images"
    np.testing.assert_allclose(b, loop, atol=1e-5, rtol=0)
    variants = [r["variant"] for r in res["rows"]]
    assert variants[0] == "batched" and variants[-1].startswith("loop")
    assert all(r["ratio"] > 0 for r in res["rows"] if "loop_n" not in r)
    assert res["rows"][-1]["max_abs_score_diff"] < 1e-5
    md = speed.format_a(res, torch.device("cpu"))
    assert "| batched | 1 |" in md and "extrapolated" in md


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_fast_pairwise_path_equals_relate_and_is_used(depth, monkeypatch):
    m = _spread_model(depth=depth, seed=depth)
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


def test_train_mode_and_subclasses_use_relate():
    m = _spread_model()
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


def test_detector_streams_test_features_in_chunks(monkeypatch):
    m = _spread_model()
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


def test_default_chunk_is_small_on_cpu(monkeypatch):
    m = _spread_model()
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


def test_features_file_lookup_matches_by_trailing_path(speed, tmp_path):
    from safetensors.torch import save_file

    exported = [f"/elsewhere/data/pacs/{d}/dog/{i}.jpg" for d in ("photo", "sketch") for i in range(3)]
    feats = torch.arange(len(exported), dtype=torch.float32)[:, None].repeat(1, 4)
    f = tmp_path / "f.safetensors"
    save_file({"features": feats}, str(f), metadata={"paths": json.dumps(exported)})
    fn, n = speed.features_file_lookup(f)
    assert n == 6
    got = fn([str(tmp_path / "pacs/sketch/dog/1.jpg"), str(tmp_path / "pacs/photo/dog/2.jpg")])
    assert got[:, 0].tolist() == [4.0, 2.0]
    with pytest.raises(KeyError, match="not in the features file"):
        fn([str(tmp_path / "pacs/cartoon/dog/1.jpg")])
    assert fn.backbone is None  # exported before the backbone name was recorded
    save_file({"features": feats.half()}, str(f),
              metadata={"paths": json.dumps(exported), "backbone": "efficientnet_lite1"})
    fn, _ = speed.features_file_lookup(f)  # fp16 exports (--fp16) are upcast
    assert fn.backbone == "efficientnet_lite1" and fn([exported[5]]).dtype == torch.float32


def test_report_keeps_parts_of_other_runs(speed, tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n<!-- BEGIN other -->\nkeep me\n<!-- END other -->\n")
    speed.write_report("speed", {"a": "### (a)\n\nA1"}, path=md)
    speed.write_report("speed", {"c": "### (c)\n\nC1"}, path=md)
    speed.write_report("speed", {"a": "### (a)\n\nA2"}, path=md)
    text = md.read_text()
    assert "keep me" in text and "A2" in text and "C1" in text and "A1" not in text
    assert text.index("A2") < text.index("C1")


def test_peak_memory_sees_an_allocation(speed):
    with speed.Peak(torch.device("cpu")) as base:
        pass
    with speed.Peak(torch.device("cpu")) as pk:
        # 64 MiB of fresh pages, alive at exit (an anonymous mapping: malloc could reuse memory
        # freed by earlier tests that is still resident, and the RSS would not move)
        big = mmap.mmap(-1, 64 * 2**20)
        big.write(b"\1" * (64 * 2**20))
        time.sleep(0.1)  # let the sampler see it
    assert big[0] == 1
    assert pk.rss_mb >= base.rss_mb + 40
    assert pk.gpu_mb is None


def test_part_c_frozen_training_reports_pairs_per_second(speed, tmp_path):
    res = speed.part_c(torch.device("cpu"), None, tmp_path, steps=1, batch_pairs=32, items=64,
                       classes=4, optimizer="adamw", modes=("frozen",), feature_dim=16,
                       model_cfg={"dim": 16, "depth": 1, "heads": 2})
    r = res["frozen"]
    assert r["steps"] == 1 and r["batch_pairs"] == 32 and r["pairs_per_s"] > 0
    assert "frozen" in speed.format_c(res, torch.device("cpu"))


def test_arithmetic_counts_match_a_hand_count(speed):
    c = {"feature_dim": 1280, "dim": 128, "depth": 4, "mlp_ratio": 4.0}
    d2 = 128 * 128
    # loop: two projections + 4 full blocks of 3 tokens x (qkv 3 + out 1 + mlp 8) d^2
    assert speed.loop_macs(c) == 2 * 1280 * 128 + 4 * 3 * 12 * d2
    # batched: block 1 without qkv (3 x 9), two full blocks (2 x 36), last block: k/v of 3 tokens,
    # q/out/mlp of the label token (6 + 1 + 1 + 8)
    assert speed.batched_macs(c) == (27 + 72 + 16) * d2
    assert speed.batched_macs({**c, "depth": 1}) == 9 * d2
    assert speed.gemm_gflops(16, torch.device("cpu"), rows=256) > 0


def test_broadcast_attention_equals_sdpa(speed):
    from resend_novelty.models.relational import _short_attention

    g = torch.Generator().manual_seed(0)
    for lq in (3, 1):
        q = torch.randn(50, lq, 32, generator=g)
        k, v = torch.randn(50, 3, 32, generator=g), torch.randn(50, 3, 32, generator=g)
        torch.testing.assert_close(_short_attention(q, k, v, 4), speed._sdpa_attention(q, k, v, 4),
                                   atol=1e-5, rtol=1e-5)
