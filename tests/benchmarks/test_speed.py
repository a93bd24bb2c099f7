"""benchmarks/speed.py run as a script with tiny arguments: part (a), the batched scorer equals
the one-at-a-time loop, and part (c), frozen-backbone training reports its pairs per second."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from resend_novelty.models import save_checkpoint

SPEED = Path(__file__).resolve().parents[2] / "benchmarks" / "speed.py"


@pytest.fixture(scope="module")
def speed_run(tmp_path_factory, spread_model):
    """One run of parts a and c on the CPU: (raw JSON results, printed markdown)."""
    tmp = tmp_path_factory.mktemp("speed")
    ckpt = tmp / "spread.safetensors"
    save_checkpoint(spread_model(), ckpt)
    out = tmp / "speed.json"
    cmd = [sys.executable, str(SPEED), "--device", "cpu", "--parts", "a", "c", "--no-write",
           "--json", str(out), "--quiet",
           # part a: 13 test features x 3 prototypes, chunks of 7 pairs, 1 thread
           "--a-model", str(ckpt), "--n-test", "13", "--n-protos", "3", "--loop-n", "13",
           "--a-threads", "1", "--chunk-pairs", "7",
           # part c: one frozen-backbone step on 64 synthetic 16-d items of 4 classes
           "--train-modes", "frozen", "--train-steps", "1", "--train-batch", "32",
           "--train-items", "64", "--train-classes", "4", "--train-feature-dim", "16",
           "--optimizer", "adamw", "--train-model", json.dumps({"dim": 16, "depth": 1, "heads": 2})]
    env = {k: v for k, v in os.environ.items() if k != "RESEND_DATA"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_part_a_batched_scores_equal_the_loop(speed_run):
    results, md = speed_run
    res = results["a"]
    b, loop = np.asarray(res["batched_scores"]), np.asarray(res["loop_scores"])
    assert b.shape == loop.shape == (13,)
    assert b.std() > 1e-3, "scores should vary between test images"
    np.testing.assert_allclose(b, loop, atol=1e-5, rtol=0)
    variants = [r["variant"] for r in res["rows"]]
    assert variants[0] == "batched" and variants[-1].startswith("loop")
    assert all(r["ratio"] > 0 for r in res["rows"] if "loop_n" not in r)
    assert res["rows"][-1]["max_abs_score_diff"] < 1e-5
    assert "| batched | 1 |" in md and "extrapolated" in md


def test_part_c_frozen_training_reports_pairs_per_second(speed_run):
    results, md = speed_run
    r = results["c"]["frozen"]
    assert r["steps"] == 1 and r["batch_pairs"] == 32 and r["pairs_per_s"] > 0
    assert "frozen" in md.split("(c) Pretraining throughput", 1)[1]
