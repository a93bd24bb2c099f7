"""Relational pretraining (paper Sec. 3.2, Algorithm 1; Appendix A for the recipe).

Pairs of reference images are labelled 1 (same class) or 0 (different classes) and the relational
model regresses sigma_ij onto the label (MSE, the paper's choice) or classifies it (BCE;
:mod:`.objective`).

Two modes:

- **frozen backbone** (default here, fast on CPU): backbone features are extracted once and
  cached; only the relational module trains. Optional *stylised views* of the reference images
  (sketch, cartoon, painting, grayscale; :mod:`resend_novelty.data.augment`) join the reference set as
  extra items of their class, so that same-class pairs span domains (:mod:`.reference`).
- **end to end** (``frozen_backbone=False``): images in, the backbone is fine-tuned too (GPU, bf16).

Distributed: ``torchrun --nproc_per_node N -m resend_novelty.cli pretrain ...``. Every rank builds
the same global batch of pairs and takes its shard; gradients are averaged by DDP, so N processes
follow the same trajectory as one process with the same global batch (``batch_pairs``;
:mod:`.distributed`).

Checkpoints (every ``checkpoint_every`` steps, on SIGINT/SIGTERM, and at the end) are written
atomically to ``OUT/checkpoints/step_XXXXXXX/`` (:mod:`.checkpointing`), with ``OUT/latest.json``
pointing at the newest complete one. ``resume=True`` continues exactly: same seed and config give
the same weights as an uninterrupted run. The best model by validation AUROC (held-out reference
classes, never used for training; :mod:`.validation`) is kept in ``OUT/best.safetensors``; the
final model in ``OUT/final.safetensors``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..backbones import build_backbone
from ..data import reference_records, split_validation
from ..evaluation import load_proxy_set
from ..models import build_relational, save_checkpoint, split_config
from .batches import EndToEnd, backbone_features, load_batch, partner_sets, train_transform
from .checkpointing import load_training_checkpoint, save_training_checkpoint, set_rng_state
from .config import TrainConfig, default_val_classes
from .distributed import all_reduce_sum, init_distributed, is_distributed, training_device
from .objective import build_optimizer, pair_loss
from .pairs import Pairs, PairSampler
from .reference import ReferenceSet, center_by_domain, load_reference_features
from .validation import proxy_validation_auroc, validation_auroc

__all__ = ["train", "prepare_out", "RUN_FILES"]

#: What a run writes into its output folder (deleted by ``overwrite=True``, nothing else is).
RUN_FILES = ("checkpoints", "latest.json", "history.jsonl", "run.json", "summary.json",
             "best.safetensors", "best_backbone.safetensors", "final.safetensors")


def _foreign_checkpoints(folder: Path) -> list[str]:
    """Entries of a run's ``checkpoints`` folder that a run does not write (``step_NNNNNNN``
    folders and their ``.tmp`` twins): ``--overwrite`` never deletes those."""
    if not folder.is_dir() or folder.is_symlink():  # a link is removed, not what it points to
        return []
    return sorted(p.name for p in folder.iterdir()
                  if not (p.is_dir() and re.fullmatch(r"\.?step_\d{7}(\.tmp)?", p.name)))


def prepare_out(out: Path, resume: bool = False, overwrite: bool = False) -> None:
    """Check the output folder before any work: never mix or overwrite runs silently.

    A file is refused; a folder holding a run (``latest.json``, a checkpoint, a final model)
    needs ``resume`` (continue it) or ``overwrite`` (delete its run files, listed in
    :data:`RUN_FILES`, and start over); any other non-empty folder needs ``overwrite``.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if resume and out.is_dir() and any(out.iterdir()) and not (out / "latest.json").is_file():
        raise ValueError(f"--resume: {out} holds no run to continue (no latest.json); its files "
                         "are kept: choose another --out, or --overwrite to start a run there")
    if out.is_dir() and not resume:
        entries = sorted(p.name for p in out.iterdir())
        if entries and not overwrite:
            ours = [e for e in entries if e in RUN_FILES]
            what = (f"holds a run ({', '.join(ours)})" if ours else
                    f"is not empty ({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''})")
            raise ValueError(f"--out {out} {what}: pass --resume to continue it, --overwrite to "
                             "replace it, or choose another folder")
        foreign = _foreign_checkpoints(out / "checkpoints")
        if foreign:
            raise ValueError(f"--overwrite: {out / 'checkpoints'} holds files a run does not write "
                             f"({', '.join(foreign[:3])}); nothing was deleted: move them away "
                             "or choose another --out")
        for name in RUN_FILES if entries else ():
            p = out / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-check.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"--out {out} cannot be written: {exc.strerror or exc}") from None


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True,
          stop_after: int | None = None, overwrite: bool = False) -> dict:
    """Run pretraining; returns a summary dict. ``stop_after`` stops (with a checkpoint) early.

    ``cfg.out`` must be a new or empty folder, or hold a run to continue (``resume=True``);
    ``overwrite=True`` deletes the run files there first (see :func:`prepare_out`). The summary's
    ``"interrupted"`` is the number of the signal (SIGINT/SIGTERM) that stopped the run, or None.
    """
    rank, world = init_distributed()
    if cfg.batch_pairs % world:
        raise ValueError(f"batch_pairs ({cfg.batch_pairs}) must be divisible by the {world} processes")
    out = Path(cfg.out)
    if rank == 0:
        prepare_out(out, resume=resume, overwrite=overwrite)
    device = training_device(cfg.device)
    torch.manual_seed(cfg.seed)

    # ---- data
    if cfg.frozen_backbone:
        ref = load_reference_features(
            cfg.data, cfg.backbone, root=cfg.root, max_per_class=cfg.max_per_class,
            style_views=cfg.style_views, workers=cfg.workers, progress=progress and rank == 0)
        feature_dim = ref.features.shape[1]
    else:
        records, classes = reference_records(cfg.data, cfg.root, cfg.max_per_class)
        ref = ReferenceSet(None, np.array([r.label for r in records]), [r.path for r in records],
                           np.zeros(len(records), bool), classes)
    if cfg.val_classes is None:  # scaled to the data; the resolved number is the run's config
        cfg = replace(cfg, val_classes=default_val_classes(len(np.unique(ref.labels))))
    train_mask, val_classes = split_validation(ref.labels, cfg.val_classes, cfg.seed)
    train_idx = np.flatnonzero(train_mask)
    proxy = None
    if cfg.val_protocol == "proxy" and len(val_classes) and cfg.val_every:
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
        backbone = build_backbone(cfg.backbone)
        mcfg.setdefault("feature_dim", backbone.feature_dim)
    mcfg.setdefault("backbone", cfg.backbone)
    # arch: the transformer or an ablation; scoring keys of the recipe ("normality", ...) go to
    # the model's scoring defaults
    arch, scoring = split_config(mcfg)
    model = build_relational(arch, scoring=scoring)
    step, best = 0, -math.inf
    state = None
    if resume:
        loaded = load_training_checkpoint(out)
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
    trainable = model if backbone is None else EndToEnd(backbone, model)
    if backbone is not None and state is not None and "backbone" in state:
        backbone.load_state_dict(state["backbone"])
    trainable.to(device).train()
    opt, sched = build_optimizer(trainable, cfg)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
    ddp = trainable
    if is_distributed():
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
        stop["signal"] = signum

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
    transform = None if backbone is None else train_transform(backbone.preprocessing)
    try:
        while step < cfg.steps:
            epoch, pos = divmod(step, steps_per_epoch)
            if epoch != cur_epoch:
                pairs, cur_epoch = sampler.epoch(epoch), epoch
            batch = pairs.slice(pos * cfg.batch_pairs, (pos + 1) * cfg.batch_pairs)
            wsum = float(batch.w.sum())
            sets = None
            if cfg.partner_set > 1 and feats is not None:
                sets = partner_sets(sampler, batch, cfg.partner_set, cfg.seed, step)[rank::world]
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
                ctx = ddp.no_sync() if (is_distributed() and not last) else nullcontext()
                with ctx, torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    if feats is not None and sets is not None:
                        ps = torch.as_tensor(train_idx[sets[start : start + micro]], device=device)
                        logits = ddp(feats[gi], feats[ps].mean(dim=1))
                    elif feats is not None:
                        logits = ddp(feats[gi], feats[gj])
                    else:
                        xi = load_batch(ref.paths, gi.tolist(), transform).to(device)
                        xj = load_batch(ref.paths, gj.tolist(), transform).to(device)
                        logits = ddp(xi, xj)
                    # sum of weighted losses over the global batch / total weight; DDP averages
                    # over ranks, hence the factor `world`
                    loss = (w * pair_loss(logits.float(), y, cfg.loss)).sum() * world / wsum
                    loss.backward()
                loss_total += float(loss.detach()) / world
            loss_total = all_reduce_sum(loss_total, device)
            opt.step()
            sched.step()
            step += 1
            pairs_done += cfg.batch_pairs
            rate = pairs_done / max(1e-9, time.perf_counter() - t_start)
            rec = {"step": step, "loss": loss_total, "lr": sched.get_last_lr()[0]}
            if cfg.val_every and step % cfg.val_every == 0 and len(val_classes):
                vf = val_feats
                if vf is None:  # end to end: features of the held-out images, current backbone
                    vf = backbone_features(backbone, ref.paths, np.isin(ref.labels, val_classes),
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
                save_training_checkpoint(out, model, backbone, opt, sched, step,
                                         cfg.to_dict(), best)
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
               "train_items": int(len(train_idx)), "val_classes": [int(c) for c in val_classes],
               "interrupted": stop.get("signal")}
    if rank == 0 and step >= cfg.steps:
        save_checkpoint(model, out / "final.safetensors", metadata={"step": step})
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
