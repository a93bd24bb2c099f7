"""Image files: which files are images (:data:`IMAGE_EXTENSIONS`) and decoding them as RGB.

Only the decoders of the documented formats (:data:`IMAGE_FORMATS`: JPEG, PNG, WebP, BMP) ever
see a file's bytes: a file of any other format (PostScript, TIFF, GIF, ...) is refused whatever
its name, so no external program (Ghostscript) is ever run. Decoding is bounded:

- an image of more than :data:`MAX_PIXELS` pixels (a decompression bomb) is refused before its
  pixels are decoded;
- an image more than :data:`MAX_ASPECT` times longer than wide (or the reverse) is centre-cropped
  to that ratio, so the resize of its short side downstream cannot blow up; the centre crop of
  the preprocessing keeps the same pixels, so only the memory changes.

Decoding is faithful: EXIF orientation is applied, 16-bit / 32-bit integer and float greyscale
images are scaled (not clipped) to the 8-bit range (see :func:`_scale_to_8bit`), transparency is composited on white. A
zero-byte, truncated, undecodable or refused image is a
:class:`~resend_novelty.data.errors.DataError` naming the file.
"""

from __future__ import annotations

import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "IMAGE_FORMATS", "MAX_PIXELS", "MAX_ASPECT", "load_image"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
#: The Pillow decoders a file may be handed to (those of :data:`IMAGE_EXTENSIONS`).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
#: Largest image decoded (width x height), as Pillow's default ``Image.MAX_IMAGE_PIXELS``.
MAX_PIXELS = 89_478_485
#: Largest ratio of the long to the short side kept; longer images are centre-cropped to it.
MAX_ASPECT = 10

_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # orientations that swap width and height


def load_image(path: str | os.PathLike, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image as RGB; errors name the file.

    ``draft=(w, h)``: for a JPEG file, let the decoder work at a reduced DCT scale (1/2, 1/4 or
    1/8) whose result is still at least ``w x h`` (in the displayed orientation); other formats
    and ``None`` (default) decode at full size.
    """
    path = str(path)
    try:
        st = os.stat(path)
        size = st.st_size
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block, a device never end
            raise DataError(f"cannot read image {path}: not a regular file")
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # embedded NUL byte
        raise DataError(f"cannot read image {path!r}: {exc}") from None
    if size == 0:
        raise DataError(f"image file is empty (0 bytes): {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=list(IMAGE_FORMATS)) as img:
                return _decode(img, path, draft)
    except Image.DecompressionBombError as exc:
        raise DataError(f"image too large to decode (decompression bomb?) {path}: {exc}") from None
    except UnidentifiedImageError:
        raise DataError(
            f"cannot decode image {path}: not a {'/'.join(IMAGE_FORMATS)} file"
        ) from None
    except DataError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a hostile file may trip any decoder error
        raise DataError(f"cannot decode image {path}: {exc or type(exc).__name__}") from None


def _decode(img: Image.Image, path: str, draft: tuple[int, int] | None) -> Image.Image:
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise DataError(
            f"image too large to decode (decompression bomb?) {path}: {width}x{height} pixels, "
            f"more than {MAX_PIXELS}"
        )
    if draft is not None and img.format == "JPEG":
        dw, dh = int(draft[0]), int(draft[1])
        if img.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSING_ORIENTATIONS:
            dw, dh = dh, dw
        img.draft("RGB", (dw, dh))
    img.load()
    img = ImageOps.exif_transpose(img)
    img = _bounded_aspect(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _scale_to_8bit(img).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def _bounded_aspect(img: Image.Image) -> Image.Image:
    w, h = img.size
    if w > MAX_ASPECT * h:
        left = (w - MAX_ASPECT * h) // 2
        return img.crop((left, 0, left + MAX_ASPECT * h, h))
    if h > MAX_ASPECT * w:
        top = (h - MAX_ASPECT * w) // 2
        return img.crop((0, top, w, top + MAX_ASPECT * w))
    return img


def _scale_to_8bit(img: Image.Image) -> Image.Image:
    """A high-bit-depth greyscale image as ``L``.

    Float samples in [0, 1] are scaled by 255; samples already in [0, 255] (an 8-bit image stored
    wider) are kept; samples in [0, 65535] (16-bit) are divided by 257; anything else is min-max
    scaled. NaN / infinite samples become 0.
    """
    src = np.asarray(img)  # native samples (uint16 / int32 / float32): no float64 copy
    rows = max(1, (1 << 18) // max(1, src.shape[1] if src.ndim > 1 else 1))  # 256k samples
    lo, hi = np.inf, -np.inf
    for start in range(0, src.shape[0], rows):  # the range, block by block (non-finite = 0)
        block = np.nan_to_num(src[start:start + rows].astype(np.float64), nan=0.0, posinf=0.0,
                              neginf=0.0)
        if block.size:
            lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
    if not np.isfinite(lo):
        lo = hi = 0.0
    if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        scale, shift = 255.0, 0.0
    elif lo >= 0.0 and hi <= 255.0:
        scale, shift = 1.0, 0.0
    elif lo >= 0.0 and hi <= 65535.0:  # 16-bit samples held in a 32-bit mode (e.g. PNG 'I')
        scale, shift = 1.0 / 257.0, 0.0
    elif hi > lo:
        scale, shift = 255.0 / (hi - lo), lo
    else:
        scale, shift = 0.0, lo
    out = np.empty(src.shape, dtype=np.uint8)  # memory: the samples plus one byte a pixel
    for start in range(0, src.shape[0], rows):
        block = np.nan_to_num(src[start:start + rows].astype(np.float64), nan=0.0, posinf=0.0,
                              neginf=0.0)
        out[start:start + rows] = np.clip(np.rint((block - shift) * scale), 0, 255)
    return Image.fromarray(out, "L")
