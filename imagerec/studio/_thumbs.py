"""Thumbnails, cached on disk in the project folder: made on first request, written atomically."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from .._decode import DecodeError, load_rgb
from .._io import atomic_path

THUMB_SIDE = 128


def thumbnail_path(folder: Path, image_id: int) -> Path:
    """``thumbs/<id // 1000>/<id>.jpg``: at most 1,000 files a folder."""
    return folder / "thumbs" / str(image_id // 1000) / f"{image_id}.jpg"


def thumbnail(folder: Path, image_id: int, source: str, side: int = THUMB_SIDE) -> Path | None:
    """The cached thumbnail of an image, made now if missing; None when the image cannot be read."""
    path = thumbnail_path(folder, image_id)
    if path.is_file():
        return path
    try:
        img = load_rgb(source)
    except (DecodeError, OSError):
        return None
    img.thumbnail((side, side), Image.Resampling.BICUBIC)
    with atomic_path(path, ".jpg") as tmp:
        img.save(tmp, "JPEG", quality=85)
    return path


def small_jpeg(img: Image.Image, side: int = THUMB_SIDE) -> bytes:
    """A JPEG of an uploaded image, for showing it back in the page (nothing is stored)."""
    img = img.convert("RGB")
    img.thumbnail((side, side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()
