"""Helpers of the benchmark scripts in the library: exported-features lookup, BENCHMARKS.md
sections made of parts, the peak-memory meter and the arithmetic counts of the scorer."""

from __future__ import annotations

import json
import mmap
import time

import pytest
import torch
from safetensors.torch import save_file

from resend_novelty.report import (
    PeakMemory,
    batched_macs,
    features_file_lookup,
    gemm_gflops,
    loop_macs,
    write_section_parts,
)


def write_parts(new, path):
    """The parts of section "speed", as benchmarks/speed.py writes them."""
    return write_section_parts("speed", new, path, "speed part", ("a", "b", "c", "d"), "## Speed")


def test_features_file_lookup_matches_by_trailing_path(tmp_path):
    exported = [f"/elsewhere/data/pacs/{d}/dog/{i}.jpg" for d in ("photo", "sketch") for i in range(3)]
    feats = torch.arange(len(exported), dtype=torch.float32)[:, None].repeat(1, 4)
    f = tmp_path / "f.safetensors"
    save_file({"features": feats}, str(f), metadata={"paths": json.dumps(exported)})
    fn, n = features_file_lookup(f)
    assert n == 6
    got = fn([str(tmp_path / "pacs/sketch/dog/1.jpg"), str(tmp_path / "pacs/photo/dog/2.jpg")])
    assert got[:, 0].tolist() == [4.0, 2.0]
    with pytest.raises(KeyError, match="not in the features file"):
        fn([str(tmp_path / "pacs/cartoon/dog/1.jpg")])
    assert fn.backbone is None  # exported before the backbone name was recorded
    save_file({"features": feats.half()}, str(f),
              metadata={"paths": json.dumps(exported), "backbone": "efficientnet_lite1"})
    fn, _ = features_file_lookup(f)  # fp16 exports (--fp16) are upcast
    assert fn.backbone == "efficientnet_lite1" and fn([exported[5]]).dtype == torch.float32


def test_section_keeps_parts_of_other_runs(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n<!-- BEGIN other -->\nkeep me\n<!-- END other -->\n")
    write_parts({"a": "### (a)\n\nA1"}, path=md)
    write_parts({"c": "### (c)\n\nC1"}, path=md)
    write_parts({"a": "### (a)\n\nA2"}, path=md)
    text = md.read_text()
    assert "keep me" in text and "A2" in text and "C1" in text and "A1" not in text
    assert text.index("A2") < text.index("C1")


def test_peak_memory_sees_an_allocation():
    with PeakMemory(torch.device("cpu")) as base:
        pass
    with PeakMemory(torch.device("cpu")) as pk:
        # 64 MiB of fresh pages, alive at exit (an anonymous mapping: malloc could reuse memory
        # freed by earlier tests that is still resident, and the RSS would not move)
        big = mmap.mmap(-1, 64 * 2**20)
        big.write(b"\1" * (64 * 2**20))
        time.sleep(0.1)  # let the sampler see it
    assert big[0] == 1
    assert pk.rss_mb >= base.rss_mb + 40
    assert pk.gpu_mb is None


def test_arithmetic_counts_match_a_hand_count():
    c = {"feature_dim": 1280, "dim": 128, "depth": 4, "mlp_ratio": 4.0}
    d2 = 128 * 128
    # loop: two projections + 4 full blocks of 3 tokens x (qkv 3 + out 1 + mlp 8) d^2
    assert loop_macs(c) == 2 * 1280 * 128 + 4 * 3 * 12 * d2
    # batched: block 1 without qkv (3 x 9), two full blocks (2 x 36), last block: k/v of 3 tokens,
    # q/out/mlp of the label token (6 + 1 + 1 + 8)
    assert batched_macs(c) == (27 + 72 + 16) * d2
    assert batched_macs({**c, "depth": 1}) == 9 * d2
    assert gemm_gflops(16, torch.device("cpu"), rows=256) > 0
