"""One decode pass over the images: the pixel hash for exact duplicates and the quality figures.

Every image is decoded once here (from the decode cache for small images), and everything that
needs its pixels is computed from that one decode: a BLAKE2 hash of the decoded RGB array (exact
duplicates: the same pixels, whatever the file format or metadata) and the figures the quality
checks read. Embedding decodes the images again (at the backbone's input size, in its own
batches): the audit decodes each image twice in all, not once per check.

Figures are computed on the image reduced to at most ``WORK_SIDE`` pixels a side, so that they
mean the same for a 4,000-pixel photo and a 150-pixel one (and cost little):

* ``sharpness``: standard deviation of the Laplacian over that of the grey levels (+1): the share
  of the contrast found at the finest scale; low for blurred images, whatever their contrast;
* ``brightness``: mean luminance (ITU-R 601 weights) in [0, 1];
* ``entropy``: Shannon entropy of the 256-level grey histogram, in bits (0 for a constant image);
* ``colourfulness``: mean absolute difference between the colour channels, in grey levels
  (0 for a grey image; JPEG noise keeps grey photos under about 2);
* ``width``, ``height``: of the decoded image, in pixels.

It also keeps a ``THUMB_SIDE`` x ``THUMB_SIDE`` colour thumbnail of each image (squashed to a
square, zero mean, unit norm): near-duplicate candidates are verified on it (see
:mod:`._duplicates`).
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from .._decode import DecodeError, Skipped, load_rgb
from ..data import ImageSource

WORK_SIDE = 256  # px: quality figures are computed on the image reduced to at most this a side
THUMB_SIDE = 16  # px: the colour thumbnail that verifies near-duplicate candidates
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_CHUNK = 256
COLUMNS = ["pixel_hash", "width", "height", "sharpness", "brightness", "entropy", "colourfulness"]


def image_figures(pixels: np.ndarray) -> tuple:
    """The hash and quality figures of one decoded image.

    Args:
        pixels: uint8 array (H, W, 3).

    Returns:
        (a tuple in the order of ``COLUMNS``, the thumbnail of :func:`thumbnail`).
    """
    height, width = pixels.shape[:2]
    digest = hashlib.blake2b(np.ascontiguousarray(pixels).tobytes(), digest_size=16)
    digest.update(f"{width}x{height}".encode())
    if max(width, height) > WORK_SIDE:
        image = Image.fromarray(pixels)
        image.thumbnail((WORK_SIDE, WORK_SIDE), Image.Resampling.BOX)
        pixels = np.asarray(image)
    rgb = pixels.astype(np.float32)
    grey = rgb @ _LUMA
    if min(grey.shape) >= 3:
        lap = grey[1:-1, :-2] + grey[1:-1, 2:] + grey[:-2, 1:-1] + grey[2:, 1:-1] - 4 * grey[1:-1, 1:-1]
        sharpness = float(lap.std() / (grey.std() + 1.0))
    else:
        sharpness = float("nan")  # too thin for a Laplacian
    counts = np.bincount(np.clip(grey, 0, 255).astype(np.uint8).ravel(), minlength=256)
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0: no -0.0
    colour = (np.abs(rgb[..., 0] - rgb[..., 1]) + np.abs(rgb[..., 1] - rgb[..., 2]) + np.abs(rgb[..., 0] - rgb[..., 2])) / 3
    figures = (digest.hexdigest(), width, height, sharpness, float(grey.mean() / 255), entropy, float(colour.mean()))
    return figures, thumbnail(pixels)


def thumbnail(pixels: np.ndarray) -> np.ndarray:
    """float32 (THUMB_SIDE * THUMB_SIDE * 3,): the colour image squashed to a small square
    (box filter), zero mean, unit norm, so that a copy's brightness or contrast does not count."""
    small = Image.fromarray(np.ascontiguousarray(pixels)).resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX)
    small = np.asarray(small, dtype=np.float32).ravel()
    small = small - small.mean()
    return (small / max(float(np.linalg.norm(small)), 1e-6)).astype(np.float32)


def scan_images(
    source: ImageSource, *, progress: bool = True, workers: int | None = None
) -> tuple[pd.DataFrame, list[Skipped], np.ndarray]:
    """Decode every image of ``source`` once and compute its hash and quality figures.

    Args:
        source: the images (array-backed sources are read from memory).
        progress: show a progress bar.
        workers: decoding processes for file-backed sources (default: the number of CPUs).

    Returns:
        (figures, skipped, thumbnails): a DataFrame with one row per image of ``source`` in its
        order and the columns ``COLUMNS`` (NaN / empty hash for an unreadable image), the
        unreadable images, and float32 (N, 3 * THUMB_SIDE**2) thumbnails (zeros where unreadable).
    """
    n = len(source)
    rows: list = [None] * n
    skipped: list[Skipped] = []
    bar = tqdm(total=n, desc="audit: decode and measure", unit="img", disable=not progress)
    if source.pixels is not None:
        for i in range(n):
            rows[i] = image_figures(np.asarray(source.pixels[i]))
            bar.update(1)
    else:
        chunks = [(source.paths[s : s + _CHUNK], source.max_pixels) for s in range(0, n, _CHUNK)]
        workers = min(workers or os.cpu_count() or 1, max(1, len(chunks)))
        results = map(_scan_chunk, *zip(*chunks)) if workers == 1 or len(chunks) == 1 else None
        pool = None
        if results is None:
            pool = ProcessPoolExecutor(workers, mp_context=get_context("fork"))
            results = pool.map(_scan_chunk, *zip(*chunks))
        try:
            for start, (figures, bad) in zip(range(0, n, _CHUNK), results):
                rows[start : start + len(figures)] = figures
                skipped += bad
                bar.update(len(figures))
        finally:
            if pool is not None:
                pool.shutdown()
    bar.close()
    blank = (("", 0, 0, np.nan, np.nan, np.nan, np.nan), np.zeros(3 * THUMB_SIDE**2, np.float32))
    rows = [r if r is not None else blank for r in rows]
    frame = pd.DataFrame([r[0] for r in rows], columns=COLUMNS)
    thumbs = np.stack([r[1] for r in rows]) if rows else np.zeros((0, 3 * THUMB_SIDE**2), np.float32)
    return frame, skipped, thumbs


def _scan_chunk(paths: list[str], max_pixels: int) -> tuple[list, list[Skipped]]:
    figures, bad = [], []
    for path in paths:
        try:
            figures.append(image_figures(np.asarray(load_rgb(path, max_pixels))))
        except DecodeError as e:
            figures.append(None)
            bad.append(Skipped(path, str(e)))
    return figures, bad
