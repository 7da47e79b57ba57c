"""Decoding that never takes a run down, and the listing of image files.

Every image becomes an 8-bit RGB picture the right way up, or a :class:`DecodeError` with a
reason that the caller records and reports; nothing else escapes from :func:`load_rgb`.

Only the formats imagerec reads are ever opened (``Image.open(..., formats=PILLOW_FORMATS)``):
a ``photo.jpg`` that holds PostScript is refused, never handed to Ghostscript.

Limits, checked from the file's header before any pixel is decoded:

* ``max_pixels`` (``--max-pixels``) is the one decompression-bomb limit. Pillow's own
  (``Image.MAX_IMAGE_PIXELS``, about 89 M pixels, refusing at twice that) is left in force for
  every file that passes it; a file over it is opened a second time with Pillow's limit lifted
  for that one call, under a lock, so a ``max_pixels`` above Pillow's works and the global is
  restored at once.
* an aspect ratio over ``MAX_ASPECT`` (50:1) is refused: resizing the short side of a 30000x1
  strip to the model's input would make a picture of billions of pixels.

File listing (:func:`walk_images`, :func:`expand_paths`) follows symbolic links to folders
once: a folder whose real path was already visited is not entered again, so a link loop
(``ln -s . self``) neither repeats images nor hangs.
"""

from __future__ import annotations

import contextlib
import glob
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImagerecError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# The Pillow formats behind those extensions (JPEG also opens the multi-picture MPO files of cameras).
PILLOW_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default bomb limit (about 0.25 GB of RGB pixels)
MAX_ASPECT = 50  # longer side / shorter side; thinner images are skipped with a reason

_PILLOW_LIMIT_LOCK = threading.Lock()


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


def display_path(path: str | os.PathLike) -> str:
    """A path as text that can be printed and written as UTF-8, and found again by a user.

    Linux file names are bytes; one that is not UTF-8 (``caf\\xe9.jpg`` in Latin-1) reaches
    Python with lone surrogates that no UTF-8 writer accepts. Each byte that is not UTF-8 is
    shown as a ``\\xNN`` escape (``caf\\xe9.jpg``), as ``ls --quoting-style=escape`` and Python's
    ``repr`` of bytes do; valid names are unchanged.
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def load_rgb(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read one image file as RGB, with its EXIF orientation applied.

    Args:
        path: an image file.
        max_pixels: refuse images with more pixels than this (the decompression-bomb guard).

    Returns:
        A fully decoded PIL image in mode ``RGB``.

    Raises:
        DecodeError: the file is empty, missing, not an image of a format imagerec reads,
            truncated or corrupt, has too many pixels, or is too thin.
    """
    try:
        if os.path.getsize(path) == 0:
            raise DecodeError("empty file (0 bytes)")
        with warnings.catch_warnings(), _open(path) as img:
            warnings.simplefilter("ignore")  # Pillow's notes on damaged metadata: the image decodes or is skipped
            _check_size(img.size, max_pixels)
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except DecodeError:
        raise
    except FileNotFoundError:
        raise DecodeError("file not found") from None
    except UnidentifiedImageError:
        raise DecodeError(f"not an image file imagerec reads ({', '.join(PILLOW_FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:  # corrupt data
        raise DecodeError(f"corrupt or truncated image ({e})") from None
    except MemoryError:
        raise DecodeError("corrupt image (decoding it ran out of memory)") from None


@contextlib.contextmanager
def _open(path: str | os.PathLike) -> Iterator[Image.Image]:
    """``Image.open`` limited to imagerec's formats; past Pillow's bomb limit, a second open
    with that limit lifted for the one call (our own ``max_pixels`` is checked by the caller)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bomb warning (our limit decides) and notes on damaged tags
        try:
            img = Image.open(path, formats=PILLOW_FORMATS)
        except Image.DecompressionBombError:
            with _PILLOW_LIMIT_LOCK:
                saved = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
                try:
                    img = Image.open(path, formats=PILLOW_FORMATS)
                finally:
                    Image.MAX_IMAGE_PIXELS = saved
    with img:
        yield img


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise DecodeError(f"an image of {width} x {height} pixels has nothing in it")
    if width * height > max_pixels:
        raise DecodeError(
            f"too many pixels ({width} x {height} = {width * height:,}, over the limit of {max_pixels:,}, "
            "a decompression-bomb guard); raise it with --max-pixels if the image is trusted"
        )
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise DecodeError(
            f"too thin ({width} x {height}: an aspect ratio over {MAX_ASPECT}:1); crop it into "
            "pieces of at most 50:1 to use it"
        )


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparent pixels (modes RGBA, LA, P with transparency) are composited on white, as a
    person sees them in a viewer; 16- and 32-bit grey images are scaled to 8 bits, not clipped.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(np.nan_to_num(arr).max()), 1.0)
        grey = np.clip(np.nan_to_num(arr) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def peek_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """The (width, height) from an image's header without decoding it, or None if unreadable
    (or not of a format imagerec reads)."""
    try:
        with _open(path) as img:
            return img.size
    except Exception:  # noqa: BLE001 - any unreadable file simply has no size
        return None


def walk_images(root: str | os.PathLike) -> Iterator[str]:
    """Image files under ``root``, recursively, in sorted order; hidden names are skipped.

    Links to folders are followed once: a folder whose real path was already visited is not
    entered again, so link loops terminate and list each image once.
    """
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield from (os.path.join(folder, f) for f in sorted(files) if not f.startswith(".") and is_image_file(f))


def expand_paths(items: Iterable[str | os.PathLike]) -> list[str]:
    """Files, folders (searched recursively) and glob patterns as a flat list of image files.

    A name that exists is taken as it is before it is read as a pattern: ``photo[1].jpg`` is
    that file when it exists, and a glob only when it does not.

    Raises:
        ImagerecError: a path that does not exist, a pattern that matches no image, or a folder
            without images.
    """
    paths: list[str] = []
    for item in items:
        text = os.fspath(item)
        if os.path.isfile(text):
            paths.append(text)
        elif os.path.isdir(text):
            found = list(walk_images(text))
            if not found:
                raise ImagerecError(
                    f"{text}: holds no images (searched all sub-folders); point at a folder that has some"
                )
            paths += found
        elif glob.has_magic(text):
            found = sorted(p for p in glob.glob(text, recursive=True) if os.path.isfile(p) and is_image_file(p))
            if not found:
                raise ImagerecError(f"{text}: the pattern matches no image files")
            paths += found
        else:
            raise ImagerecError(f"{text}: no such file or folder")
    return paths
