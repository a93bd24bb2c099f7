"""Domain-shift augmentations for pretraining: make a reference photo look like another domain.

The paper's test domains (paintings, cartoons, sketches) are absent from the reference set.
:class:`DomainShiftView` turns a photo into a deterministic stylised *view*: grayscale,
sketch-like edge maps, cartoon-like posterisation with dark outlines, painting-like smoothing
with saturated colours, strong colour jitter, or low resolution. Each (image, view index) pair
always yields the same picture, so the features of augmented views can be cached like any other
preprocessing (the view index and :data:`AUGMENT_VERSION` are part of the cache key).
"""

from __future__ import annotations

import random
import zlib
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

__all__ = ["DomainShiftView", "STYLES", "AUGMENT_VERSION", "stylise"]

AUGMENT_VERSION = 1


def _grayscale(img: Image.Image, rng: random.Random) -> Image.Image:
    img = ImageOps.grayscale(img)
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.8, 1.6))
    return img.convert("RGB")


def _upsample(img: Image.Image) -> Image.Image:
    # stylisation of 64x64 images is too coarse: work at >= 192 px
    if img.width < 160:
        f = -(-192 // img.width)
        img = img.resize((img.width * f, img.height * f), Image.BICUBIC)
    return img


def _sketch(img: Image.Image, rng: random.Random) -> Image.Image:
    """Pencil drawing: colour-dodge of the grayscale image with its blurred negative."""
    g = ImageOps.grayscale(_upsample(img)).filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 1.5)))
    inv_blur = ImageOps.invert(g).filter(ImageFilter.GaussianBlur(rng.uniform(4, 9)))
    gf = np.asarray(g, dtype=np.float32)
    bf = np.asarray(inv_blur, dtype=np.float32)
    dodge = np.clip(gf * 255.0 / (256.0 - bf), 0, 255) / 255.0
    dodge = dodge ** rng.uniform(2.0, 4.0)  # darker strokes
    return Image.fromarray((dodge * 255).astype(np.uint8), "L").convert("RGB")


def _cartoon(img: Image.Image, rng: random.Random) -> Image.Image:
    """Flat colours (smoothing + posterisation) with dark outlines."""
    base = _upsample(img)
    flat = base.filter(ImageFilter.MedianFilter(7)).filter(ImageFilter.MedianFilter(7))
    flat = ImageOps.posterize(flat, rng.choice([2, 3]))
    flat = ImageEnhance.Color(flat).enhance(rng.uniform(1.3, 2.0))
    soft = ImageOps.grayscale(base).filter(ImageFilter.GaussianBlur(2.5))
    edges = np.asarray(soft.filter(ImageFilter.FIND_EDGES), dtype=np.float32)
    mask = edges > np.percentile(edges, rng.uniform(88, 94))
    out = np.asarray(flat).copy()
    out[mask] = 0
    return Image.fromarray(out, "RGB")


def _painting(img: Image.Image, rng: random.Random) -> Image.Image:
    """Smoothed brush-like regions, shifted colours and texture."""
    p = _upsample(img).filter(ImageFilter.ModeFilter(rng.choice([5, 7])))
    p = ImageEnhance.Color(p).enhance(rng.uniform(0.6, 1.8))
    p = ImageEnhance.Contrast(p).enhance(rng.uniform(0.8, 1.4))
    tint = Image.new("RGB", p.size, tuple(rng.randint(0, 255) for _ in range(3)))
    p = Image.blend(p, tint, rng.uniform(0.05, 0.25))
    return p.filter(ImageFilter.EDGE_ENHANCE if rng.random() < 0.5 else ImageFilter.SMOOTH_MORE)


def _colour(img: Image.Image, rng: random.Random) -> Image.Image:
    """Strong colour/style jitter: hue rotation by channel permutation, solarise, equalise."""
    r, g, b = img.split()
    chans = [r, g, b]
    rng.shuffle(chans)
    out = Image.merge("RGB", chans)
    if rng.random() < 0.3:
        out = ImageOps.solarize(out, rng.randint(128, 224))
    if rng.random() < 0.5:
        out = ImageOps.equalize(out)
    out = ImageEnhance.Color(out).enhance(rng.uniform(0.3, 2.0))
    return ImageEnhance.Brightness(out).enhance(rng.uniform(0.7, 1.3))


def _lowres(img: Image.Image, rng: random.Random) -> Image.Image:
    s = rng.uniform(0.25, 0.5)
    w, h = img.size
    small = img.resize((max(8, int(w * s)), max(8, int(h * s))), Image.BILINEAR)
    return small.resize((w, h), Image.NEAREST if rng.random() < 0.5 else Image.BILINEAR)


STYLES: dict[str, Callable[[Image.Image, random.Random], Image.Image]] = {
    "grayscale": _grayscale,
    "sketch": _sketch,
    "cartoon": _cartoon,
    "painting": _painting,
    "colour": _colour,
    "lowres": _lowres,
}


def stylise(img: Image.Image, style: str, seed: int) -> Image.Image:
    return STYLES[style](img.convert("RGB"), random.Random(seed))


class DomainShiftView:
    """Deterministic stylised view ``view`` of an image, then the backbone's preprocessing.

    View ``v`` of every image uses style ``styles[v % len(styles)]``; the random parameters of the
    style come from the image path and ``v``. Horizontal flips are applied at random (seeded).
    """

    wants_path = True  # the feature extractor passes the image path as the seed key

    def __init__(self, view: int, preprocess: Callable, styles: tuple[str, ...] | None = None):
        self.view = int(view)
        self.styles = tuple(styles or STYLES)
        for s in self.styles:
            if s not in STYLES:
                raise ValueError(f"unknown style {s!r}; choose from {sorted(STYLES)}")
        self.style = self.styles[self.view % len(self.styles)]
        self.preprocess = preprocess

    @property
    def namespace_suffix(self) -> str:
        return f"|domainshift-v{AUGMENT_VERSION}-{self.style}-view{self.view}"

    def seed_for(self, key: str) -> int:
        return zlib.crc32(f"{key}|{self.view}".encode())

    def __call__(self, img: Image.Image, key: str = "") -> Image.Image:
        seed = self.seed_for(key)
        out = stylise(img, self.style, seed)
        if random.Random(seed + 1).random() < 0.5:
            out = ImageOps.mirror(out)
        return self.preprocess(out)
