"""Speed of ReSeND: batched scoring vs a one-image-at-a-time loop, feature extraction,
pretraining throughput and the wall time of the 7 PACS settings (issue 8).

    python benchmarks/speed.py --data-root ../shared/data                 # parts a-e (warm cache)
    python benchmarks/speed.py --parts a --n-test 2048 --loop-n 200       # scorer only, no data needed
    python benchmarks/speed.py --parts d --cold --data-root ../shared/data   # + cold feature cache
    python benchmarks/speed.py --parts e --data-root ../shared/data --e-torch-cache DIR  # engines
    python benchmarks/speed.py --parts f --data-root ../shared/data  # scale (warm feature cache)

Parts (all in one process, on one ``--device``; every number below is measured in this run):

a. Relational scoring of N test features against K prototypes with a default
   :class:`RelationalConfig` (1280-d features, random weights: timing only). *Batched* =
   ``ReSeNDDetector.score_features`` (all pairs in large chunks under ``inference_mode``, each
   image projected once, bf16 autocast on CUDA). *Loop* = the official approach: for each test
   image build its K pairs and run the full model forward on them (projection included), fp32.
   The loop runs on the first ``--loop-n`` images and is extrapolated per image to N; the scores
   of those images must agree (allclose). On CPU it is repeated with 1 thread (``--a-threads``).
b. Feature extraction (EfficientNet-Lite0, no cache) of a fixed subset of PACS images (evenly
   spaced over the sorted file list) or of ``--images DIR``: images/s from JPEG files, and of the
   backbone alone on already-decoded tensors.
c. Pretraining pairs/s: frozen-backbone mode on a synthetic .safetensors features file, and
   end-to-end mode (``TrainConfig(frozen_backbone=False)``) on a handful of PACS images given as
   a list file. A 1-step warm-up run precedes each timed run.
e. The inference engines on a plain CPU (issue 20, :mod:`_speed_engine`): on the same
   ``--e-images`` PACS images decode alone, inference alone (torch vs ONNX Runtime, fraction of
   the FLOP limit) and cold extraction with each engine; then the cold wall time of the README's
   main job ``resend benchmark pacs-multi`` (fresh cache, ``--engine auto``) and its AUROC/FPR95
   next to ``--engine torch`` on ``--e-torch-cache`` (``--e-no-job`` skips the job).
f. Scale (issue 24, :mod:`_speed_scale`): per-test-image time and peak RSS of the default
   scoring (candidate classes) for 6 to 1,000 classes and 1k to 100k support images (synthetic
   features), exact scoring next to it up to ``--f-exact-max`` classes, and the AUROC of the
   shortcut against exact scoring on every PACS target (cached features; the rule for the
   default number of candidates is in :mod:`_speed_scale`).
d. Wall time of the 7 PACS targets (pacs-multi 4 + pacs-single 3) through
   ``resend_novelty.evaluation.run_benchmark`` from images, with the cosine and the resend
   method. ``--cold`` first runs them with a fresh, empty ``RESEND_CACHE`` (full extraction of
   every image), then again warm; without it only the existing cache is used (its coverage is reported).
   ``--features-file F`` (from ``resend features DIR --export F``) replaces images and cache by
   exported features (for a machine that has the lists but not the images).

Peak RSS (main process, sampled) and peak GPU memory (``torch.cuda.max_memory_allocated``) are
reported for every measurement. Results go to BENCHMARKS.md, section ``speed`` (``--section``);
each part keeps its own block there, so parts can be rerun separately.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from _report import BENCHMARKS_MD, machine
from _speed_engine import format_e, part_e
from _speed_scale import DEFAULT_GRID, format_f, part_f

from resend_novelty.backbones import build_backbone
from resend_novelty.data import list_images, load_image
from resend_novelty.detectors import ReSeNDDetector, build_detector
from resend_novelty.evaluation import get_setting, load_setting_lists, run_benchmark
from resend_novelty.features import FeatureCache, extract_features, image_key
from resend_novelty.models import (
    SHIPPED_NAME,
    CheckpointError,
    RelationalConfig,
    RelationalModule,
    default_checkpoint_path,
    load_checkpoint,
    save_checkpoint,
    sdpa_attention,
)
from resend_novelty.report import (
    PeakMemory,
    batched_macs,
    features_file_lookup,
    gemm_gflops,
    loop_macs,
    section_parts,
    sync_device,
    torch_threads,
    write_section_parts,
)
from resend_novelty.training import TrainConfig, train

PARTS = ("a", "b", "c", "d", "e", "f")
PART_LABEL = "speed part"  # BENCHMARKS.md: "<!-- speed part a -->" opens part a of the section
PART_TITLES = {
    "a": "(a) Relational scoring: batched vs one test image at a time",
    "b": "(b) Feature extraction (EfficientNet-Lite0, no cache)",
    "c": "(c) Pretraining throughput",
    "d": "(d) PACS, all 7 targets, from images",
    "e": "(e) Inference engines on the CPU: torch vs ONNX Runtime, cold extraction, the main job",
    "f": "(f) Scale: candidate classes, 6 to 1,000 classes, 1k to 100k support images",
}


# --------------------------------------------------------------------------- formatting
def rss_cell(r: dict) -> str:
    """Peak RSS, with the RSS at the start of the measurement (memory the process already held)."""
    start = r.get("start_rss_mb")
    return f"{r['peak_rss_mb']:.0f}" + ("" if start is None else f" (start {start:.0f})")


# --------------------------------------------------------------------------- part a
@torch.inference_mode()
def reference_loop_scores(model, prototypes: torch.Tensor, test: torch.Tensor,
                          device: torch.device, normality: str = "softmax") -> np.ndarray:
    """The official approach: one test image at a time, its K pairs through the full model."""
    protos = prototypes.to(device)
    k = protos.shape[0]
    out = np.empty(len(test))
    for i in range(len(test)):
        f = test[i : i + 1].to(device).expand(k, -1)  # the K pairs (test image, prototype c)
        logits = model(f, protos)  # eq. 2 projection of both images + blocks + head
        if normality == "max-logit":
            out[i] = logits.float().max().item()
        else:
            out[i] = torch.softmax(logits.float(), dim=0).max().item()  # normality of image i
    return out


REPEATS = 3  # part a: every scorer is timed REPEATS times, the fastest run is reported


class _GenericRelate(RelationalModule):
    """The relational module scored pair by pair: a subclass with its own ``relate`` (the same
    function) makes ``pairwise_logits`` take the generic path, without the shared work."""

    def relate(self, z_i, z_j):
        return super().relate(z_i, z_j)


def _variant(model: RelationalModule, device: torch.device, attention=None,
             generic: bool = False) -> RelationalModule:
    """A copy of ``model`` (same weights and scoring) with another attention function of the
    shared-work path, or scored pair by pair (``generic``), for the comparison rows."""
    cls = _GenericRelate if generic else RelationalModule
    kw = {} if attention is None else {"attention": attention}
    m = cls(model.config, model.scoring, **kw)
    m.load_state_dict(model.state_dict())
    return m.eval().to(device)


def part_a(device: torch.device, n_test: int = 2048, n_protos: int = 6, loop_n: int = 200,
           thread_counts=(None,), chunk_pairs: int | None = None, seed: int = 0,
           config: dict | None = None, plain_row: bool = True, model=None) -> dict:
    """Batched scorer vs the one-at-a-time loop. Returns rows and the scores of both (checked).

    ``model``: a RelationalModule to time instead of a fresh default one (``config``).
    """
    torch.manual_seed(seed)
    model_note = "the given model"
    if model is None:
        model = RelationalModule(RelationalConfig(**(config or {})))
        model_note = "random weights" + ("" if config else " (the default config)")
    cfg = model.config
    model = model.eval().to(device)
    g = torch.Generator().manual_seed(seed)
    # backbone features are non-negative (pooled ReLU6 activations)
    protos = torch.rand(n_protos, cfg.feature_dim, generator=g)
    test = torch.rand(n_test, cfg.feature_dim, generator=g)
    # center=False: the loop below scores raw features, so the batched scorer must too;
    # neighbors=0: one prototype per class, as in the loop (whatever the checkpoint's default)
    def detector(m):
        d = ReSeNDDetector(model=m, backbone=None, device=device, progress=False,
                           chunk_pairs=chunk_pairs, center=False, neighbors=0)
        return d.fit_features(protos, np.arange(n_protos))

    det = detector(model)
    loop_n = max(1, min(loop_n, n_test))
    amp = device.type == "cuda"
    tol = 5e-2 if amp else 1e-4  # bf16 batched vs fp32 loop on GPU; both fp32 on CPU
    rows = []
    batched = loop = None
    for nt in thread_counts:
        with torch_threads(nt):
            nthreads = torch.get_num_threads()
            det.score_features(test[: min(n_test, 64)])  # warm-up
            reference_loop_scores(model, protos, test[:2], device)
            variants = [("batched", None, det)]
            if plain_row:
                variants.append(("batched, SDPA for the 3-token attention (used until 2026-11-27)",
                                 "sdpa", detector(_variant(model, device, attention=sdpa_attention))))
                variants.append(("batched, plain relate (no shared work)", False,
                                 detector(_variant(model, device, generic=True))))
            best = {label: float("inf") for label, _, _ in variants}
            peaks: dict = {}
            for _ in range(REPEATS):  # interleaved, fastest run of each: no order effect
                for label, fast, d in variants:
                    with PeakMemory(device) as pk:
                        sync_device(device)
                        t0 = time.perf_counter()
                        scores = d.score_features(test)
                        sync_device(device)
                        best[label] = min(best[label], time.perf_counter() - t0)
                    if fast is None:
                        batched = scores
                    old = peaks.get(label)
                    if old is None or (pk.rss_mb or 0) > (old.rss_mb or 0):
                        peaks[label] = pk
            for label, fast, _ in variants:
                tb = best[label]
                rows.append({"variant": label, "threads": nthreads, "n_test": n_test,
                             "n_protos": n_protos, "seconds": tb, "ms_per_image": 1e3 * tb / n_test,
                             **peaks[label].json()})
                if fast is None:
                    rows[-1]["gemm_gflops"] = gemm_gflops(cfg.dim, device)
            with PeakMemory(device) as pk:
                tl = float("inf")
                for _ in range(REPEATS):
                    sync_device(device)
                    t0 = time.perf_counter()
                    loop = reference_loop_scores(model, protos, test[:loop_n], device,
                                                 det.normality)
                    sync_device(device)
                    tl = min(tl, time.perf_counter() - t0)
            per_img = tl / loop_n
            diff = float(np.abs(batched[:loop_n] - loop).max())
            if not np.allclose(batched[:loop_n], loop, atol=tol, rtol=0):
                raise AssertionError(f"batched and loop scores differ by up to {diff:.2e} (tol {tol})")
            loop_row = {"variant": "loop (official: one test image, K pairs, full forward)",
                        "threads": nthreads, "n_test": n_test, "n_protos": n_protos,
                        "loop_n": loop_n, "loop_seconds": tl, "ms_per_image": 1e3 * per_img,
                        "seconds": per_img * n_test, "max_abs_score_diff": diff, **pk.json()}
            for r in rows:
                if r["threads"] == nthreads and "ratio" not in r and r is not loop_row:
                    r["ratio"] = loop_row["seconds"] / r["seconds"]
            rows.append(loop_row)
    return {"rows": rows, "batched_scores": batched, "loop_scores": loop, "tolerance": tol,
            "config": cfg.to_dict(), "model_note": model_note}


def format_a(res: dict, device: torch.device) -> str:
    rows = res["rows"]
    r0, c = rows[0], res["config"]
    lines = [
        f"`RelationalConfig` feature_dim {c['feature_dim']}, dim {c['dim']}, depth {c['depth']}, "
        f"heads {c['heads']}, {res.get('model_note', 'random weights')}; "
        f"N = {r0['n_test']} test features x K = {r0['n_protos']} prototypes, device {device.type}"
        + (" (bf16 autocast for the batched scorer)" if device.type == "cuda" else " (fp32)") + ". "
        "The loop runs the first `loop_n` test images and is extrapolated per image to N. Ratio = "
        "loop time / batched time for the same N and thread count. Every time is the fastest of "
        f"{REPEATS} runs (the batched variants interleaved).",
        "",
        "| scorer | threads | time for N (s) | ms / test image | ratio vs loop | max abs score diff | "
        "peak RSS MB | GPU peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "loop_n" in r:
            name = f"{r['variant']}, {r['loop_n']} images timed, extrapolated"
            ratio = "1"
            diff = f"{r['max_abs_score_diff']:.1e}"
        else:
            name, ratio, diff = r["variant"], f"**{r['ratio']:.1f}x**", ""
        gpu = "-" if r["peak_gpu_mb"] is None else f"{r['peak_gpu_mb']:.0f}"
        lines.append(f"| {name} | {r['threads']} | {r['seconds']:.2f} | {r['ms_per_image']:.2f} | "
                     f"{ratio} | {diff} | {rss_cell(r)} | {gpu} |")
    by_t = {}
    for r in rows:
        by_t.setdefault(r["threads"], {})["loop" if "loop_n" in r else r["variant"]] = r
    if len(by_t) > 1:
        desc = "; ".join(f"{t} thread(s): loop {v['loop']['ms_per_image']:.2f} ms, batched "
                         f"{v['batched']['ms_per_image']:.2f} ms per test image"
                         for t, v in by_t.items() if "loop" in v and "batched" in v)
        k = r0["n_protos"]
        loop_f, batched_f = 2 * k * loop_macs(c), 2 * (k * batched_macs(c) + c["feature_dim"] * c["dim"])
        ceil = "; ".join(
            f"{t} thread(s): {v['gemm_gflops']:.0f} GFLOP/s, {1e3 * batched_f / (v['gemm_gflops'] * 1e9):.2f} ms "
            f"-> at most {v['loop']['ms_per_image'] / (1e3 * batched_f / (v['gemm_gflops'] * 1e9)):.0f}x"
            for t, v in ((t, {**v, "gemm_gflops": v['batched'].get('gemm_gflops')}) for t, v in by_t.items())
            if "loop" in v and "batched" in v and v["batched"].get("gemm_gflops"))
        lines += ["", f"Per test image, {desc}. Arithmetic per test image (K = {k} prototypes): "
                  f"the loop {loop_f / 1e6:.0f} MFLOP (two projections and {c['depth']} full "
                  f"blocks per pair), the batched scorer {batched_f / 1e6:.0f} MFLOP (each image "
                  "projected once, the first block's q/k/v shared, the last block on the label "
                  "token only). Ceiling of the ratio: the batched scorer's arithmetic at the rate "
                  "of a large matrix product measured in the same run (a (12288 x dim) @ (dim x "
                  "4 dim) GEMM), as if every other operation were free - "
                  f"{ceil}. Thread synchronisation costs the loop's "
                  "hundreds of small operations per image far more than the batched scorer's few "
                  "large ones, increasingly so when other processes keep the cores busy (load "
                  "average below)."]
    return "\n".join(lines)


# --------------------------------------------------------------------------- part b
def pacs_subset(data_root: Path, n: int) -> list[str]:

    paths = list_images(Path(data_root) / "pacs")
    idx = np.linspace(0, len(paths) - 1, num=min(n, len(paths))).round().astype(int)
    return [paths[i] for i in sorted(set(idx.tolist()))]


def part_b(device: torch.device, paths: list[str], batch_size: int = 64,
           workers: int | None = None, backbone_only_n: int = 128) -> dict:
    bb = build_backbone("efficientnet_lite0")
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    kw = dict(cache=False, batch_size=batch_size, num_workers=workers, device=device,
              progress=False)
    extract_features(bb, paths[: min(len(paths), 8)], **kw)  # warm-up (weights to device)
    with PeakMemory(device) as pk:
        t0 = time.perf_counter()
        feats = extract_features(bb, paths, **kw)
        sync_device(device)
        t = time.perf_counter() - t0
    assert feats.shape == (len(paths), bb.feature_dim)
    out = {"n_images": len(paths), "batch_size": batch_size, "workers": workers, "seconds": t,
           "images_per_s": len(paths) / t, **pk.json()}
    # the backbone alone, on images decoded and preprocessed beforehand
    m = min(backbone_only_n, len(paths))
    x = torch.stack([bb.transform(load_image(p)) for p in paths[:m]])
    model = bb.to(device).to(memory_format=torch.channels_last).eval()
    amp = device.type == "cuda"

    def run():
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
            for s in range(0, m, batch_size):
                xb = x[s : s + batch_size].to(device, non_blocking=True)
                model(xb.contiguous(memory_format=torch.channels_last))
        sync_device(device)

    run()  # warm-up
    with PeakMemory(device) as pk2:
        t0 = time.perf_counter()
        run()
        t2 = time.perf_counter() - t0
    out.update(backbone_only_n=m, backbone_only_images_per_s=m / t2,
               backbone_only=pk2.json())
    return out


def format_b(r: dict, device: torch.device) -> str:
    gpu = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    bo = r["backbone_only"]
    return "\n".join([
        f"EfficientNet-Lite0 (224x224 after Resize 256 / CenterCrop), device {device.type}"
        + (", channels_last + bf16 autocast" if device.type == "cuda" else ", channels_last, fp32")
        + f", batch {r['batch_size']}, {r['workers']} DataLoader workers"
        + (" + pinned memory" if device.type == "cuda" else "") + "; no feature cache.",
        "",
        "| what | images | wall s | images/s | peak RSS MB (main process) | GPU peak MB |",
        "|---|---|---|---|---|---|",
        f"| JPEG files -> features (`extract_features`, decode + preprocess + backbone) | "
        f"{r['n_images']} | {r['seconds']:.1f} | **{r['images_per_s']:.1f}** | "
        f"{rss_cell(r)} | {gpu(r['peak_gpu_mb'])} |",
        f"| backbone alone (decoded tensors) | {r['backbone_only_n']} | "
        f"{r['backbone_only_n'] / r['backbone_only_images_per_s']:.1f} | "
        f"{r['backbone_only_images_per_s']:.1f} | {rss_cell(bo)} | "
        f"{gpu(bo['peak_gpu_mb'])} |",
    ])


# --------------------------------------------------------------------------- part c
def _num(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _train_timed(cfg_kw: dict, out_dir: Path, device: torch.device) -> dict:

    common = dict(val_every=0, val_classes=0, checkpoint_every=10**9, workers=0,
                  device=str(device))
    warm = TrainConfig(**{**cfg_kw, **common, "steps": 1, "out": str(out_dir / "warmup")})
    train(warm, progress=False)
    cfg = TrainConfig(**{**cfg_kw, **common, "out": str(out_dir / "timed")})
    with PeakMemory(device) as pk:
        t0 = time.perf_counter()
        s = train(cfg, progress=False)
        wall = time.perf_counter() - t0
    return {"steps": s["step"], "batch_pairs": cfg.batch_pairs, "pairs_per_s": s["pairs_per_s"],
            "loop_seconds": s["seconds"], "wall_seconds": wall, "optimizer": cfg.optimizer,
            **pk.json()}


def part_c(device: torch.device, data_root: Path | None, tmp: Path, steps: int = 3,
           batch_pairs: int = 4096, items: int = 8192, classes: int = 64,
           e2e_steps: int = 3, e2e_batch: int = 16, e2e_images: int = 32,
           optimizer: str = "lars", modes=("frozen", "end-to-end"), feature_dim: int = 1280,
           model_cfg: dict | None = None) -> dict:
    """Timed pretraining runs; ``model_cfg``: RelationalConfig overrides (default: none)."""

    model_cfg = dict(model_cfg or {})

    out = {}
    if "frozen" in modes:
        n = max(items, batch_pairs)  # every batch full: 2 n pairs per epoch (1 negative each)
        g = torch.Generator().manual_seed(0)
        feats = torch.rand(n, feature_dim, generator=g)
        labels = torch.arange(n) % classes
        f = tmp / "synthetic_features.safetensors"
        save_file({"features": feats, "labels": labels}, str(f))
        out["frozen"] = _train_timed(dict(data=str(f), steps=steps, batch_pairs=batch_pairs,
                                          optimizer=optimizer, model=model_cfg),
                                     tmp / "frozen", device)
        out["frozen"].update(items=n, classes=classes, feature_dim=feature_dim)
    if "end-to-end" in modes:
        if data_root is None:
            raise SystemExit("part c end-to-end needs --data-root (PACS images)")
        # a handful of PACS photos: 4 classes x (e2e_images / 4) images, as a list file
        photo = Path(data_root) / "pacs" / "photo"
        cls = sorted(d.name for d in photo.iterdir() if d.is_dir())[:4]
        per = max(2, e2e_images // len(cls))
        lines = []
        for label, c in enumerate(cls):
            files = sorted(p for p in (photo / c).iterdir() if p.is_file())[:per]
            lines += [f"{p} {label}" for p in files]
        lst = tmp / "e2e_reference.txt"
        lst.write_text("\n".join(lines) + "\n")
        out["end-to-end"] = _train_timed(dict(data=str(lst), frozen_backbone=False,
                                              steps=e2e_steps, batch_pairs=e2e_batch,
                                              optimizer=optimizer, model=model_cfg),
                                         tmp / "e2e", device)
        out["end-to-end"].update(items=len(lines), classes=len(cls))
    return out


def format_c(r: dict, device: torch.device) -> str:
    gpu = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    lines = [
        f"`resend_novelty.training.train`, default `RelationalConfig` (dim 256, depth 4), MSE loss, "
        f"device {device.type}" + (" with bf16 autocast" if device.type == "cuda" else ", fp32")
        + ". Pairs/s = the trainer's own rate over the timed run (after a separate 1-step "
        "warm-up run; includes the final checkpoint write).",
        "",
        "| mode | reference set | optimizer | steps | pairs / step | pairs/s | train loop / wall s | "
        "peak RSS MB | GPU peak MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    desc = {"frozen": "synthetic {feature_dim}-d features, {items} items / {classes} classes "
                      "(.safetensors)",
            "end-to-end": "{items} PACS photos, {classes} classes (list file), EfficientNet-Lite0 "
                          "fine-tuned"}
    for mode, v in r.items():
        lines.append(f"| {mode} | {desc[mode].format(**v)} | {v['optimizer']} | {v['steps']} | "
                     f"{v['batch_pairs']} | **{_num(v['pairs_per_s'])}** | {v['loop_seconds']:.1f} / {v['wall_seconds']:.1f} | "
                     f"{rss_cell(v)} | {gpu(v['peak_gpu_mb'])} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- part d
def _cache_coverage(data_root: Path, backbone: str) -> tuple[int, int]:
    paths = set()
    for name in ("pacs-multi", "pacs-single"):
        for s, q in load_setting_lists(name, data_root).values():
            paths.update(r.path for r in (*s, *q))
    bb = build_backbone(backbone)
    keys = [image_key(p) for p in paths]
    # an ensemble has no cache of its own: an image is warm when every member holds it
    cached = [set(FeatureCache().get_many(m.cache_namespace, keys))
              for m in getattr(bb, "members", (bb,))]
    return len(set.intersection(*cached)), len(paths)


def part_d(device: torch.device, data_root: Path, tmp: Path, cold: bool = False,
           features_file: str | None = None, max_per_class: int | None = None,
           progress: bool = True, chunk_pairs: int | None = None,
           model_path: str | None = None) -> dict:
    try:
        if model_path:
            model = load_checkpoint(model_path)
            model_note = f"checkpoint `{Path(model_path).name}` (`--d-model`)"
        else:
            model = load_checkpoint(default_checkpoint_path())
            model_note = f"shipped checkpoint `{default_checkpoint_path().name}`"
    except CheckpointError as exc:
        if model_path:
            raise
        print(f"  {exc}", flush=True)
        torch.manual_seed(0)
        ck = tmp / "random_relational.safetensors"
        save_checkpoint(RelationalModule(RelationalConfig()), ck)
        model = load_checkpoint(ck)
        model_note = ("no shipped checkpoint: a RANDOM default RelationalModule saved to a temp "
                      "file and loaded (timing only; its AUROC is meaningless)")
    # both methods score the features of the relational model's backbone (a scoring comparison)
    bb_name = model.config.backbone
    features_fn = None
    if features_file:
        features_fn, n_feats = features_file_lookup(features_file)
        got = features_fn.backbone
        if got is not None and got != bb_name:
            raise ValueError(f"{features_file} holds {got} features; the relational "
                             f"model needs {bb_name}: export with `resend features DIR --backbone "
                             f"{bb_name} --export F`")
        bb = None
    else:
        bb = build_backbone(bb_name)
    saved_env = os.environ.get("RESEND_CACHE")
    passes = ["warm"]
    coverage = None
    if cold:
        cache_dir = Path(tempfile.mkdtemp(prefix="resend_speed_cache_", dir=tmp))
        os.environ["RESEND_CACHE"] = str(cache_dir)
        passes = ["cold", "warm"]
    elif not features_file:
        coverage = _cache_coverage(data_root, bb_name)
    runs = []
    try:
        for p in passes:
            for method in ("cosine", "resend"):
                for name in ("pacs-multi", "pacs-single"):
                    def make(method=method):
                        return build_detector(method, model=model if method == "resend" else None,
                                              backbone=bb, device=device, progress=progress,
                                              **({"chunk_pairs": chunk_pairs} if method == "resend" else {}))
                    kw = dict(max_per_class=max_per_class)
                    if features_fn is not None:
                        kw.update(features_fn=features_fn, check_images=False)
                    with PeakMemory(device) as pk:
                        t0 = time.perf_counter()
                        r = run_benchmark(name, data_root, make, progress=progress, **kw)
                        sync_device(device)
                        wall = time.perf_counter() - t0
                    runs.append({"cache": p, "method": method, "setting": name,
                                 "targets": len(get_setting(name).targets), "wall_seconds": wall,
                                 "avg_auroc": r["avg"]["auroc"], **pk.json()})
                    print(f"  {p:4s} {method:6s} {name:11s} {wall:7.1f} s  "
                          f"AUROC {r['avg']['auroc']:.3f}", flush=True)
    finally:
        if cold:
            if saved_env is None:
                os.environ.pop("RESEND_CACHE", None)
            else:
                os.environ["RESEND_CACHE"] = saved_env
            shutil.rmtree(cache_dir, ignore_errors=True)
    return {"runs": runs, "model": model_note, "coverage": coverage,
            "features_file": features_file, "max_per_class": max_per_class, "backbone": bb_name}


def format_d(r: dict, device: torch.device) -> str:
    gpu = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    src = ("exported features file (no images, no cache)" if r["features_file"]
           else f"images, {r.get('backbone', 'efficientnet_lite0')} features through the on-disk "
           "cache (both methods)")
    lines = [f"`resend_novelty.evaluation.run_benchmark` on pacs-multi (4 targets) and "
             f"pacs-single (3 targets), "
             f"device {device.type}; features from {src}. resend model: {r['model']}."]
    if r["coverage"] is not None:
        hit, tot = r["coverage"]
        lines[0] += f" Warm = the existing cache, holding {hit} of the {tot} images beforehand."
    if any(x["cache"] == "cold" for x in r["runs"]):
        lines[0] += (" Cold = a fresh empty `RESEND_CACHE`: the first run extracts every image, "
                     "the later ones find them cached; warm = the same runs again.")
    if r["max_per_class"]:
        lines[0] += f" Only the first {r['max_per_class']} images per class of each list (NOT the full protocol)."
    lines += ["", "| cache | method | setting | targets | wall s | avg AUROC | peak RSS MB | GPU peak MB |",
              "|---|---|---|---|---|---|---|---|"]
    for x in r["runs"]:
        lines.append(f"| {x['cache']} | {x['method']} | {x['setting']} | {x['targets']} | "
                     f"{x['wall_seconds']:.1f} | {x['avg_auroc']:.3f} | {rss_cell(x)} | "
                     f"{gpu(x['peak_gpu_mb'])} |")
    lines += ["", "| cache | method | all 7 targets, wall s |", "|---|---|---|"]
    for p in dict.fromkeys(x["cache"] for x in r["runs"]):
        for method in ("cosine", "resend"):
            tot = sum(x["wall_seconds"] for x in r["runs"] if x["cache"] == p and x["method"] == method)
            lines.append(f"| {p} | {method} | **{tot:.1f}** |")
        tot = sum(x["wall_seconds"] for x in r["runs"] if x["cache"] == p)
        lines.append(f"| {p} | both methods | {tot:.1f} |")
    notes = ["Each run computes the similarities of every test image once and derives both the "
             "normality and the nearest class (closed-set accuracy) from them "
             "(`score_and_nearest_features`). A cold cache adds the backbone on every image: "
             "part (e) gives the wall time of `resend benchmark pacs-multi` from a fresh cache, "
             "part (b) the extraction rate; `--cold` measures this part cold too."]
    if any(x["cache"] == "cold" for x in r["runs"]):
        notes.insert(0, "In the cold pass the extraction of all images is charged to its first "
                     "run (cosine, pacs-multi); the other cold runs already find the features "
                     "cached.")
    return "\n".join(lines + [""] + [" ".join(notes)])


# --------------------------------------------------------------------------- report
def write_report(section: str, new: dict[str, str], path: Path = BENCHMARKS_MD) -> str:
    """Write the parts in ``new`` into ``section``, keeping the other parts already there."""
    head = ("## Speed (issue 8)\n\nEach part below is one run of `benchmarks/speed.py` (its command, "
            "machine and wall time under it); parts may come from different runs. Peak RSS = the "
            "main process's peak resident memory during the measurement (start = its RSS when the "
            "measurement began, i.e. memory it already held); GPU peak = "
            "`torch.cuda.max_memory_allocated`. See docs/speed.md.")
    return write_section_parts(section, new, path, PART_LABEL, PARTS, head)


# --------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                    help="which parts to run (default: all)")
    ap.add_argument("--data-root", default=os.environ.get("RESEND_DATA"),
                    help="data root with pacs/ and pacs_lists/ (parts b, c end-to-end, d; "
                    "default $RESEND_DATA)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads for the whole run (default: torch's choice)")
    g = ap.add_argument_group("part a (scoring)")
    g.add_argument("--n-test", type=int, default=2048, help="test features (PACS ArtPainting: 2048)")
    g.add_argument("--n-protos", type=int, default=6, help="prototypes = known classes (PACS: 6)")
    g.add_argument("--loop-n", type=int, default=200,
                   help="test images run through the one-at-a-time loop (extrapolated to --n-test)")
    g.add_argument("--a-threads", type=int, nargs="+", default=None,
                   help="thread counts to repeat part a with (default: the run's threads, plus 1 "
                   "on CPU when that is more than 1)")
    g.add_argument("--a-model", default="shipped", metavar="shipped|default|CKPT",
                   help="model to time: the shipped checkpoint (what `--method resend` uses; "
                   "default), a randomly initialised default RelationalConfig (dim 256), or a "
                   "relational checkpoint file")
    g.add_argument("--chunk-pairs", type=int, default=None,
                   help="pairs per batched chunk (default: the detector's, 65536 GPU / 4096 CPU)")
    g = ap.add_argument_group("part b (feature extraction)")
    g.add_argument("--n-images", type=int, default=256, help="PACS images to extract (evenly spaced)")
    g.add_argument("--images", default=None, help="extract the images of this folder instead of PACS")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers (default: min(4, CPU cores))")
    g = ap.add_argument_group("part c (pretraining)")
    g.add_argument("--train-steps", type=int, default=3, help="timed steps, frozen mode")
    g.add_argument("--train-batch", type=int, default=4096, help="pairs per step, frozen mode (paper 4096)")
    g.add_argument("--train-items", type=int, default=8192, help="synthetic reference items, frozen mode")
    g.add_argument("--e2e-steps", type=int, default=2, help="timed steps, end-to-end mode")
    g.add_argument("--e2e-batch", type=int, default=8, help="pairs per step, end-to-end mode")
    g.add_argument("--e2e-images", type=int, default=16, help="PACS photos in the end-to-end reference set")
    g.add_argument("--train-classes", type=int, default=64,
                   help="classes of the synthetic reference items, frozen mode")
    g.add_argument("--train-feature-dim", type=int, default=1280,
                   help="dimension of the synthetic features, frozen mode")
    g.add_argument("--train-model", type=json.loads, default=None, metavar="JSON",
                   help='RelationalConfig overrides, e.g. \'{"dim": 128}\' (default: none)')
    g.add_argument("--train-modes", nargs="+", choices=("frozen", "end-to-end"),
                   default=["frozen", "end-to-end"])
    g.add_argument("--optimizer", choices=("lars", "adamw"), default="lars",
                   help="optimiser of part c (paper: lars, needs pytorch-optimizer)")
    g = ap.add_argument_group("part d (PACS wall time)")
    g.add_argument("--cold", action="store_true",
                   help="first run with a fresh empty feature cache (extracts all 9,991 images), "
                   "then warm")
    g.add_argument("--features-file", default=None,
                   help="use features exported by `resend features DIR --export F` instead of "
                   "images and cache (the images need not exist; the lists must)")
    g.add_argument("--d-model", default=None, metavar="CKPT",
                   help="relational checkpoint for the resend rows (default: the shipped one); "
                   "its backbone decides which features are scored")
    g.add_argument("--max-per-class", type=int, default=None,
                   help="first N images per class of each list (quick check, not the protocol)")
    g = ap.add_argument_group("part e (inference engines)")
    g.add_argument("--e-images", type=int, default=500, help="PACS images timed (evenly spaced)")
    g.add_argument("--e-no-job", action="store_true",
                   help="skip the cold run of `resend benchmark pacs-multi` (the README's main job)")
    g.add_argument("--e-torch-cache", default=None, metavar="DIR",
                   help="also run the main job with --engine torch on this cache (e.g. a warm one "
                   "filled by the torch engine) to compare AUROC/FPR95")
    g = ap.add_argument_group("part f (scale: candidate classes)")
    g.add_argument("--f-grid", nargs="+", default=[f"{k}x{n}" for k, n in DEFAULT_GRID],
                   metavar="CLASSESxPER_CLASS", help="support sets of the cost curve (default: "
                   + " ".join(f"{k}x{n}" for k, n in DEFAULT_GRID) + ")")
    g.add_argument("--f-test", type=int, default=200, help="test features scored per point")
    g.add_argument("--f-repeats", type=int, default=2, help="timed repeats per point (fastest kept)")
    g.add_argument("--f-exact-max", type=int, default=100,
                   help="also time exact scoring (candidates=0) up to this many classes")
    g.add_argument("--f-no-accuracy", action="store_true",
                   help="skip the PACS accuracy check of the shortcut (no data needed)")
    ap.add_argument("--section", default="speed", help="BENCHMARKS.md section (default: speed)")
    ap.add_argument("--no-write", action="store_true", help="print, do not touch BENCHMARKS.md")
    ap.add_argument("--json", default=None, help="also write the raw results to this JSON file")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--merge-from", default=None, metavar="OTHER_BENCHMARKS.md",
                    help="only copy the parts of --section from another BENCHMARKS.md (e.g. the one "
                    "a GPU machine wrote) into this one, and exit")
    args = ap.parse_args(argv)
    if args.merge_from:
        parts = section_parts(args.section, Path(args.merge_from), PART_LABEL)
        if not parts:
            ap.error(f"{args.merge_from} has no speed parts in section {args.section!r}")
        print(write_report(args.section, parts))
        return 0

    if args.cold and args.features_file:
        ap.error("--cold extracts features from images; it cannot be combined with --features-file")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    data_root = Path(args.data_root) if args.data_root else None
    needs_data = ("d" in args.parts or "e" in args.parts or
                  ("f" in args.parts and not args.f_no_accuracy) or ("b" in args.parts and not args.images)
                  or ("c" in args.parts and "end-to-end" in args.train_modes))
    if needs_data and data_root is None:
        ap.error("parts b (without --images), c (end-to-end) and d need --data-root "
                 "(or $RESEND_DATA)")
    mach = machine()
    words = list(argv if argv is not None else sys.argv[1:])
    for i, w in enumerate(words[:-1]):  # a machine path in the command line: named DIR
        if w == "--e-torch-cache":
            words[i + 1] = "DIR"
    command = "python benchmarks/speed.py " + " ".join(words)
    results, blocks = {}, {}
    tmp = Path(tempfile.mkdtemp(prefix="resend_speed_"))
    try:
        for part in args.parts:
            print(f"== part {part}: {PART_TITLES[part]}", flush=True)
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            t0 = time.perf_counter()
            if part == "a":
                tc = args.a_threads
                if tc is None:
                    tc = [None]
                    if device.type == "cpu" and torch.get_num_threads() > 1:
                        tc.append(1)
                a_model = None
                if args.a_model != "default":
                    a_model = load_checkpoint(None if args.a_model == "shipped" else args.a_model)
                res = part_a(device, args.n_test, args.n_protos, args.loop_n, tuple(tc),
                             args.chunk_pairs, model=a_model)
                if args.a_model == "shipped":
                    res["model_note"] = (f"the shipped checkpoint `{SHIPPED_NAME}` (what "
                                         "`--method resend` uses)")
                elif a_model is not None:
                    res["model_note"] = f"checkpoint `{Path(args.a_model).name}`"
                md = format_a(res, device)
                results["a"] = {k: (v.tolist() if k.endswith("_scores") else v)
                                for k, v in res.items()}
            elif part == "b":
                paths = list_images(args.images) if args.images else pacs_subset(data_root, args.n_images)
                res = part_b(device, paths, args.batch_size, args.workers)
                md = format_b(res, device)
                results["b"] = res
            elif part == "c":
                res = part_c(device, data_root, tmp, args.train_steps, args.train_batch,
                             args.train_items, classes=args.train_classes, e2e_steps=args.e2e_steps,
                             e2e_batch=args.e2e_batch, e2e_images=args.e2e_images,
                             optimizer=args.optimizer, modes=tuple(args.train_modes),
                             feature_dim=args.train_feature_dim, model_cfg=args.train_model)
                md = format_c(res, device)
                results["c"] = res
            elif part == "f":
                try:
                    grid = [tuple(int(v) for v in g.lower().split("x")) for g in args.f_grid]
                except ValueError:
                    ap.error(f"--f-grid takes CLASSESxPER_CLASS items, got {args.f_grid}")
                res = part_f(device, data_root, grid, args.f_test, args.f_repeats,
                             args.f_exact_max, accuracy_check=not args.f_no_accuracy,
                             progress=not args.quiet)
                md = format_f(res, device)
                results["f"] = res
            elif part == "e":
                res = part_e(pacs_subset(data_root, args.e_images), tmp, data_root,
                             args.batch_size, job=not args.e_no_job,
                             torch_cache=args.e_torch_cache)
                md = format_e(res, device)
                results["e"] = res
            else:
                res = part_d(device, data_root, tmp, cold=args.cold,
                             features_file=args.features_file, max_per_class=args.max_per_class,
                             progress=not args.quiet, chunk_pairs=args.chunk_pairs,
                             model_path=args.d_model)
                md = format_d(res, device)
                results["d"] = res
            wall = time.perf_counter() - t0
            md = (f"### {PART_TITLES[part]}\n\n{md}\n\n"
                  f"Command: `{command}`  \nMachine: {mach}; torch threads {torch.get_num_threads()}; "
                  f"load average (1 min) {load:.1f} before the part; part wall time {wall:.1f} s.")
            print(md + "\n", flush=True)
            blocks[part] = md
            results[part]["part_wall_seconds"] = wall
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    if not args.no_write:
        write_report(args.section, blocks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
