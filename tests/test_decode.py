"""Decoding never takes a run down: every mode becomes RGB, bad files raise DecodeError."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imagerec.data import DecodeError, load_rgb
from imagerec._decode import is_image_file

from .conftest import make_image


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1"])
def test_modes_become_rgb(tmp_path, mode):
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    path = make_image(tmp_path / f"img.{fmt.lower()}", (20, 10), mode=mode, fmt=fmt)
    img = load_rgb(path)
    assert img.mode == "RGB" and img.size == (20, 10)


def test_transparent_pixels_are_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)  # black and fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    assert np.asarray(load_rgb(tmp_path / "clear.png")).min() == 255


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    grey = np.array([[0, 32768, 65535]], dtype=np.uint16)
    img16 = Image.fromarray(grey)
    assert img16.mode == "I;16"
    img16.save(tmp_path / "deep.png")
    img = load_rgb(tmp_path / "deep.png")
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img)[0, :, 0], [0, 128, 255])


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (30, 10), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_rgb(tmp_path / "rot.jpg").size == (10, 30)


def test_truncated_jpeg(tmp_path):
    path = make_image(tmp_path / "full.jpg", (64, 64))
    data = path.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DecodeError, match="corrupt or truncated"):
        load_rgb(tmp_path / "cut.jpg")


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(DecodeError, match="empty file"):
        load_rgb(tmp_path / "empty.jpg")


def test_not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("this is text, not a picture")
    with pytest.raises(DecodeError, match="not an image"):
        load_rgb(tmp_path / "notes.png")


def test_corrupt_body(tmp_path):
    path = make_image(tmp_path / "img.png", (32, 32))
    data = bytearray(path.read_bytes())
    data[60:200] = b"\x00" * 140  # damage the compressed data, keep the header
    path.write_bytes(bytes(data))
    with pytest.raises(DecodeError):
        load_rgb(path)


def test_decompression_bomb_guard_is_configurable(tmp_path):
    path = make_image(tmp_path / "big.png", (100, 100))
    with pytest.raises(DecodeError, match="over the limit of 5,000"):
        load_rgb(path, max_pixels=5_000)
    assert load_rgb(path, max_pixels=10_000).size == (100, 100)


def test_missing_file(tmp_path):
    with pytest.raises(DecodeError, match="file not found"):
        load_rgb(tmp_path / "gone.jpg")


@pytest.mark.parametrize("name", ["a.jpg", "b.JPEG", "c.Png", "d.bmp", "e.GIF", "f.webp", "g.tif", "h.TIFF"])
def test_image_extensions_any_case(name):
    assert is_image_file(name)


def test_other_extensions_are_not_images():
    assert not is_image_file("notes.txt") and not is_image_file("archive.tar.gz")
