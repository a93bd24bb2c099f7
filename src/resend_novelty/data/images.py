"""Image files: which files are images (:data:`IMAGE_EXTENSIONS`) and decoding them as RGB.

A zero-byte, truncated or undecodable image is a :class:`~resend_novelty.data.errors.DataError`
naming the file.
"""

from __future__ import annotations

import os

from PIL import Image, UnidentifiedImageError

from .errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "load_image"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image as RGB (grayscale, palette and RGBA converted); errors name the file."""
    path = str(path)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc.strerror or exc}") from None
    if size == 0:
        raise DataError(f"image file is empty (0 bytes): {path}")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, img)
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from None
