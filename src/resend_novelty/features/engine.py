"""Inference engines for backbones: ONNX Runtime on the CPU, PyTorch elsewhere.

``engine="auto"`` (the default everywhere) runs ONNX Runtime when the device is the CPU and
PyTorch on CUDA; ``"onnx"`` and ``"torch"`` force one. On a plain CPU ONNX Runtime runs the
EfficientNet-Lite backbones several times faster than PyTorch eager (depthwise convolutions).

The ONNX graph is exported from the loaded backbone itself (its weights, the shipped fine-tuned
ones included) on first use, into ``<cache dir>/onnx/<key>.onnx``; ``key`` is a digest of the
backbone's ``cache_namespace`` and of its parameters and buffers, so a backbone whose weights
change in memory never meets a stale graph. The file is written atomically (temporary file, then
rename) with a ``<key>.onnx.json`` beside it that records its SHA-256, checked at every load.
A graph whose SHA-256 does not match (a corrupted or altered file) is refused with a warning
naming the file and exported again. Without a cache directory the graph lives in memory only.

How the cache key treats the engine: it does not contain it. At export the graph is run on a
fixed probe batch and compared with the torch backbone; the two engines share ONE feature-cache
entry (the same cache namespace) only because this check passed within ``PARITY_ATOL`` (1e-4,
maximum absolute difference of the features). If it fails, or the backbone cannot be exported,
the onnx engine is refused for that backbone with a one-line warning naming it, and PyTorch is
used instead - so features in the cache never depend on the engine beyond 1e-4.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from ..backbones import Backbone
from ..integrity import sha256_file

__all__ = ["ENGINES", "PARITY_ATOL", "OnnxBackbone", "resolve_engine", "onnx_backbone",
           "clear_sessions"]

ENGINES = ("auto", "onnx", "torch")
PARITY_ATOL = 1e-4
OPSET = 17

_lock = threading.Lock()
_sessions: dict[tuple, "OnnxBackbone | None"] = {}  # in-process memo (None: refused)
_exports: dict[str, "tuple[bytes, dict] | None"] = {}  # graphs exported in this process


def resolve_engine(engine: str, device: torch.device) -> str:
    """``"onnx"`` or ``"torch"`` for ``engine`` on ``device`` (auto: onnx on CPU, torch else)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {list(ENGINES)}")
    if engine == "auto":
        return "onnx" if device.type == "cpu" else "torch"
    if engine == "onnx" and device.type != "cpu":
        raise ValueError(f"engine 'onnx' runs on the CPU only, not on device {device}; "
                         "use engine 'torch' (or 'auto') there")
    return engine


def _weights_digest(backbone: Backbone) -> str:
    h = hashlib.sha256(backbone.cache_namespace.encode())
    for name, t in list(backbone.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def _probe(backbone: Backbone) -> np.ndarray:
    crop = backbone.preprocessing.crop
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, crop, crop, generator=g).numpy()


class OnnxBackbone:
    """An ONNX Runtime session of a backbone graph: ``run(images (N,3,H,W) float32) -> (N, D)``."""

    def __init__(self, model: bytes | str, threads: int | None = None, source: str = "memory"):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(model, sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.source = source

    def run(self, images: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(images, dtype=np.float32)
        return self.session.run(None, {self.input_name: x})[0]


def _export_bytes(backbone: Backbone) -> bytes:
    crop = backbone.preprocessing.crop
    buf = io.BytesIO()
    was_training = backbone.training
    backbone.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(backbone.cpu(), (torch.zeros(1, 3, crop, crop),), buf,
                              input_names=["images"], output_names=["features"],
                              dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
                              opset_version=OPSET, dynamo=False)
    finally:
        backbone.train(was_training)
    return buf.getvalue()


def _parity(backbone: Backbone, sess: OnnxBackbone) -> float:
    x = _probe(backbone)
    with torch.inference_mode():
        ref = backbone.cpu().eval()(torch.from_numpy(x)).float().numpy()
    got = sess.run(x)
    if got.shape != ref.shape:
        return float("inf")
    return float(np.abs(got - ref).max())


def _load_verified(path: Path, threads: int | None) -> OnnxBackbone | None:
    """The session of a stored graph, or None (with a warning) if its SHA-256 does not match."""
    info = path.with_name(path.name + ".json")
    try:
        want = json.loads(info.read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        want = None
    got = sha256_file(path)
    if got != want:
        warnings.warn(f"ONNX graph {path} is corrupt or altered (sha256 {got[:12]}... does not "
                      f"match the one recorded in {info.name}); exporting it again", stacklevel=3)
        return None
    return OnnxBackbone(str(path), threads, source=str(path))


def _write_atomic(path: Path, data: bytes, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, payload in ((path, data), (path.with_name(path.name + ".json"),
                                           json.dumps(meta, indent=1).encode())):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=target.suffix)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(payload)
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def onnx_backbone(backbone: Backbone, cache_dir: str | os.PathLike | None = None,
                  threads: int | None = None) -> OnnxBackbone | None:
    """ONNX Runtime session of ``backbone`` (exported, checked, stored under ``cache_dir/onnx``),
    or None - with a one-line warning naming the backbone - where export is impossible or the
    graph differs from the torch backbone by more than ``PARITY_ATOL`` on the probe batch.

    A graph exported (and checked) once in this process is reused for other cache folders
    without exporting again."""
    key = _weights_digest(backbone)
    memo = (key, None if cache_dir is None else str(cache_dir), threads)
    with _lock:
        if memo in _sessions:
            return _sessions[memo]
        path = Path(cache_dir) / "onnx" / f"{key}.onnx" if cache_dir is not None else None
        sess = None
        if path is not None and path.is_file():
            sess = _load_verified(path, threads)
        if sess is None:
            fresh = None
            if key not in _exports:
                _exports[key], fresh = _export_checked(backbone, threads)
            exported = _exports[key]
            if exported is not None:
                data, meta = exported
                if path is not None:
                    _write_atomic(path, data, meta)
                sess = fresh or OnnxBackbone(data, threads)
                sess.source = str(path) if path else "memory"
        _sessions[memo] = sess
        return sess


def _export_checked(backbone: Backbone, threads: int | None):
    """``((graph bytes, record), session)``, or ``(None, None)`` with a warning where export
    fails or the graph differs from torch by more than ``PARITY_ATOL`` on the probe batch."""
    try:
        data = _export_bytes(backbone)
        sess = OnnxBackbone(data, threads)
        diff = _parity(backbone, sess)
    except Exception as exc:  # noqa: BLE001 - any export failure means: use torch
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(f"backbone {backbone.name}: ONNX export failed ({msg}); using the torch "
                      "engine", stacklevel=4)
        return None, None
    if not diff <= PARITY_ATOL:
        warnings.warn(f"backbone {backbone.name}: ONNX graph differs from torch by {diff:.2g} "
                      f"(> {PARITY_ATOL}) on the probe batch; using the torch engine", stacklevel=4)
        return None, None
    meta = {"sha256": hashlib.sha256(data).hexdigest(), "backbone": backbone.name,
            "namespace": backbone.cache_namespace, "opset": OPSET,
            "probe_max_abs_diff": diff, "torch": torch.__version__}
    return (data, meta), sess


def clear_sessions() -> None:
    """Forget the sessions and graphs built in this process (the next use loads or exports
    again)."""
    with _lock:
        _sessions.clear()
        _exports.clear()
