"""Relational pretraining (paper Sec. 3.2, Algorithm 1; Appendix A for the recipe).

Pairs of reference images are labelled 1 (same class) or 0 (different classes) and the relational
model regresses sigma_ij onto the label (MSE, the paper's choice) or classifies it (BCE).

Two modes:

- **frozen backbone** (default here, fast on CPU): backbone features are extracted once and
  cached; only the relational module trains. Optional *stylised views* of the reference images
  (sketch, cartoon, painting, grayscale; :mod:`resend_novelty.data.augment`) join the reference set as
  extra items of their class, so that same-class pairs span domains.
- **end to end** (``frozen_backbone=False``): images in, the backbone is fine-tuned too (GPU, bf16).

Distributed: ``torchrun --nproc_per_node N -m resend_novelty.training.loop ...``. Every rank builds the
same global batch of pairs and takes its shard; gradients are averaged by DDP, so N processes
follow the same trajectory as one process with the same global batch (``batch_pairs``).

Checkpoints (every ``checkpoint_every`` steps, on SIGINT/SIGTERM, and at the end) are written
atomically to ``OUT/checkpoints/step_XXXXXXX/`` (model.safetensors + state.pt with optimiser,
scheduler, step and RNG state), with ``OUT/latest.json`` pointing at the newest complete one.
``resume=True`` continues exactly: same seed and config give the same weights as an
uninterrupted run. The best model by validation AUROC (held-out reference classes, never used
for training) is kept in ``OUT/best.safetensors``; the final model in ``OUT/final.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models.checkpoint import save_checkpoint
from ..data.images import DataError, ImageRecord, load_image, read_list_file, scan_class_folders
from ..transforms.domain_norm import as_mode, normalize_by_domain
from ..evaluation.metrics import auroc
from ..models.relational import RelationalConfig, RelationalModule, build_relational
from .pairs import PairSampler, Pairs

__all__ = ["TrainConfig", "train", "main", "ReferenceSet", "load_reference_features"]

STYLE_ORDER = ("sketch", "cartoon", "painting", "grayscale")


@dataclass
class TrainConfig:
    data: str = ""  # class-folder root, list file, or .safetensors features file
    out: str = "runs/pretrain"
    root: str | None = None  # root of list-file paths
    backbone: str = "efficientnet_lite0"
    frozen_backbone: bool = True
    steps: int = 13000
    batch_pairs: int = 4096  # global batch (pairs per optimiser step)
    micro_batch: int = 0  # pairs per forward/backward (0 = whole local batch): gradient accumulation
    lr: float = 0.008
    warmup: int = 500
    optimizer: str = "lars"  # lars | adamw
    momentum: float = 0.9
    weight_decay: float = 5e-5
    loss: str = "mse"  # mse | bce
    neg_per_pos: int = 1
    balance: bool = True
    seed: int = 0
    checkpoint_every: int = 500
    val_every: int = 500
    val_classes: int = 20  # reference classes held out for validation (never trained on)
    # "halves": known held-out classes split in support/test halves (+ stylised views);
    # "proxy": the synthetic multi/single-source domain-shift episodes of resend_novelty.evaluation.proxy
    val_protocol: str = "halves"
    val_episodes: int = 20  # episodes per proxy setting ("proxy" protocol)
    style_views: int = 0  # images per class that get one stylised view (frozen mode)
    max_per_class: int = 0  # use at most this many images per class (0 = all)
    partner_set: int = 1  # frozen mode: partner = mean feature of this many same-class items
    cross_domain: float = 0.0  # share of positives across domains / negatives within a domain
    amp: bool = True  # bf16 autocast on CUDA
    device: str | None = None
    workers: int = 4
    model: dict = field(default_factory=dict)  # RelationalConfig overrides

    def __post_init__(self):
        if self.loss not in ("mse", "bce"):
            raise ValueError(f"loss must be 'mse' or 'bce', got {self.loss!r}")
        if self.optimizer not in ("lars", "adamw"):
            raise ValueError(f"optimizer must be 'lars' or 'adamw', got {self.optimizer!r}")
        if self.val_protocol not in ("halves", "proxy"):
            raise ValueError(f"val_protocol must be 'halves' or 'proxy', got {self.val_protocol!r}")
        if self.val_protocol == "proxy" and not self.frozen_backbone:
            raise ValueError("val_protocol='proxy' needs frozen_backbone (cached features)")
        if "+" in self.backbone and not self.frozen_backbone:
            raise ValueError(f"end-to-end training needs a single backbone, not the ensemble "
                             f"{self.backbone!r} (its members preprocess images differently)")
        if self.steps < 1 or self.batch_pairs < 1:
            raise ValueError("steps and batch_pairs must be positive")

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- reference data
def _natural_key(path: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.path.basename(path))]


@dataclass
class ReferenceSet:
    features: torch.Tensor | None  # (N, D) in frozen mode
    labels: np.ndarray  # (N,)
    paths: list[str]  # image of each item ("" for precomputed features)
    is_view: np.ndarray  # item is a stylised view
    class_names: list[str]
    domain: np.ndarray | None = None  # 0 = original image, 1 + v = stylised view v


def _records(cfg: TrainConfig) -> tuple[list[ImageRecord], list[str]]:
    if os.path.isdir(cfg.data):
        records, classes = scan_class_folders(cfg.data)
    else:
        records = read_list_file(cfg.data, cfg.root)
        classes = [str(c) for c in sorted({r.label for r in records})]
    by_class: dict[int, list[ImageRecord]] = {}
    for r in records:
        by_class.setdefault(r.label, []).append(r)
    out = []
    for label in sorted(by_class):
        recs = sorted(by_class[label], key=lambda r: _natural_key(r.path))
        out.extend(recs[: cfg.max_per_class] if cfg.max_per_class else recs)
    return out, classes


def load_reference_features(cfg: TrainConfig, progress: bool = True) -> ReferenceSet:
    """Reference items for frozen-backbone training: cached features (+ stylised views)."""
    if cfg.data.endswith(".safetensors"):
        from safetensors.torch import load_file

        t = load_file(cfg.data)
        if "features" not in t or "labels" not in t:
            raise DataError(f"{cfg.data} must hold 'features' and 'labels' tensors")
        labels = t["labels"].numpy().astype(np.int64)
        n = len(labels)
        from ..features.extract import check_features

        feats = t["features"].float()
        if feats.ndim != 2 or feats.shape[0] != n:
            raise DataError(f"{cfg.data}: features {tuple(feats.shape)} do not match {n} labels")
        feats = check_features(feats, f"features of {cfg.data}")  # no NaN/inf
        return ReferenceSet(feats, labels, [""] * n, np.zeros(n, bool),
                            [str(c) for c in np.unique(labels)])
    from ..data.augment import DomainShiftView
    from ..backbones.base import build_backbone
    from ..features.extract import extract_features

    records, classes = _records(cfg)
    bb = build_backbone(cfg.backbone)
    paths = [r.path for r in records]
    feats = [extract_features(bb, paths, desc="reference features", progress=progress,
                              num_workers=cfg.workers)]
    labels = [np.array([r.label for r in records])]
    all_paths = list(paths)
    is_view = [np.zeros(len(records), bool)]
    domain = [np.zeros(len(records), np.int64)]
    if cfg.style_views:
        by_class: dict[int, list[ImageRecord]] = {}
        for r in records:
            by_class.setdefault(r.label, []).append(r)
        for v, _ in enumerate(STYLE_ORDER):
            sel = [rec for label in sorted(by_class)
                   for i, rec in enumerate(by_class[label][: cfg.style_views])
                   if i % len(STYLE_ORDER) == v]
            if not sel:
                continue
            aug = DomainShiftView(v, bb.transform, STYLE_ORDER)
            feats.append(extract_features(
                bb, [r.path for r in sel], desc=f"{aug.style} views", progress=progress,
                transform=aug, namespace_suffix=aug.namespace_suffix, num_workers=cfg.workers))
            labels.append(np.array([r.label for r in sel]))
            all_paths += [r.path for r in sel]
            is_view.append(np.ones(len(sel), bool))
            domain.append(np.full(len(sel), 1 + v, np.int64))
    return ReferenceSet(torch.cat(feats), np.concatenate(labels), all_paths,
                        np.concatenate(is_view), classes, np.concatenate(domain))


def center_by_domain(feats: torch.Tensor, domain: np.ndarray, fit_mask: np.ndarray,
                     mode: str = "center") -> torch.Tensor:
    """Normalise every item with the statistics of its domain (computed over ``fit_mask`` items):
    ``mode`` "center" subtracts the domain mean, "standardize" also divides by its std
    (:func:`resend_novelty.transforms.domain_norm.normalize_by_domain`)."""
    return normalize_by_domain(feats, domain, mode, fit_mask)


def split_validation(labels: np.ndarray, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``n_val`` whole classes (seeded choice); returns (train mask, val class ids)."""
    classes = np.unique(labels)
    if n_val <= 0:
        return np.ones(len(labels), bool), np.array([], dtype=labels.dtype)
    if n_val > len(classes) - 2:
        raise ValueError(f"val_classes={n_val} leaves fewer than 2 training classes")
    rng = np.random.default_rng([seed, 7919])
    val = np.sort(rng.choice(classes, size=n_val, replace=False))
    return ~np.isin(labels, val), val


@torch.no_grad()
def validation_auroc(model: RelationalModule, feats: torch.Tensor, labels: np.ndarray,
                     is_view: np.ndarray, val_classes: np.ndarray, seed: int,
                     center: bool | str = False) -> float:
    """Fine-tuning-free novelty AUROC on held-out classes.

    Half of the held-out classes are known: prototypes from the first half of their original
    images. Test = the remaining items of known classes + every item of the unknown classes
    (stylised views included). With stylised views, the returned value is the mean of that AUROC
    and the AUROC on stylised test views only (photo prototypes vs other "domains").
    """
    if len(val_classes) < 2:
        return math.nan
    rng = np.random.default_rng([seed, 104729])
    known = rng.permutation(val_classes)[: max(1, len(val_classes) // 2)]
    support_idx, test_idx = [], []
    for c in val_classes:
        items = np.flatnonzero(labels == c)
        if c in known:
            orig = items[~is_view[items]]
            half = orig[: max(1, len(orig) // 2)]
            support_idx.extend(half.tolist())
            test_idx.extend(sorted(set(items.tolist()) - set(half.tolist())))
        else:
            test_idx.extend(items.tolist())
    support_idx, test_idx = np.array(support_idx), np.array(test_idx)
    s_lab = labels[support_idx]
    fs = feats[support_idx]
    mode = as_mode(center)
    # as the detectors do: support on its statistics, each test set on its own
    fs = normalize_by_domain(fs, np.zeros(len(fs)), mode)
    protos = torch.stack([fs[s_lab == c].mean(0) for c in known])
    was_training = model.training
    model.eval()

    def normality(idx):
        ft = normalize_by_domain(feats[idx], np.zeros(len(idx)), mode)
        u = model.pairwise_logits(ft, protos)
        return torch.softmax(u.float(), dim=1).max(1).values.cpu().numpy()

    views = is_view[test_idx]
    orig_idx = test_idx[~views]
    score = auroc(normality(orig_idx), np.isin(labels[orig_idx], known))
    view_idx = test_idx[views]
    is_known_v = np.isin(labels[view_idx], known)
    if len(view_idx) and is_known_v.any() and (~is_known_v).any():
        # cross-domain: photo prototypes vs stylised test views only (like PACS single-source)
        score = 0.5 * (score + auroc(normality(view_idx), is_known_v))
    model.train(was_training)
    return score


def proxy_validation_auroc(model, proxy, episodes: int, seed: int, device=None) -> float:
    """Mean of the multi- and single-source AUROC of the proxy benchmark
    (:mod:`resend_novelty.evaluation.proxy`), the model scored as ReSeNDDetector scores it."""
    from ..detectors.base import ReSeNDDetector
    from ..evaluation.proxy import evaluate_proxy

    was_training = model.training
    try:
        res = evaluate_proxy(
            lambda: ReSeNDDetector(model=model, backbone=None, device=device, progress=False),
            proxy, n_episodes=episodes, seed=seed)
    finally:
        model.train(was_training)
    return 0.5 * (res["multi"]["avg"]["auroc"] + res["single"]["avg"]["auroc"])


# --------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _save_training_checkpoint(out: Path, model, backbone, optimizer, scheduler, step: int,
                              cfg: TrainConfig, best: float, keep: int = 2) -> Path:
    ckdir = out / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    final = ckdir / f"step_{step:07d}"
    tmp = ckdir / f".step_{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_checkpoint(model, tmp / "model.safetensors", metadata={"step": step})
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
        "best_val_auroc": best,
        "config": json.dumps(cfg.to_dict()),
    }
    if backbone is not None:
        state["backbone"] = backbone.state_dict()
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # the directory appears complete or not at all
    latest_tmp = out / ".latest.json.tmp"
    latest_tmp.write_text(json.dumps({"step": step, "path": final.name}))
    os.replace(latest_tmp, out / "latest.json")
    olds = sorted(p for p in ckdir.glob("step_*") if p != final)
    for p in olds[: max(0, len(olds) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _load_training_checkpoint(out: Path):
    latest = out / "latest.json"
    if not latest.is_file():
        return None
    info = json.loads(latest.read_text())
    path = out / "checkpoints" / info["path"]
    from ..models.checkpoint import load_checkpoint

    model = load_checkpoint(path / "model.safetensors")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    return model, state


# --------------------------------------------------------------------------- training
def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _build_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "token" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "lars":
        from pytorch_optimizer import LARS

        opt = LARS(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                   foreach=False)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(0, cfg.warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0
    )
    return opt, sched


def _pair_loss(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "mse":
        return (torch.sigmoid(logits) - y) ** 2
    return F.binary_cross_entropy_with_logits(logits, y, reduction="none")


class _EndToEnd(torch.nn.Module):
    """Backbone + relational module, trained together (images in)."""

    def __init__(self, backbone, relational):
        super().__init__()
        self.backbone, self.relational = backbone, relational

    def forward(self, images_i, images_j):
        return self.relational(self.backbone(images_i), self.backbone(images_j))


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True,
          stop_after: int | None = None) -> dict:
    """Run pretraining; returns a summary dict. ``stop_after`` stops (with a checkpoint) early."""
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed and not _is_dist():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if _is_dist() else 0
    world = dist.get_world_size() if _is_dist() else 1
    if cfg.device:
        device = torch.device(cfg.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.batch_pairs % world:
        raise ValueError(f"batch_pairs ({cfg.batch_pairs}) must be divisible by the {world} processes")
    out = Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    # ---- data
    if cfg.frozen_backbone:
        ref = load_reference_features(cfg, progress=progress and rank == 0)
        feature_dim = ref.features.shape[1]
    else:
        records, classes = _records(cfg)
        ref = ReferenceSet(None, np.array([r.label for r in records]), [r.path for r in records],
                           np.zeros(len(records), bool), classes)
    train_mask, val_classes = split_validation(ref.labels, cfg.val_classes, cfg.seed)
    train_idx = np.flatnonzero(train_mask)
    proxy = None
    if cfg.val_protocol == "proxy" and len(val_classes) and cfg.val_every:
        from ..evaluation.proxy import load_proxy_set

        proxy = load_proxy_set(cfg.data, cfg.val_classes, cfg.seed, backbone=cfg.backbone,
                               progress=progress and rank == 0)
    if cfg.cross_domain and ref.domain is None:
        raise ValueError("cross_domain pairs need stylised views (style_views > 0, frozen mode)")
    sampler = PairSampler(
        ref.labels[train_idx], cfg.neg_per_pos, cfg.seed, cfg.balance,
        domains=None if ref.domain is None else ref.domain[train_idx],
        cross_domain=cfg.cross_domain)

    # ---- model
    backbone = None
    mcfg = dict(cfg.model)
    if cfg.frozen_backbone:
        mcfg.setdefault("feature_dim", feature_dim)
    else:
        from ..backbones.base import build_backbone

        backbone = build_backbone(cfg.backbone)
        mcfg.setdefault("feature_dim", backbone.feature_dim)
    mcfg.setdefault("backbone", cfg.backbone)
    model = build_relational(RelationalConfig(**mcfg))  # arch: transformer or an ablation
    step, best = 0, -math.inf
    state = None
    if resume:
        loaded = _load_training_checkpoint(out)
        if loaded is None:
            if rank == 0:
                print(f"no checkpoint in {out}: starting from scratch", file=sys.stderr)
        else:
            model, state = loaded
            saved = json.loads(state["config"])
            diff = {k: (saved.get(k), v) for k, v in cfg.to_dict().items()
                    if k not in ("steps", "out", "device", "workers", "checkpoint_every",
                                 "val_every") and saved.get(k) != v}
            if diff:
                raise ValueError(f"--resume with a different configuration: {diff}")
            step, best = int(state["step"]), float(state["best_val_auroc"])
    trainable = model if backbone is None else _EndToEnd(backbone, model)
    if backbone is not None and state is not None and "backbone" in state:
        backbone.load_state_dict(state["backbone"])
    trainable.to(device).train()
    opt, sched = _build_optimizer(trainable, cfg)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
    ddp = trainable
    if _is_dist():
        ddp = torch.nn.parallel.DistributedDataParallel(
            trainable, device_ids=[device.index] if device.type == "cuda" else None)

    feats = ref.features.to(device) if ref.features is not None else None
    val_feats = None
    if feats is not None and len(val_classes):
        val_feats = feats
    center = model.config.domain_norm
    if center != "none" and feats is not None:
        domain = ref.domain if ref.domain is not None else np.zeros(len(ref.labels), np.int64)
        feats = center_by_domain(feats, domain, train_mask, center)

    # ---- interruption: finish the step, checkpoint, stop
    stop = {"flag": False}

    def _handler(signum, frame):
        stop["flag"] = True

    old_handlers = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old_handlers[sig] = signal.signal(sig, _handler)
        except ValueError:  # not in the main thread
            pass
    if rank == 0:  # from here on, Ctrl-C / SIGTERM stop with a checkpoint
        (out / "run.json").write_text(json.dumps(
            {"config": cfg.to_dict(), "start_step": step, "world_size": world,
             "device": str(device), "train_items": int(len(train_idx))}, indent=2))

    steps_per_epoch = max(1, sampler.pairs_per_epoch() // cfg.batch_pairs)
    local = cfg.batch_pairs // world
    micro = cfg.micro_batch or local
    use_amp = cfg.amp and device.type == "cuda"
    cur_epoch, pairs = -1, None
    history = []
    bar = tqdm(total=cfg.steps, initial=step, desc="pretrain", unit="step",
               disable=not (progress and rank == 0))
    t_start, pairs_done, last_val = time.perf_counter(), 0, None
    transform = None
    if backbone is not None:
        from torchvision import transforms as T

        p = backbone.preprocessing
        transform = T.Compose([T.RandomResizedCrop(p.crop, scale=(0.5, 1.0)), T.RandomHorizontalFlip(),
                               T.ToTensor(), T.Normalize(p.mean, p.std)])
    try:
        while step < cfg.steps:
            epoch, pos = divmod(step, steps_per_epoch)
            if epoch != cur_epoch:
                pairs, cur_epoch = sampler.epoch(epoch), epoch
            batch = pairs.slice(pos * cfg.batch_pairs, (pos + 1) * cfg.batch_pairs)
            wsum = float(batch.w.sum())
            sets = None
            if cfg.partner_set > 1 and feats is not None:
                sets = _partner_sets(sampler, batch, cfg.partner_set, cfg.seed, step)[rank::world]
            mine = Pairs(batch.i[rank::world], batch.j[rank::world], batch.y[rank::world],
                         batch.w[rank::world])
            opt.zero_grad(set_to_none=True)
            loss_total = 0.0
            chunks = range(0, len(mine), micro)
            for ci, start in enumerate(chunks):
                part = mine.slice(start, start + micro)
                gi = torch.as_tensor(train_idx[part.i], device=device)
                gj = torch.as_tensor(train_idx[part.j], device=device)
                y = torch.as_tensor(part.y, device=device)
                w = torch.as_tensor(part.w, device=device)
                last = ci == len(chunks) - 1
                ctx = ddp.no_sync() if (_is_dist() and not last) else _nullcontext()
                with ctx, torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    if feats is not None and sets is not None:
                        ps = torch.as_tensor(train_idx[sets[start : start + micro]], device=device)
                        logits = ddp(feats[gi], feats[ps].mean(dim=1))
                    elif feats is not None:
                        logits = ddp(feats[gi], feats[gj])
                    else:
                        xi = _load_batch(ref.paths, gi.tolist(), transform).to(device)
                        xj = _load_batch(ref.paths, gj.tolist(), transform).to(device)
                        logits = ddp(xi, xj)
                    # sum of weighted losses over the global batch / total weight; DDP averages
                    # over ranks, hence the factor `world`
                    loss = (w * _pair_loss(logits.float(), y, cfg.loss)).sum() * world / wsum
                    loss.backward()
                loss_total += float(loss.detach()) / world
            if _is_dist():
                t = torch.tensor([loss_total], device=device)
                dist.all_reduce(t)
                loss_total = float(t)
            opt.step()
            sched.step()
            step += 1
            pairs_done += cfg.batch_pairs
            rate = pairs_done / max(1e-9, time.perf_counter() - t_start)
            rec = {"step": step, "loss": loss_total, "lr": sched.get_last_lr()[0]}
            if cfg.val_every and step % cfg.val_every == 0 and len(val_classes):
                vf = val_feats
                if vf is None:  # end to end: features of the held-out images, current backbone
                    vf = _backbone_features(backbone, ref.paths, np.isin(ref.labels, val_classes),
                                            device)
                if proxy is not None:
                    last_val = proxy_validation_auroc(model, proxy, cfg.val_episodes, cfg.seed,
                                                      device)
                else:
                    last_val = validation_auroc(model, vf, ref.labels, ref.is_view,
                                                val_classes, cfg.seed, center=center)
                rec["val_auroc"] = last_val
                if rank == 0 and last_val > best:
                    best = last_val
                    save_checkpoint(model, out / "best.safetensors",
                                    metadata={"step": step, "val_auroc": last_val})
                    if backbone is not None:
                        from safetensors.torch import save_file

                        tmp = out / ".best_backbone.safetensors.tmp"
                        save_file({k: v.detach().cpu().contiguous()
                                   for k, v in backbone.state_dict().items()}, str(tmp))
                        os.replace(tmp, out / "best_backbone.safetensors")
            history.append(rec)
            bar.set_postfix(loss=f"{loss_total:.4f}", pairs_s=f"{rate:.0f}",
                            val_auroc="-" if last_val is None else f"{last_val:.3f}")
            bar.update(1)
            interrupted = stop["flag"] or (stop_after is not None and step >= stop_after)
            if rank == 0 and (step % cfg.checkpoint_every == 0 or step == cfg.steps or interrupted):
                _save_training_checkpoint(out, model, backbone, opt, sched, step, cfg, best)
                with open(out / "history.jsonl", "a") as fh:
                    for r in history:
                        fh.write(json.dumps(r) + "\n")
                history = []
            if interrupted:
                if rank == 0 and stop["flag"]:
                    print(f"\ninterrupted: checkpoint at step {step} in {out}; rerun with --resume",
                          file=sys.stderr)
                break
    finally:
        bar.close()
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
    elapsed = time.perf_counter() - t_start
    summary = {"step": step, "best_val_auroc": None if best == -math.inf else best,
               "pairs_per_s": pairs_done / max(elapsed, 1e-9), "seconds": elapsed,
               "train_items": int(len(train_idx)), "val_classes": [int(c) for c in val_classes]}
    if rank == 0 and step >= cfg.steps:
        save_checkpoint(model, out / "final.safetensors", metadata={"step": step})
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _partner_sets(sampler: PairSampler, batch: Pairs, m: int, seed: int, step: int) -> np.ndarray:
    """For each pair, ``m`` items of the partner's class (the partner first, never the anchor).

    Their mean feature plays the role of a class prototype, as at evaluation time. Drawn from
    ``(seed, step)`` so that resumed and distributed runs see the same sets.
    """
    rng = np.random.default_rng([seed, step, 17])
    cls = sampler.cls[batch.j]
    sets = np.empty((len(batch), m), dtype=np.int64)
    sets[:, 0] = batch.j
    u = rng.random((len(batch), m - 1))
    for c in np.unique(cls):
        rows = cls == c
        items = sampler.members[c]
        sets[rows, 1:] = items[(u[rows] * len(items)).astype(np.int64)]
    anchor_hit = sets == batch.i[:, None]
    sets[anchor_hit] = np.broadcast_to(batch.j[:, None], sets.shape)[anchor_hit]
    return sets


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


@torch.no_grad()
def _backbone_features(backbone, paths, mask, device, batch: int = 64) -> torch.Tensor:
    """Features of the items in ``mask`` (other rows zero) with the backbone in eval mode."""
    was = backbone.training
    backbone.eval()
    t = backbone.preprocessing.transform()
    rows = np.flatnonzero(mask)
    out = torch.zeros(len(paths), backbone.feature_dim, device=device)
    for start in range(0, len(rows), batch):
        idx = rows[start : start + batch].tolist()
        out[idx] = backbone(_load_batch(paths, idx, t).to(device)).float()
    backbone.train(was)
    return out


def _load_batch(paths, idx, transform) -> torch.Tensor:
    return torch.stack([transform(load_image(paths[i])) for i in idx])


# --------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--data", required=True,
                   help="reference set: class-folder root (DIR/<class>/<image>), list file "
                   "('<path> <label>', with --root), or a .safetensors file with 'features' and "
                   "'labels' (from `resend features --export`)")
    p.add_argument("--out", required=True, help="output directory (checkpoints, best/final model)")
    p.add_argument("--root", default=None, help="root of the list file's paths")
    p.add_argument("--backbone", default=d.backbone,
                   help=f"backbone (default {d.backbone}; efficientnet_lite1, efficientnet_lite2, "
                   "resnet18, or names joined by '+' for concatenated features: the shipped "
                   "checkpoint was trained on efficientnet_lite0+efficientnet_lite1 and reads "
                   "the fine-tuned efficientnet_lite0_ft+efficientnet_lite1_ft)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--frozen-backbone", dest="frozen_backbone", action="store_true",
                      default=True, help="train only the relational module on cached features "
                      "(default; fast on CPU)")
    mode.add_argument("--end-to-end", dest="frozen_backbone", action="store_false",
                      help="fine-tune the backbone too (images in; meant for a GPU)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimiser steps (paper {d.steps})")
    p.add_argument("--batch-pairs", type=int, default=d.batch_pairs,
                   help=f"pairs per optimiser step, all processes together (paper {d.batch_pairs})")
    p.add_argument("--micro-batch", type=int, default=0,
                   help="pairs per forward/backward pass; smaller values accumulate gradients so "
                   "a large batch fits any device (default: whole batch)")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (paper {d.lr})")
    p.add_argument("--warmup", type=int, default=d.warmup,
                   help=f"linear warm-up steps, then constant lr (paper {d.warmup})")
    p.add_argument("--optimizer", choices=("lars", "adamw"), default=d.optimizer,
                   help="LARS (paper; momentum 0.9) or AdamW")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="(paper 5e-5)")
    p.add_argument("--momentum", type=float, default=d.momentum, help="LARS momentum (paper 0.9)")
    p.add_argument("--loss", choices=("mse", "bce"), default=d.loss,
                   help="mse: regression of sigma on the pair label (paper); bce: classification")
    p.add_argument("--neg-per-pos", type=int, default=d.neg_per_pos,
                   help="different-class partners per anchor (paper 1; official code 20)")
    p.add_argument("--no-balance", dest="balance", action="store_false",
                   help="draw negatives proportionally to class size and weight all pairs equally")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of pair sampling, initialisation and validation split")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="write a resumable checkpoint every K steps (also on SIGINT/SIGTERM)")
    p.add_argument("--cross-domain", type=float, default=d.cross_domain,
                   help="fraction of positive pairs drawn across domains (photo vs stylised view "
                   "of the same class) and of negative pairs within one domain (needs "
                   "--style-views; not in the paper)")
    p.add_argument("--val-protocol", choices=("halves", "proxy"), default=d.val_protocol,
                   help="validation on the held-out classes: 'halves' (support/test halves of the "
                   "known held-out classes, plus stylised views) or 'proxy' (mean multi- and "
                   "single-source AUROC of the synthetic domain-shift episodes of "
                   "resend_novelty.evaluation.proxy; frozen mode)")
    p.add_argument("--val-episodes", type=int, default=d.val_episodes,
                   help="episodes per proxy setting (--val-protocol proxy)")
    p.add_argument("--val-every", type=int, default=d.val_every,
                   help="validation AUROC on held-out reference classes every K steps (0 = never)")
    p.add_argument("--val-classes", type=int, default=d.val_classes,
                   help="reference classes held out from training for validation")
    p.add_argument("--style-views", type=int, default=0,
                   help="frozen mode: the first N images of each class get one stylised view "
                   "(sketch/cartoon/painting/grayscale in turn) added to the reference set")
    p.add_argument("--max-per-class", type=int, default=0, help="cap images per class (0 = all)")
    p.add_argument("--partner-set", type=int, default=1,
                   help="frozen mode: the partner of each pair is the mean feature of this many "
                   "items of its class, like the class prototypes used at evaluation (paper: 1)")
    p.add_argument("--dim", type=int, default=None, help="token width (default 256)")
    p.add_argument("--depth", type=int, default=None, help="transformer blocks B (default 4)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default 4)")
    p.add_argument("--dropout", type=float, default=None, help="dropout inside the blocks")
    p.add_argument("--input-dropout", type=float, default=None,
                   help="dropout on the input features while training")
    p.add_argument("--input-norm", choices=("l2", "none"), default=None,
                   help="feature normalisation before the projection (default l2)")
    p.add_argument("--cosine-skip", dest="cosine_skip", action="store_true", default=None,
                   help="add a learnable cosine skip gamma*(cos(f_i,f_j)-delta) to the logit; the "
                   "head starts at zero, so training starts from the cosine detector (not in the paper)")
    p.add_argument("--center-features", dest="center_features", action="store_true",
                   default=None, help="train on features centred per domain (original images, "
                   "each stylised view); detectors then centre support and test features on their "
                   "own means (transductive; not in the paper)")
    p.add_argument("--standardize-features", dest="standardize_features", action="store_true",
                   default=None, help="like --center-features, and also divide by the per-domain "
                   "std of each feature dimension (resend_novelty.transforms.domain_norm; not in the paper)")
    p.add_argument("--normality", choices=("softmax", "max-logit"), default=None,
                   help="the detector's default normality, stored in the checkpoint: 'softmax' "
                   "(paper: max softmax of the similarities to the prototypes) or 'max-logit'")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no bf16 autocast on GPU")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="image-decoding worker processes")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/latest.json exactly where the run stopped")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args) -> TrainConfig:
    model = {k: getattr(args, a) for k, a in (("dim", "dim"), ("depth", "depth"), ("heads", "heads"),
                                              ("dropout", "dropout"),
                                              ("input_dropout", "input_dropout"),
                                              ("input_norm", "input_norm"),
                                              ("cosine_skip", "cosine_skip"),
                                              ("center_features", "center_features"),
                                              ("standardize_features", "standardize_features"),
                                              ("normality", "normality"))
             if getattr(args, a) is not None}
    names = {f.name for f in fields(TrainConfig)} - {"model"}
    kw = {n: getattr(args, n) for n in names if hasattr(args, n)}
    return TrainConfig(model=model, **kw)


def run_from_args(args) -> int:
    cfg = config_from_args(args)
    summary = train(cfg, resume=args.resume, progress=not args.quiet)
    if not _is_dist() or dist.get_rank() == 0:
        best = summary["best_val_auroc"]
        print(f"step {summary['step']}  pairs/s {summary['pairs_per_s']:.0f}  "
              f"best val AUROC {'n/a' if best is None else f'{best:.4f}'}  -> {cfg.out}")
    if _is_dist():
        dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m resend_novelty.training.loop",
                                description="Relational pretraining of ReSeND (see `resend pretrain --help`).")
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
