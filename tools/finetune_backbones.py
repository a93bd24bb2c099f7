"""End-to-end fine-tuning of the EfficientNet-Lite backbones on the reference set (issue 4).

    python tools/finetune_backbones.py --data-root ../shared/data --out runs/finetune

Each backbone (default: Lite0 and Lite1, the members of the shipped ensemble) is fine-tuned on
the Tiny-ImageNet classes that pretraining trains on (the 30 classes held out by
``split_validation(seed)`` are never seen) and selected on the synthetic domain-shift proxy of
those held-out classes (:mod:`resend_novelty.evaluation.proxy`); PACS plays no part.

Recipe (fixed before any number; the rule is quoted in BENCHMARKS.md, *End-to-end fine-tuned backbones*):

* every training image is rendered at random as a photo or one of the domain-shift styles of
  :mod:`resend_novelty.data.augment` (sketch, cartoon, painting, grayscale, colour, low resolution),
  then randomly cropped (scale 0.5-1) and flipped, seeded per (seed, epoch, image);
* loss = cross-entropy of a cosine classifier (scale 16; weights initialised at the class means of
  the centred frozen features) + ``lambda`` x the relative squared distance between the fine-tuned
  and the frozen ImageNet features of the same rendering (config ``distill``: lambda 1;
  ``plain``: lambda 0);
* AdamW (lr 1e-4 backbone, 1e-3 classifier, no weight decay), cosine schedule with 5 % warm-up,
  batch 256, 5 epochs, BatchNorm statistics frozen, bf16 autocast on CUDA.

After every epoch (and before the first: epoch 0 = the frozen backbone) the proxy mean AUROC of
standardised cosine (50 episodes) is measured; the best epoch of each (backbone, config) is kept.
Then the ensemble of the best members is scored on the proxy with the shipped relational model
and its default scoring, against the frozen ensemble (seed 0 / 50 episodes and seed 1 / 200).

Writes ``OUT/log.json`` (every number, as soon as it exists) and ``OUT/<config>-<backbone>.safetensors``
(fp16 backbone weights of the best epoch, classifier removed). Made for a GPU: on the 2-core CPU of
this project one epoch of Lite0 takes hours (``--smoke`` runs a tiny version for tests).
``--imagenet-dir`` reads the ImageNet starting weights from ``<name>.safetensors`` files written by
``--export-imagenet DIR`` (for a machine without the weight packages); ``--key-root`` sets the
root under which image paths seed the renderings (default: the real path of ``--data-root``), so
that a copy of the data elsewhere renders exactly the views of the original.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from resend_novelty.backbones import EfficientNetLite, build_backbone
from resend_novelty.data import (STYLE_ORDER, DomainShiftView, load_image, reference_records,
                                 split_validation, stylise)
from resend_novelty.detectors import ReSeNDDetector, build_detector
from resend_novelty.evaluation import ProxySet, evaluate_proxy, proxy_records
from resend_novelty.integrity import sha256_file
from resend_novelty.models import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent

TRAIN_STYLES = ("photo", "sketch", "cartoon", "painting", "grayscale", "colour", "lowres")
CONFIGS = {"distill": 1.0, "plain": 0.0}  # name -> lambda of the distillation term
VARIANTS = {"efficientnet_lite0": 0, "efficientnet_lite1": 1}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- backbones
def _fp16(state: dict) -> dict:
    return {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
            for k, v in state.items()}


def export_imagenet(out: Path, names) -> None:
    """ImageNet weights of each backbone (its state dict, classifier removed) as fp16
    safetensors, loadable with ``EfficientNetLite(weights=...)``."""
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        save_file(_fp16(build_backbone(name).state_dict()), str(out / f"{name}.safetensors"))
        log(f"wrote {out / f'{name}.safetensors'}")


def load_backbone(name: str, imagenet_dir: str | None):
    if imagenet_dir is None:
        bb = build_backbone(name)
    else:
        path = Path(imagenet_dir) / f"{name}.safetensors"
        if not path.is_file():
            raise SystemExit(f"{path}: no such file (write it with --export-imagenet "
                             f"{imagenet_dir})")
        bb = EfficientNetLite(variant=VARIANTS[name], weights=path)
    assert bb.preprocessing.mean == (0.5,) * 3 and bb.preprocessing.std == (0.5,) * 3  # to_input
    return bb


def freeze_bn(module: torch.nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


# ----------------------------------------------------------------------------- data
class _Rendered(torch.utils.data.Dataset):
    """Evaluation tensors: ``style`` None = the photo, else the proxy's DomainShiftView."""

    def __init__(self, items, transform):
        self.items, self.transform = items, transform  # items: (path, key, view or None)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, key, view = self.items[i]
        img = load_image(path)
        if view is None:
            return self.transform(img)
        return DomainShiftView(view, self.transform, STYLE_ORDER)(img, key)


class _TrainViews(torch.utils.data.Dataset):
    """Random domain-shift rendering + random resized crop + flip, seeded per (seed, epoch, i)."""

    def __init__(self, paths, labels, crop: int, seed: int):
        self.paths, self.labels, self.crop, self.seed, self.epoch = paths, labels, crop, seed, 0

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        rng = random.Random(zlib.crc32(f"{self.seed}|{self.epoch}|{i}".encode()))
        img = load_image(self.paths[i])
        style = rng.choice(TRAIN_STYLES)
        if style != "photo":
            img = stylise(img, style, rng.randrange(1 << 30))
        w, h = img.size
        for _ in range(10):  # RandomResizedCrop(scale 0.5-1, ratio 3/4-4/3), seeded
            area = w * h * rng.uniform(0.5, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                break
        else:
            cw, ch = w, h
        top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
        img = TF.resized_crop(img, top, left, ch, cw, [self.crop, self.crop])
        if rng.random() < 0.5:
            img = TF.hflip(img)
        return TF.pil_to_tensor(img), int(self.labels[i])


def uint8_transform(prep):
    """The backbone's evaluation preprocessing without its normalisation (done by :func:`to_input`
    on the device): workers ship uint8, 4x less shared memory than float."""
    return T.Compose([T.Resize(prep.resize), T.CenterCrop(prep.crop), T.PILToTensor()])


def to_input(x: torch.Tensor, device) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> the normalised float input (mean 0.5, std 0.5: x / 127.5 - 1)."""
    x = x.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last)


def _stack(ds, workers: int, batch: int = 250) -> torch.Tensor:
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers)
    return torch.cat([b for b in dl])


@torch.no_grad()
def features(bb, x, device, batch: int = 500) -> torch.Tensor:
    """Features of uint8 images: a (N, 3, H, W) tensor or a loader of such batches."""
    bb.eval()
    out = []
    batches = (x[i:i + batch] for i in range(0, len(x), batch)) if torch.is_tensor(x) else x
    for xb in batches:
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            out.append(bb(to_input(xb, device)).float().cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------- proxy
def proxy_items(train_dir: str, key_root: str, data_root: str, seed: int, val_classes: int,
                per_class: int):
    """(items, labels, domains, val classes) of the proxy (renderings "one"), in
    :func:`resend_novelty.evaluation.load_proxy_set`'s order; an item is (path, key that seeds
    the rendering, view index or None for the photo)."""
    groups, _, val = proxy_records(train_dir, val_classes, seed, per_class)
    items, labs, doms = [], [], []
    for d, recs in groups.items():
        for r in recs:
            key = os.path.join(key_root, os.path.relpath(os.path.realpath(r.path),
                                                         os.path.realpath(data_root)))
            items.append((r.path, key, None if d == 0 else d - 1))
            labs.append(r.label)
            doms.append(d)
    return items, np.array(labs), np.array(doms), val


def proxy_scores(feats: torch.Tensor, labels, domains, val, make, episodes: int, seed: int):
    r = evaluate_proxy(make, ProxySet(feats, labels, domains, val), n_episodes=episodes, seed=seed)
    m, s = r["multi"]["avg"]["auroc"], r["single"]["avg"]["auroc"]
    return {"multi": m, "single": s, "mean": (m + s) / 2}


def cosine_std():
    return build_detector("cosine-standardized", backbone=None, progress=False)


# ----------------------------------------------------------------------------- training
def finetune(bb, lam: float, clean_loader, paths, labels, args, device,
             proxy_x, proxy_eval, record) -> tuple[dict, torch.Tensor, int, torch.Tensor]:
    """Fine-tune ``bb`` in place; returns (best state dict, best proxy features, best epoch,
    proxy features of the frozen starting point)."""
    teacher = copy.deepcopy(bb).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    bb.to(device)
    classes, y = np.unique(labels, return_inverse=True)
    f0 = features(teacher, clean_loader, device)
    mu = f0.mean(0)
    cent = F.normalize(f0 - mu, dim=1)
    w0 = torch.stack([cent[y == c].mean(0) for c in range(len(classes))])
    head = torch.nn.Parameter(F.normalize(w0, dim=1).to(device))
    mu = mu.to(device)
    ds = _TrainViews(paths, y, bb.preprocessing.crop, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, drop_last=True,
                                     num_workers=args.workers, generator=g,
                                     persistent_workers=args.workers > 0)
    opt = torch.optim.AdamW([{"params": [p for p in bb.parameters() if p.requires_grad],
                              "lr": args.lr}, {"params": [head], "lr": args.head_lr}],
                            weight_decay=0.0)
    total = args.epochs * len(dl)
    warm = max(1, int(0.05 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm)
                                                                             / max(1, total - warm))))
    pf = features(bb, proxy_x, device)
    best = (proxy_eval(pf), 0)
    record(0, best[0], 0.0, None)
    best_state = {k: v.detach().cpu().clone() for k, v in bb.state_dict().items()}
    best_feats = frozen_feats = pf
    bb = bb.to(memory_format=torch.channels_last)
    for epoch in range(1, args.epochs + 1):
        if time.monotonic() > args.deadline:
            log(f"time budget reached before epoch {epoch}: stopping")
            break
        ds.epoch = epoch
        bb.train()
        freeze_bn(bb)
        t0, tot, n = time.perf_counter(), 0.0, 0
        for xb, yb in dl:
            xb = to_input(xb, device)
            yb = yb.to(device, non_blocking=True)
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                f = bb(xb).float()
                loss = F.cross_entropy(args.scale * F.normalize(f - mu, dim=1)
                                       @ F.normalize(head, dim=1).T, yb)
                if lam:
                    with torch.no_grad():
                        t = teacher(xb).float()
                    loss = loss + lam * ((f - t).pow(2).sum(1) / t.pow(2).sum(1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot, n = tot + float(loss.detach()), n + 1
            if args.smoke and n >= 2:
                break
        pf = features(bb, proxy_x, device)
        score = proxy_eval(pf)
        record(epoch, score, time.perf_counter() - t0, tot / max(n, 1))
        if score["mean"] > best[0]["mean"]:
            best = (score, epoch)
            best_state = {k: v.detach().cpu().clone() for k, v in bb.state_dict().items()}
            best_feats = pf
    return best_state, best_feats, best[1], frozen_feats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", help="holds tiny_imagenet_200/train")
    p.add_argument("--out", default="runs/finetune", help="log.json and the fine-tuned weights")
    p.add_argument("--backbones", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                   help="run in this order; a config starts only if the time budget allows")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--scale", type=float, default=16.0, help="cosine classifier scale")
    p.add_argument("--per-class", type=int, default=100, help="images per class (natural order)")
    p.add_argument("--val-classes", type=int, default=30)
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1))
    p.add_argument("--budget-s", type=float, default=float("inf"),
                   help="stop starting epochs / configs after this many seconds")
    p.add_argument("--imagenet-dir", default=None, help="ImageNet weights from --export-imagenet")
    p.add_argument("--export-imagenet", default=None, metavar="DIR",
                   help="only write the ImageNet weights of --backbones to DIR and exit")
    p.add_argument("--key-root", default=None,
                   help="root that seeds the renderings (default: real path of --data-root)")
    p.add_argument("--model", default=None, help="relational checkpoint (default: the shipped one)")
    p.add_argument("--ship", choices=list(CONFIGS), default=None,
                   help="afterwards copy this config's best weights into the package "
                   "(src/resend_novelty/weights/<backbone>_ft.safetensors)")
    p.add_argument("--smoke", action="store_true", help="tiny run for tests: 2 steps per epoch")
    args = p.parse_args(argv)
    if args.export_imagenet:
        export_imagenet(Path(args.export_imagenet), args.backbones)
        return 0
    if not args.data_root:
        p.error("--data-root is required")
    args.deadline = time.monotonic() + args.budget_s
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    data_root = args.data_root
    train_dir = str(Path(data_root) / "tiny_imagenet_200" / "train")
    key_root = args.key_root or os.path.realpath(data_root)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {"args": {k: v for k, v in vars(args).items() if k != "deadline"},
             "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
             "torch": torch.__version__, "epochs": [], "ensembles": []}

    def save_log():
        tmp = out / "log.json.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(out / "log.json")

    records, _ = reference_records(train_dir, max_per_class=args.per_class)
    labels = np.array([r.label for r in records])
    train_mask, _ = split_validation(labels, args.val_classes, args.seed)
    train_recs = [r for r, m in zip(records, train_mask) if m]
    pitems, plabels, pdoms, pval = proxy_items(train_dir, key_root, data_root, args.seed,
                                               args.val_classes, 8 if args.smoke else args.per_class)
    if args.smoke:
        args.batch = min(args.batch, 16)
        train_recs = [r for r in train_recs if r.label in sorted({r.label for r in train_recs})[:4]]
        train_recs = train_recs[:: max(1, len(train_recs) // 64)]
    paths = [r.path for r in train_recs]
    tlabels = np.array([r.label for r in train_recs])
    log(f"{len(paths)} training images ({len(np.unique(tlabels))} classes), "
        f"{len(pitems)} proxy images ({len(pval)} held-out classes), device {state['device']}")

    model = load_checkpoint(args.model)
    members: dict = {}  # (config, backbone) -> best proxy features
    frozen: dict = {}
    for cfg_name in args.configs:
        if time.monotonic() > args.deadline:
            log(f"time budget reached: config {cfg_name} not run")
            break
        for name in args.backbones:
            bb = load_backbone(name, args.imagenet_dir)
            t0 = time.perf_counter()
            tf = uint8_transform(bb.preprocessing)
            proxy_x = _stack(_Rendered(pitems, tf), args.workers)
            clean = torch.utils.data.DataLoader(_Rendered([(q, q, None) for q in paths], tf),
                                                batch_size=250, num_workers=args.workers)
            log(f"{name}: rendered {len(proxy_x)} proxy images in {time.perf_counter() - t0:.0f} s")

            def proxy_eval(f):
                return proxy_scores(f, plabels, pdoms, pval, cosine_std, args.episodes, 0)

            def record(epoch, score, secs, loss, name=name, cfg_name=cfg_name):
                state["epochs"].append({"config": cfg_name, "backbone": name, "epoch": epoch,
                                        "proxy": score, "train_s": secs, "loss": loss})
                save_log()
                log(f"{cfg_name} {name} epoch {epoch}: proxy multi {score['multi']:.4f} single "
                    f"{score['single']:.4f} mean {score['mean']:.4f} ({secs:.0f} s, loss {loss})")

            best_state, best_feats, best_epoch, frozen[name] = finetune(
                bb, CONFIGS[cfg_name], clean, paths, tlabels, args, device, proxy_x, proxy_eval,
                record)
            members[(cfg_name, name)] = best_feats
            state.setdefault("best_epoch", {})[f"{cfg_name}|{name}"] = best_epoch
            if best_epoch > 0:
                save_file(_fp16(best_state), str(out / f"{cfg_name}-{name}.safetensors"),
                          metadata={"config": cfg_name, "epoch": str(best_epoch),
                                    "seed": str(args.seed)})
            save_log()
            del proxy_x
        # the ensemble of this config's best members vs the frozen ensemble
        if all((cfg_name, n) in members for n in args.backbones):
            ens = {"frozen": torch.cat([frozen[n] for n in args.backbones], 1),
                   cfg_name: torch.cat([members[(cfg_name, n)] for n in args.backbones], 1)}
            for label, feats in ens.items():
                if any(e["features"] == label for e in state["ensembles"]):
                    continue
                row = {"features": label}
                rules = [("cosine-standardized", cosine_std)]
                if feats.shape[1] == model.config.feature_dim:
                    rules.append(("resend default", lambda: ReSeNDDetector(
                        model=model, backbone=None, progress=False)))
                else:
                    log(f"relational model skipped: it takes {model.config.feature_dim}-d "
                        f"features, the ensemble gives {feats.shape[1]}")
                for rule, make in rules:
                    for seed, n in ((0, args.episodes), (1, 4 * args.episodes)):
                        t0 = time.perf_counter()
                        row[f"{rule}|seed{seed}|{n}"] = proxy_scores(feats, plabels, pdoms, pval,
                                                                     make, n, seed)
                        log(f"ensemble {label}, {rule}, seed {seed}, {n} episodes: "
                            f"{row[f'{rule}|seed{seed}|{n}']} ({time.perf_counter() - t0:.0f} s)")
                state["ensembles"].append(row)
                save_log()
    if args.ship:  # the chosen config's best weights become the package's fine-tuned backbones
        weights = ROOT / "src" / "resend_novelty" / "weights"
        for name in args.backbones:
            src = out / f"{args.ship}-{name}.safetensors"
            if not src.is_file():
                raise SystemExit(f"--ship {args.ship}: {src} missing (no epoch beat the frozen "
                                 f"backbone on the proxy)")
            dst = weights / f"{name}_ft.safetensors"
            shutil.copyfile(src, dst)
            (weights / f"{name}_ft.safetensors.json").write_text(json.dumps(
                {"sha256": sha256_file(dst), "config": args.ship, "seed": args.seed,
                 "best_epoch": state["best_epoch"][f"{args.ship}|{name}"],
                 "command": "python tools/finetune_backbones.py --data-root ../shared/data "
                            f"--ship {args.ship}"}, indent=2) + "\n")
            log(f"installed {dst} (+ .json with its SHA-256)")
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
