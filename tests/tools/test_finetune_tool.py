"""tools/finetune_backbones.py end to end on a generated reference set (CPU, --smoke), run as
a script from the repository root."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
TOOL = "tools/finetune_backbones.py"


def run_tool(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, TOOL, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)


@pytest.fixture
def reference_set(tmp_path):
    rng = np.random.default_rng(0)
    train = tmp_path / "data" / "tiny_imagenet_200" / "train"
    for c in range(9):
        d = train / f"n{c:08d}"
        d.mkdir(parents=True)
        base = rng.integers(0, 256, 3)
        for i in range(10):
            arr = np.clip(base + rng.normal(0, 40, (64, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"n{c:08d}_{i}.JPEG")
    return tmp_path / "data"


def test_smoke_run_logs_every_epoch_and_the_ensembles(reference_set, tmp_path):
    from resend_novelty.backbones import EfficientNetLite

    imagenet = tmp_path / "imagenet"
    r = run_tool("--export-imagenet", str(imagenet), "--backbones", "efficientnet_lite0")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    r = run_tool("--data-root", str(reference_set), "--out", str(out), "--smoke",
                 "--backbones", "efficientnet_lite0", "--configs", "distill", "--epochs", "1",
                 "--val-classes", "7", "--episodes", "2", "--workers", "0",
                 "--imagenet-dir", str(imagenet))
    assert r.returncode == 0, r.stderr[-3000:]
    log = json.loads((out / "log.json").read_text())
    assert [(e["config"], e["epoch"]) for e in log["epochs"]] == [("distill", 0), ("distill", 1)]
    assert log["epochs"][1]["loss"] > 0  # a training step ran
    for e in log["epochs"]:
        assert 0 <= e["proxy"]["mean"] <= 1
    # frozen vs fine-tuned ensemble rows; the 2560-d relational model is skipped on 1280-d features
    assert [r["features"] for r in log["ensembles"]] == ["frozen", "distill"]
    assert all(set(r) == {"features", "cosine-standardized|seed0|2", "cosine-standardized|seed1|8"}
               for r in log["ensembles"])
    best = log["best_epoch"]["distill|efficientnet_lite0"]
    weights = out / "distill-efficientnet_lite0.safetensors"
    assert weights.is_file() == (best > 0)
    if best > 0:
        assert EfficientNetLite(variant=0, weights=weights).weights_id.startswith("file-")


def test_missing_imagenet_export_is_named(reference_set, tmp_path):
    # SystemExit(message): exit status 1, the message on stderr
    r = run_tool("--data-root", str(reference_set), "--out", str(tmp_path / "o"), "--smoke",
                 "--backbones", "efficientnet_lite0", "--val-classes", "7", "--workers", "0",
                 "--imagenet-dir", str(tmp_path / "nowhere"))
    assert r.returncode == 1
    assert "export-imagenet" in r.stderr.strip().splitlines()[-1]
