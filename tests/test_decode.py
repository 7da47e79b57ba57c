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


# -- issue 10: formats, limits, listing ---------------------------------------------------------

import os  # noqa: E402
import struct  # noqa: E402
import zlib  # noqa: E402

from PIL import EpsImagePlugin  # noqa: E402

from imagerec._decode import MAX_ASPECT, display_path, expand_paths, peek_size, walk_images  # noqa: E402
from imagerec.errors import ImagerecError  # noqa: E402

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nnewpath 0 0 moveto showpage\n%%EOF\n"


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_postscript_named_jpg_is_never_opened_as_eps(tmp_path, monkeypatch):
    opened = []
    def spy(self):
        opened.append(self)
        raise SyntaxError("the EPS reader was tried")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", spy)
    (tmp_path / "photo.jpg").write_bytes(EPS)
    with pytest.raises(DecodeError, match="not an image file imagerec reads"):
        load_rgb(tmp_path / "photo.jpg")
    assert peek_size(tmp_path / "photo.jpg") is None
    assert opened == []  # Pillow never even tried the EPS reader


def test_a_bomb_says_too_many_pixels_with_its_size(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(20_000, 10_000))  # 200 M pixels: over Pillow's 179 M refusal
    with pytest.raises(DecodeError, match=r"too many pixels \(20000 x 10000"):
        load_rgb(path)


def test_max_pixels_above_pillows_own_limit_is_the_one_limit(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header_only(20_000, 10_000))
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(DecodeError) as info:
        load_rgb(path, max_pixels=300_000_000)  # trusted: passes the limit, then the data is short
    assert "too many pixels" not in str(info.value) and "bomb refused by Pillow" not in str(info.value)
    assert "truncated" in str(info.value)
    assert Image.MAX_IMAGE_PIXELS == before  # Pillow's global limit is left as it was


def test_a_thin_strip_is_refused_before_decoding(tmp_path):
    Image.new("RGB", (30_000, 1), "red").save(tmp_path / "strip.png")
    with pytest.raises(DecodeError, match=r"too thin \(30000 x 1"):
        load_rgb(tmp_path / "strip.png")
    Image.new("RGB", (MAX_ASPECT * 2, 2), "red").save(tmp_path / "ok.png")
    assert load_rgb(tmp_path / "ok.png").size == (MAX_ASPECT * 2, 2)


def test_a_link_loop_lists_each_image_once(tmp_path):
    make_image(tmp_path / "a.png", (8, 8))
    make_image(tmp_path / "sub" / "b.png", (8, 8))
    os.symlink(".", tmp_path / "self")
    os.symlink("..", tmp_path / "sub" / "up")
    assert [os.path.relpath(p, tmp_path) for p in walk_images(tmp_path)] == ["a.png", "sub/b.png"]


def test_an_existing_name_is_a_file_before_it_is_a_glob(tmp_path):
    path = make_image(tmp_path / "photo[1].jpg", (8, 8))
    make_image(tmp_path / "photo1.jpg", (8, 8))
    assert expand_paths([str(path)]) == [str(path)]
    assert expand_paths([str(tmp_path / "photo[0-9].jpg")]) == [str(tmp_path / "photo1.jpg")]
    with pytest.raises(ImagerecError, match="matches no image"):
        expand_paths([str(tmp_path / "x[0-9].jpg")])


def test_a_non_utf8_name_is_shown_with_an_escape(tmp_path):
    name = os.fsdecode(b"caf\xe9.jpg")
    assert display_path(name) == "caf\\xe9.jpg"
    assert display_path("café.jpg") == "café.jpg"
    path = make_image(tmp_path / name, (8, 8))
    assert load_rgb(path).size == (8, 8)
