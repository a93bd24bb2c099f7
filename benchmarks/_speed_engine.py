"""Part (e) of ``benchmarks/speed.py``: the inference engines on a plain CPU (issue 20).

In one run, on the same fixed PACS images (evenly spaced over the sorted file list):

* decode alone: JPEG decode + resize + centre crop (:meth:`Preprocessing.load` / ``pixels``),
  in this thread and with the extractor's decoding threads;
* inference alone: the backbone on already-decoded batches, ``--engine torch`` (channels_last)
  and ``--engine onnx`` (ONNX Runtime), images/s and the fraction of the FLOP limit: FLOP per
  image counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 x multiply-adds) over the
  peak FLOP/s measured with an fp32 matrix product on all threads (``gemm_gflops``);
* cold extraction, end to end: ``extract_features`` from the JPEG files into a fresh, empty
  cache with each engine (onnx: the graph export and its check included), images/s and ratio;
* optionally (``--e-job``) the cold wall time of the README's main job, ``resend benchmark
  pacs-multi --data-root DIR`` with the shipped model and a fresh cache (``--engine auto``, i.e.
  onnx on CPU), and its AUROC/FPR95 next to the torch engine's (``--engine torch``, on the
  cache given by ``--e-torch-cache``, e.g. a warm cache filled by the torch engine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from resend_novelty.backbones import build_backbone
from resend_novelty.features import FeatureCache, extract_features, onnx_backbone
from resend_novelty.features.engine import clear_sessions
from resend_novelty.report import gemm_gflops

BACKBONES = ("efficientnet_lite0_ft", "efficientnet_lite1_ft")  # the shipped model's


def _flops_per_image(bb) -> float:
    crop = bb.preprocessing.crop
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        bb.eval()(torch.zeros(1, 3, crop, crop))
    return float(fc.get_total_flops())


def _decode(bb, paths: list[str], workers: int) -> dict:
    pre = bb.preprocessing
    work = lambda p: pre.pixels(pre.load(p))  # noqa: E731
    t0 = time.perf_counter()
    for p in paths:
        work(p)
    serial = time.perf_counter() - t0
    with ThreadPoolExecutor(workers) as pool:
        t0 = time.perf_counter()
        list(pool.map(work, paths))
        threaded = time.perf_counter() - t0
    return {"serial_images_per_s": len(paths) / serial,
            "threaded_images_per_s": len(paths) / threaded, "threads": workers}


def _inference(bb, paths: list[str], batch_size: int, tmp: Path) -> dict:
    pre = bb.preprocessing
    batches = [pre.to_batch([pre.pixels(pre.load(p)) for p in paths[s : s + batch_size]])
               for s in range(0, len(paths), batch_size)]
    sess = onnx_backbone(bb, tmp / "onnx_probe")
    net = bb.to(memory_format=torch.channels_last).eval()

    def torch_run(x):
        with torch.inference_mode():
            return net(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)).numpy()

    out = {}
    for name, run in (("torch", torch_run), ("onnx", sess.run)):
        run(batches[0][:4])  # warm-up
        t0 = time.perf_counter()
        feats = [run(x) for x in batches]
        out[name] = len(paths) / (time.perf_counter() - t0)
        out[f"{name}_features"] = np.concatenate(feats)
    out["max_abs_diff"] = float(np.abs(out.pop("onnx_features") - out.pop("torch_features")).max())
    return out


def _cold(bb_name: str, paths: list[str], batch_size: int, tmp: Path) -> dict:
    out = {}
    for engine in ("torch", "onnx"):
        bb = build_backbone(bb_name)  # fresh module and a fresh, empty cache per engine
        cache_dir = Path(tempfile.mkdtemp(prefix=f"cold_{engine}_", dir=tmp))
        t0 = time.perf_counter()
        export = 0.0
        if engine == "onnx":  # what the first extraction does anyway, timed on its own
            clear_sessions()
            onnx_backbone(bb, cache_dir)
            export = time.perf_counter() - t0
        extract_features(bb, paths, cache=FeatureCache(cache_dir), batch_size=batch_size,
                         device="cpu", engine=engine, progress=False)
        total = time.perf_counter() - t0
        out[engine] = {"seconds": total, "export_seconds": export,
                       "images_per_s": len(paths) / total,
                       "images_per_s_after_export": len(paths) / (total - export)}
        shutil.rmtree(cache_dir, ignore_errors=True)
    out["ratio"] = out["onnx"]["images_per_s"] / out["torch"]["images_per_s"]
    out["ratio_after_export"] = (out["onnx"]["images_per_s_after_export"]
                                 / out["torch"]["images_per_s"])
    return out


def _job(data_root: Path, engine: str, cache_dir: Path, out_json: Path) -> dict:
    cmd = [sys.executable, "-m", "resend_novelty.cli", "benchmark", "pacs-multi",
           "--data-root", str(data_root), "--engine", engine, "--quiet", "--json", str(out_json)]
    env = {**os.environ, "RESEND_CACHE": str(cache_dir)}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    r = json.loads(out_json.read_text())
    return {"wall_seconds": wall, "auroc": r["avg"]["auroc"], "fpr95": r["avg"]["fpr95"],
            "engine": engine, "cache": str(cache_dir)}


def part_e(paths: list[str], tmp: Path, data_root: Path | None = None, batch_size: int = 64,
           job: bool = False, torch_cache: str | None = None) -> dict:
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    peak = gemm_gflops(1024, torch.device("cpu"))
    res = {"n_images": len(paths), "batch_size": batch_size, "threads": threads,
           "peak_gflops": peak, "backbones": {}}
    for name in BACKBONES:
        bb = build_backbone(name)
        r = {"gflop_per_image": _flops_per_image(bb) / 1e9,
             "decode": _decode(bb, paths, min(4, os.cpu_count() or 1)),
             "inference": _inference(bb, paths, batch_size, tmp),
             "cold": _cold(name, paths, batch_size, tmp)}
        r["flop_limit_images_per_s"] = peak / r["gflop_per_image"]
        res["backbones"][name] = r
        print(f"  {name}: {json.dumps(r, default=float)}", flush=True)
    if job:
        fresh = Path(tempfile.mkdtemp(prefix="job_cache_", dir=tmp))
        res["job_onnx"] = _job(data_root, "auto", fresh, tmp / "job_onnx.json")
        print(f"  job (auto=onnx, cold): {res['job_onnx']}", flush=True)
        shutil.rmtree(fresh, ignore_errors=True)
        if torch_cache:
            res["job_torch"] = _job(data_root, "torch", Path(torch_cache), tmp / "job_torch.json")
            print(f"  job (torch, cache {torch_cache}): {res['job_torch']}", flush=True)
    return res


def format_e(r: dict, device: torch.device) -> str:
    lines = [f"{r['n_images']} PACS JPEG images (227x227, evenly spaced over the sorted file "
             f"list), batch {r['batch_size']}, {r['threads']} threads, device {device.type}. "
             f"Peak = {r['peak_gflops']:.0f} GFLOP/s, measured with an fp32 matrix product "
             "(12288x1024 @ 1024x4096, best of 5, `report.gemm_gflops`); FLOP per image counted "
             "by `torch.utils.flop_counter` (2 x multiply-adds).", "",
             "| backbone | GFLOP/img | decode+resize img/s (1 thread / pool) | inference torch "
             "img/s | inference onnx img/s | onnx % of FLOP limit | max abs diff | cold torch "
             "img/s | cold onnx img/s (export s) | cold ratio | ratio without the export |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, b in r["backbones"].items():
        d, i, c = b["decode"], b["inference"], b["cold"]
        lines.append(
            f"| {name} | {b['gflop_per_image']:.2f} | {d['serial_images_per_s']:.0f} / "
            f"{d['threaded_images_per_s']:.0f} ({d['threads']} threads) | {i['torch']:.1f} | "
            f"{i['onnx']:.1f} | {100 * i['onnx'] / b['flop_limit_images_per_s']:.0f} % of "
            f"{b['flop_limit_images_per_s']:.0f} | {i['max_abs_diff']:.1g} | "
            f"{c['torch']['images_per_s']:.1f} | {c['onnx']['images_per_s']:.1f} "
            f"({c['onnx']['export_seconds']:.1f}) | **{c['ratio']:.1f}x** | "
            f"{c['ratio_after_export']:.1f}x |")
    lines += ["", "Cold = `extract_features` from the files into a fresh empty cache, decoding "
              "included (onnx: the graph export and its parity check included, once per backbone "
              "and cache folder; timed on its own in brackets)."]
    if "job_onnx" in r:
        j = r["job_onnx"]
        lines += ["", "| README main job `resend benchmark pacs-multi` | cache | engine | wall s | "
                  "avg AUROC | avg FPR95 |", "|---|---|---|---|---|---|",
                  f"| shipped model | fresh, empty | auto (onnx) | **{j['wall_seconds']:.0f}** | "
                  f"{j['auroc']:.4f} | {j['fpr95']:.4f} |"]
        if "job_torch" in r:
            t = r["job_torch"]
            lines.append(f"| shipped model | `{t['cache']}` | torch | {t['wall_seconds']:.0f} | "
                         f"{t['auroc']:.4f} | {t['fpr95']:.4f} |")
            lines += ["", f"Engine parity: |dAUROC| = {abs(j['auroc'] - t['auroc']):.4f}, "
                      f"|dFPR95| = {abs(j['fpr95'] - t['fpr95']):.4f} (target <= 0.002)."]
    return "\n".join(lines)
