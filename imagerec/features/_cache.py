"""Embeddings given, read, reused from a run folder, or computed: one cache for every command.

A run folder holds ``embeddings.npz`` and beside it ``embeddings.identity.json``: a digest of the
model's weights, the input size, and for every embedded image its :func:`~imagerec._identity.file_identity`
(size, mtime_ns, inode, ctime_ns and, for small files, a hash of the bytes). A later run with the
same weights and size reuses the rows whose files are unchanged and embeds only the new or
changed images, saying how many ("re-embedding 12 changed images"). A file replaced under the
same name, even with its size and modification time copied over, is seen as changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._identity import file_identity
from .._io import write_text_atomic
from ..checkpoint import feature_model
from ..data import SMALL_IMAGE_MAX_SIDE, DEFAULT_MAX_PIXELS, DecodeError, ImageSource, Skipped, load_images, load_rgb
from ..embedding import Embeddings, embed
from ..errors import ImagerecError
from ._backbone import FlipAveraged

EMBEDDINGS_FILE = "embeddings.npz"  # the cache inside a run folder
IDENTITY_FILE = "embeddings.identity.json"  # what each cached row was computed from
_FORMAT = 1  # bump when the record's meaning changes


def resolve_embeddings(
    data,
    *,
    backbone: str | nn.Module = "efficientnet_lite0",
    cache_dir: str | os.PathLike | None = None,
    split: str | None = None,
    image_size: int | None = None,
    crop_pct: float | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    tta: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> tuple[Embeddings, ImageSource | None]:
    """The embeddings of ``data``, computed only for images not given or cached unchanged.

    Args:
        data: an :class:`Embeddings`, a ``.npz`` file from ``imagerec embed``, an
            :class:`ImageSource`, or a data set spec for :func:`~imagerec.load_images`.
        backbone: registry name or model, when the images must be embedded.
        cache_dir: run folder for ``embeddings.npz`` (resumable while it is written; its rows are
            reused when a model with the same weights, at the same size, embedded the same file content).
        split: ``"train"``, ``"val"``, ``"test"`` or None, for a data set spec.
        image_size: input side in pixels (default: the backbone's).
        crop_pct: centre-crop share (default: the backbone's; see :func:`~imagerec.embed`); 1.0
            embeds the whole image.
        batch_size: images per forward pass.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        tta: embed each image as the mean of it and its mirror image.
        max_pixels: decompression-bomb limit per image.
        progress: show a progress bar.

    Returns:
        (embeddings, source): the source is None when the embeddings were given.

    Raises:
        ImagerecError: unreadable data or embeddings file.
    """
    if isinstance(data, Embeddings) or is_embeddings_file(data):
        check_finished(data, tta=tta, image_size=image_size, crop_pct=crop_pct)
        return (data if isinstance(data, Embeddings) else Embeddings.load(data)), None
    if isinstance(data, np.ndarray):
        raise ImagerecError(
            "data is a bare array: wrap it as Embeddings(features, paths, ...) so clusters can name their "
            "images, or fit an estimator of imagerec.clustering (KMeans, DBSCAN, ...) on it directly"
        )
    source = data if isinstance(data, ImageSource) else load_images(data, split, max_pixels=max_pixels)
    model = feature_model(backbone)
    if tta:
        model = FlipAveraged(model)
    options = dict(image_size=image_size, crop_pct=crop_pct, batch_size=batch_size, device=device, max_pixels=max_pixels, progress=progress)
    if cache_dir is None:
        return embed(source, model, **options), source
    cache = Path(cache_dir) / EMBEDDINGS_FILE
    key = _key(model, image_size, crop_pct, max_pixels)
    identities = {p: _identity(p) for p in source.paths}
    old = _read_cache(cache, key)
    if old is None:
        if cache.is_file():
            _say(f"re-embedding all {len(source):,} images: {cache} was made otherwise (or has no record of its files)")
        result = embed(source, model, out=cache, **options)
    else:
        result = _update(old, source, identities, model, options, cache)
    skipped = {s.path: [identities[s.path], s.reason] for s in result.skipped if s.path in identities}
    record = {"format": _FORMAT, "key": key, "files": {p: identities[p] for p in result.paths}, "skipped": skipped}
    write_text_atomic(Path(cache_dir) / IDENTITY_FILE, json.dumps(record))
    return result, source


def check_finished(data, *, tta: bool = False, image_size: int | None = None, crop_pct: float | None = None) -> None:
    """Refuse embedding options for embeddings already made (an object or an ``.npz``).

    Raises:
        ImagerecError: ``tta``, ``image_size`` or ``crop_pct`` given with finished embeddings.
    """
    if tta or image_size or crop_pct:
        what = data if is_embeddings_file(data) else "data"
        raise ImagerecError(f"{what}: holds finished embeddings; tta and image_size apply only when images are embedded")


def is_embeddings_file(data) -> bool:
    """Whether ``data`` names an ``.npz`` file of embeddings rather than images."""
    return not isinstance(data, (ImageSource, Embeddings, np.ndarray)) and str(data).lower().endswith(".npz")


def _key(model: nn.Module, image_size: int | None, crop_pct: float | None, max_pixels: int) -> str:
    """What the features depend on besides the files: the weights themselves (a backbone without
    pretrained weights is random at each creation; an adapted one is new), the size, the limit."""
    size = image_size or model.preprocessing.input_size
    digest = hashlib.sha256(json.dumps([getattr(model, "backbone_name", type(model).__name__), int(size), crop_pct, int(max_pixels)]).encode())
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _identity(path: str) -> str:
    """A file's identity; rows of an array file (``FILE#ROW``) take the array file's."""
    if "#" in path and not os.path.exists(path):
        return file_identity(path.rsplit("#", 1)[0]) + "#" + path.rsplit("#", 1)[1]
    return file_identity(path)


def _read_cache(cache: Path, key: str) -> tuple[Embeddings, dict, dict] | None:
    """The cached embeddings, the identity of each row's file, and the files found unreadable
    (path -> [identity, reason]), when made with ``key``."""
    record_file = cache.parent / IDENTITY_FILE
    if not (cache.is_file() and record_file.is_file()):
        return None
    try:
        record = json.loads(record_file.read_text())
        if record.get("format") != _FORMAT or record.get("key") != key:
            return None
        cached = Embeddings.load(cache)
    except (OSError, ValueError, ImagerecError):
        return None
    files = record.get("files", {})
    if any(p not in files for p in cached.paths):
        return None
    return cached, files, record.get("skipped", {})


def _update(old, source: ImageSource, identities: dict, model, options: dict, cache: Path) -> Embeddings:
    """The cached rows of unchanged files, plus the new or changed images embedded now."""
    cached, files, unreadable = old
    row = {p: i for i, p in enumerate(cached.paths)}
    reuse = [i for i, p in enumerate(source.paths) if p in row and files[p] == identities[p]]
    still_bad = [i for i, p in enumerate(source.paths) if p in unreadable and unreadable[p][0] == identities[p]]
    todo = np.setdiff1d(np.arange(len(source)), np.asarray(reuse + still_bad, dtype=np.int64))
    changed = sum(1 for i in todo if source.paths[i] in row or source.paths[i] in unreadable)
    known_bad = [Skipped(source.paths[i], unreadable[source.paths[i]][1]) for i in still_bad]
    if len(todo) == 0:
        return _relabel(cached, source, known_bad)
    if len(todo):
        what = f"{changed:,} changed" + (f" and {len(todo) - changed:,} new" if len(todo) > changed else "")
        _say(f"re-embedding {what} images ({len(reuse):,} reused from {cache})")
    fresh = None
    if len(todo):
        subset = _fresh_subset(source, todo)
        if len(subset):
            fresh = embed(subset, model, **options)
        else:  # every new or changed file is unreadable: nothing to embed, all of them skipped
            known_bad += subset.skipped[len(source.skipped) :]
    got = {p: cached.features[row[p]] for p in (source.paths[i] for i in reuse)}
    if fresh is not None:
        got.update(zip(fresh.paths, fresh.features))
    kept = [i for i, p in enumerate(source.paths) if p in got]
    result = Embeddings(
        features=np.stack([got[source.paths[i]] for i in kept]).astype(np.float32),
        paths=[source.paths[i] for i in kept],
        labels=None if source.labels is None else source.labels[kept],
        classes=source.classes,
        backbone=cached.backbone,
        preprocessing=cached.preprocessing,
        skipped=list(source.skipped) + known_bad + (fresh.skipped[len(source.skipped):] if fresh is not None else []),
    )
    result.save(cache)
    return result


def _fresh_subset(source: ImageSource, todo: np.ndarray) -> ImageSource:
    """The images at ``todo`` read from their files now, never from a decode cache: a cache keyed
    on size and mtime would serve a replaced file's old pixels. Small images of one size come
    back decoded (as the decode cache would give them); others stay file-backed."""
    subset = replace(source.subset(todo), pixels=None)
    if any("#" in p and not os.path.exists(p) for p in subset.paths):
        return source.subset(todo)  # rows of an array file: the array is the content
    arrays, kept, skipped = [], [], []
    for i, path in enumerate(subset.paths):
        try:
            image = load_rgb(path, source.max_pixels)
        except DecodeError as e:
            skipped.append(Skipped(path, str(e)))
            continue
        if max(image.size) > SMALL_IMAGE_MAX_SIDE or (arrays and image.size != arrays[0].shape[1::-1]):
            return subset  # large or mixed sizes: embed reads the files themselves
        arrays.append(np.asarray(image))
        kept.append(i)
    fresh = subset.subset(kept)
    fresh.skipped = list(source.skipped) + skipped
    fresh.pixels = np.stack(arrays) if arrays else None
    return fresh


def _relabel(cached: Embeddings, source: ImageSource, known_bad: list[Skipped]) -> Embeddings:
    """The cached rows in the source's order, with the source's current labels."""
    row = {p: i for i, p in enumerate(cached.paths)}
    kept = [i for i, p in enumerate(source.paths) if p in row]
    cached.features = cached.features[[row[source.paths[i]] for i in kept]]
    cached.paths = [source.paths[i] for i in kept]
    cached.labels = None if source.labels is None else source.labels[kept]
    cached.classes = source.classes
    cached.skipped = list(source.skipped) + known_bad
    return cached


def _say(message: str) -> None:
    print(f"imagerec: {message}", file=sys.stderr)
