"""Decoding that never takes a run down.

Every image becomes an 8-bit RGB picture the right way up, or a :class:`DecodeError` with a
reason that the caller records and reports; nothing else escapes from :func:`load_rgb`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default bomb limit (about 0.25 GB of RGB pixels)


class DecodeError(Exception):
    """An image that cannot be used; ``str(error)`` is the reason shown to the user."""


@dataclass(frozen=True)
class Skipped:
    """One image left out of a run, and why."""

    path: str
    reason: str


def is_image_file(name: str) -> bool:
    """Whether a file name has an image extension that imagerec reads (any letter case)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def load_rgb(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read one image file as RGB, with its EXIF orientation applied.

    Args:
        path: an image file.
        max_pixels: refuse images with more pixels than this (a decompression-bomb guard).

    Returns:
        A fully decoded PIL image in mode ``RGB``.

    Raises:
        DecodeError: the file is empty, missing, not an image, truncated or corrupt, or too large.
    """
    try:
        if os.path.getsize(path) == 0:
            raise DecodeError("empty file (0 bytes)")
        # Pillow's own guard is replaced by ours, which is configurable and raises cleanly.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise DecodeError(
                        f"{width}x{height} = {width * height:,} pixels is over the limit of "
                        f"{max_pixels:,} (a decompression-bomb guard); raise it with --max-pixels "
                        "if the image is trusted"
                    )
                img.load()
                img = ImageOps.exif_transpose(img)
                return to_rgb(img)
    except DecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise DecodeError(f"decompression bomb refused by Pillow: {e}") from None
    except FileNotFoundError:
        raise DecodeError("file not found") from None
    except UnidentifiedImageError:
        raise DecodeError("not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated or corrupt data
        raise DecodeError(f"corrupt or truncated image ({e})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparent pixels (modes RGBA, LA, P with transparency) are composited on white, as a
    person sees them in a viewer; 16- and 32-bit grey images are scaled to 8 bits, not clipped.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        grey = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def peek_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """The (width, height) from an image's header without decoding it, or None if unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return img.size
    except Exception:  # noqa: BLE001 - any unreadable file simply has no size
        return None
