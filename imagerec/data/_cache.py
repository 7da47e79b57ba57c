"""Decode small images once into a memory-mapped uint8 array.

CIFAR-sized images cost more to open and decode than to compute on, and every epoch and every
command would decode them again. :func:`decode_small_images` decodes a folder of small images of
one size once, in parallel, into ``$IMAGEREC_HOME/decoded/<key>.npy``; later calls map that
file. The key covers the file list with each file's identity (size, mtime_ns, inode, ctime_ns
and, for files under 256 KB, a hash of the bytes: :func:`imagerec._identity.file_identity`), so
an edited, added, removed or replaced image gives a new key, even one copied over with the same
size and mtime (``cp`` then ``touch -r``, ``rsync -t``). A folder found to hold images of mixed
sizes is remembered as such (a small ``<key>.json``), so it is not decoded again on every run.
The cache never lives beside the data, which may be read-only.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
from tqdm.auto import tqdm

from .._home import cache_dir
from .._identity import fingerprint
from .._io import atomic_path, write_text_atomic
from .._decode import DecodeError, Skipped, load_rgb, peek_size
from ._sources import ImageSource

SMALL_IMAGE_MAX_SIDE = 64  # images at most this wide and high are cached decoded
_FORMAT = 2  # bump when the decoding rules change, so old caches are not reused
_CHUNK = 512


def decode_small_images(
    source: ImageSource, *, progress: bool = True, workers: int | None = None
) -> ImageSource | None:
    """Return ``source`` backed by a decoded uint8 array, or None if its images are not small.

    Images are small when all have one size of at most ``SMALL_IMAGE_MAX_SIDE`` pixels a side
    (CIFAR, MNIST-like sets). Unreadable files are left out and added to ``skipped``.

    Args:
        source: a file-backed source (an array-backed one is returned as it is).
        progress: show a progress bar while decoding.
        workers: decoding processes (default: the number of CPUs).

    Returns:
        An array-backed :class:`ImageSource`, or None when the images are large or of mixed sizes.
    """
    if source.pixels is not None:
        return source
    size = _common_small_size(source.paths)
    if size is None:
        return None
    key = _cache_key(source, size)
    folder = cache_dir("decoded")
    array_file, meta_file = folder / f"{key}.npy", folder / f"{key}.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
    if meta is None or (meta.get("small", True) and not array_file.is_file()):
        meta = _build(source, size, array_file, meta_file, progress, workers)
    if not meta.get("small", True):  # mixed sizes, found on an earlier run
        return None
    pixels = np.load(array_file, mmap_mode="r")
    kept = np.asarray(meta["kept"], dtype=np.int64)
    cached = source.subset(kept)
    cached.pixels = pixels
    cached.skipped = source.skipped + [Skipped(p, r) for p, r in meta["skipped"]]
    return cached


def _common_small_size(paths: list[str], probe: int = 16) -> tuple[int, int] | None:
    sizes = {peek_size(p) for p in paths[:: max(1, len(paths) // probe)][:probe]}
    sizes.discard(None)
    if len(sizes) != 1:
        return None
    (width, height), = sizes
    return (width, height) if max(width, height) <= SMALL_IMAGE_MAX_SIDE else None


def _cache_key(source: ImageSource, size: tuple[int, int]) -> str:
    return fingerprint(source.paths, str(_FORMAT), str(size), str(source.max_pixels))


class _MixedSizes(Exception):
    """An image of another size turned up: the folder is not a set of small images."""


def _build(source, size, array_file, meta_file, progress, workers) -> dict:
    """Decode into ``array_file`` and write ``meta_file``; returns the meta. For mixed sizes
    only the meta ``{"small": false}`` is written, and no array (nothing half-written)."""
    try:
        kept, skipped = _decode_all(source, size, array_file, progress, workers)
    except _MixedSizes:
        meta = {"small": False}
    else:
        meta = {"small": True, "kept": kept.tolist(), "skipped": skipped, "size": size}
    write_text_atomic(meta_file, json.dumps(meta))
    return meta


def _decode_all(source, size, array_file, progress, workers) -> tuple[np.ndarray, list]:
    n = len(source)
    width, height = size
    ok = np.zeros(n, dtype=bool)
    skipped: list[tuple[str, str]] = []
    chunks = [(source.paths[i : i + _CHUNK], size, source.max_pixels) for i in range(0, n, _CHUNK)]
    workers = workers or os.cpu_count() or 1
    with atomic_path(array_file, suffix=".npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, height, width, 3))
        bar = tqdm(total=n, desc="decoding (once, then cached)", unit="img", disable=not progress)
        with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
            for start, (pixels, good, bad) in zip(range(0, n, _CHUNK), pool.map(_decode_chunk, *zip(*chunks))):
                if pixels is None:  # an image of another size: this is not a set of small images
                    pool.shutdown(cancel_futures=True)
                    bar.close()
                    raise _MixedSizes  # atomic_path removes the temporary array
                out[start : start + len(good)] = pixels
                ok[start : start + len(good)] = good
                skipped += bad
                bar.update(len(good))
        bar.close()
        kept = np.flatnonzero(ok)
        if len(kept) < n:  # the cached array holds only the readable images
            compact = np.ascontiguousarray(out[kept])
            del out
            np.save(tmp, compact)
        else:
            out.flush()
            del out
    return kept, skipped


def _decode_chunk(paths: list[str], size: tuple[int, int], max_pixels: int):
    width, height = size
    pixels = np.zeros((len(paths), height, width, 3), dtype=np.uint8)
    good = np.zeros(len(paths), dtype=bool)
    bad = []
    for i, path in enumerate(paths):
        try:
            img = load_rgb(path, max_pixels)
        except DecodeError as e:
            bad.append((path, str(e)))
            continue
        if img.size != size:
            return None, None, None
        pixels[i] = np.asarray(img)
        good[i] = True
    return pixels, good, bad
