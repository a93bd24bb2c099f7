"""Hostile and unusual image files: only documented decoders, bounded memory, faithful pixels."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from resend_novelty.data import DataError, load_image
from resend_novelty.data import images as images_mod


def _jpeg(path, size=(800, 600), seed=0, exif=None):
    arr = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    img = Image.fromarray(arr)
    kwargs = {"exif": exif} if exif is not None else {}
    img.save(path, format="JPEG", quality=90, **kwargs)
    return path


def test_draft_decodes_jpeg_at_reduced_scale_still_covering_request(tmp_path):
    p = _jpeg(tmp_path / "x.jpg")
    full = load_image(p)
    assert full.size == (800, 600)
    assert np.array_equal(np.asarray(full), np.asarray(load_image(p, draft=None)))
    assert load_image(p, draft=(224, 224)).size == (400, 300)  # 1/2: 1/4 would be < 224
    assert load_image(p, draft=(100, 70)).size == (100, 75)  # 1/8
    assert load_image(p, draft=(900, 900)).size == (800, 600)  # never upscaled, never below
    # other formats ignore the draft
    png = make_image(tmp_path / "x.png", (10, 20, 30), size=(800, 600))
    assert load_image(png, draft=(100, 100)).size == (800, 600)


def test_default_decoding_unchanged_for_plain_images(tmp_path):
    p = _jpeg(tmp_path / "plain.jpg", size=(227, 227))
    ref = np.asarray(Image.open(p).convert("RGB"))
    assert np.array_equal(np.asarray(load_image(p)), ref)


def test_postscript_named_jpg_is_never_handed_to_ghostscript(tmp_path, monkeypatch):
    eps = tmp_path / "x.jpg"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    from PIL import EpsImagePlugin

    def boom(*a, **k):  # pragma: no cover - reached only if the EPS decoder were used
        raise AssertionError("Ghostscript reached")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", boom, raising=False)
    with pytest.raises(DataError, match=r"not a JPEG/PNG/WEBP/BMP file") as exc:
        load_image(eps)
    assert str(eps) in str(exc.value)


@pytest.mark.parametrize("fmt,name", [("GIF", "x.png"), ("TIFF", "y.jpg")])
def test_undocumented_formats_refused_whatever_the_name(tmp_path, fmt, name):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / name, format=fmt)
    with pytest.raises(DataError, match="not a JPEG/PNG/WEBP/BMP file"):
        load_image(tmp_path / name)


def _png_header_only(path, width, height):
    """A tiny PNG whose header claims width x height (8-bit greyscale) and one compressed row."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw = zlib.compress(b"\x00" * (width + 1) * min(height, 4))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_a_data_error_before_decoding(tmp_path):
    p = _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    assert p.stat().st_size < 1000
    with pytest.raises(DataError, match=r"too large to decode") as exc:
        load_image(p)
    assert str(p) in str(exc.value)


def test_our_pixel_limit_holds_even_below_pillows(tmp_path, monkeypatch):
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 100)
    p = make_image(tmp_path / "a.png", (1, 2, 3), size=(20, 20))
    with pytest.raises(DataError, match=r"20x20 pixels, more than 100"):
        load_image(p)


def test_extreme_aspect_ratio_is_centre_cropped(tmp_path):
    arr = np.zeros((4000, 1), np.uint8)
    arr[1995:2005] = 255  # the centre survives
    Image.fromarray(arr, "L").save(tmp_path / "tall.png")
    img = load_image(tmp_path / "tall.png")
    assert img.size == (1, images_mod.MAX_ASPECT)
    assert np.asarray(img)[:, 0, 0].tolist() == [255] * images_mod.MAX_ASPECT
    wide = make_image(tmp_path / "wide.png", (1, 2, 3), size=(300, 10))
    assert load_image(wide).size == (100, 10)
    ok = make_image(tmp_path / "ok.png", (1, 2, 3), size=(100, 10))
    assert load_image(ok).size == (100, 10)


def test_16bit_and_32bit_and_float_images_are_scaled_not_clipped(tmp_path):
    g16 = np.full((4, 4), 32768, np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = np.asarray(load_image(tmp_path / "g16.png"))
    assert out.shape == (4, 4, 3) and (out == 128).all()  # mid grey, not white
    # modes that only arise in memory / exotic files, through the scaling helper
    i32 = Image.fromarray(np.array([[0, 65535]], np.int32), "I")
    assert np.asarray(images_mod._scale_to_8bit(i32)).tolist() == [[0, 255]]
    f01 = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    assert np.asarray(images_mod._scale_to_8bit(f01)).tolist() == [[0, 128, 255]]
    neg = Image.fromarray(np.array([[-10.0, 0.0, 10.0]], np.float32), "F")
    assert np.asarray(images_mod._scale_to_8bit(neg)).tolist() == [[0, 128, 255]]


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # red left half, stored landscape
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    out = load_image(tmp_path / "rot.jpg")
    assert out.size == (20, 40)  # portrait as displayed
    top = np.asarray(out)[:5].mean(axis=(0, 1))
    assert top[0] > 200 and top[1] < 60  # the red half is now on top
    # the draft is requested in displayed orientation
    big = Image.fromarray(np.zeros((400, 800, 3), np.uint8))
    ex = big.getexif()
    ex[0x0112] = 6
    big.save(tmp_path / "rotbig.jpg", exif=ex.tobytes())
    assert load_image(tmp_path / "rotbig.jpg", draft=(100, 200)).size == (100, 200)


def test_unreadable_and_nul_paths_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="cannot read image"):
        load_image(str(tmp_path / "a\x00b.png"))
    with pytest.raises(DataError, match="not a regular file"):
        load_image(tmp_path)  # a folder


def test_16bit_image_with_8bit_values_is_kept(tmp_path):
    Image.fromarray(np.array([[0, 100, 255]], np.uint16)).save(tmp_path / "g.png")
    assert np.asarray(load_image(tmp_path / "g.png"))[0, :, 0].tolist() == [0, 100, 255]


def test_fifo_is_not_read(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(DataError, match="not a regular file"):
        load_image(tmp_path / "pipe.png")  # would block forever if opened
