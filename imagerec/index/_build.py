"""Build an index of a collection, and add new images to it without embedding the old ones again."""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._decode import display_path
from .._identity import changed_files
from .._lock import run_lock
from ..backbones import list_backbones
from ..checkpoint import RUN_PREFIX, run_feature_model
from ..clustering._features import auto_backbone
from ..data import DEFAULT_MAX_PIXELS, ImageSource, load_images
from ..embedding import Embeddings, embed
from ..errors import ImagerecError
from . import _ondisk, _store
from ._search import SearchIndex, load_index
from ._shard import merge_parts, scan_parts


def choose_backbone(source: ImageSource, backbone: str, image_size: int | None) -> tuple[str, int | None, ImageSource]:
    """The backbone and input size to embed ``source`` with: the one place that decides it.

    ``"auto"`` follows clustering's rule (EfficientNet-Lite2 at 160 px for small images such as
    CIFAR's, Lite0 at 224 px for photos). When the shared feature stage lands, this function
    becomes a call to it.

    Returns:
        (backbone name, image size or None for the backbone's own, source to embed).
    """
    if backbone == "auto":
        return auto_backbone(source, image_size)
    return backbone, image_size, source


def check_backbone(name: str) -> None:
    """Refuse a backbone whose features a later query could not reproduce.

    Raises:
        ImagerecError: ``name`` is neither a registry backbone with pretrained weights nor a
            trained run whose checkpoint is still the one the features were made with.
    """
    if name.startswith(RUN_PREFIX):
        run_feature_model(name[len(RUN_PREFIX):])  # raises when the run is gone or its weights changed
        return
    usable = list_backbones(pretrained=True)
    if name not in usable:
        raise ImagerecError(
            f"backbone {name!r} cannot index: queries must be embedded by the same weights later, so it must be "
            f"a registry backbone with pretrained weights (without test-time augmentation): one of {', '.join(usable)}, or --features RUN"
        )


def build_index(
    data,
    out: str | os.PathLike,
    *,
    backbone: str = "auto",
    image_size: int | None = None,
    split: str | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    engine: str = "auto",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allow_outside: bool = False,
    exact_max: int = _store.EXACT_MAX,
    transform: str = "auto",
    pq_bytes: int | None = None,
    progress: bool = True,
) -> SearchIndex:
    """Embed a collection and write a searchable index of it to ``out``.

    Args:
        data: a data set spec for :func:`~imagerec.load_images` (folder, split root, CSV, ``cifar10``),
            an :class:`~imagerec.ImageSource`, finished :class:`~imagerec.Embeddings` or their
            ``.npz`` file, or a list of ``.npz`` part files from ``imagerec embed --shard I/N``.
        out: the index folder (created; an index already there is replaced).
        backbone: registry name, or ``"auto"`` (see :func:`choose_backbone`); ignored for embeddings.
        image_size: input side in pixels (default: the backbone's).
        split: one split of a data set spec, or None for all images.
        batch_size: images per forward pass.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        engine: ``"auto"``, ``"torch"`` or ``"onnx"`` (see :func:`~imagerec.embed`).
        max_pixels: decompression-bomb limit per image.
        allow_outside: read CSV manifest rows whose paths lead outside the manifest's folder.
        exact_max: the largest count searched exactly (``IndexFlatIP``, in RAM); above it an IVF-PQ
            index with its inverted lists and vectors on disk (:mod:`imagerec.index._ondisk`), built
            from the parts one at a time without holding them all.
        transform: for IVF-PQ: ``"auto"`` (PCA to 256 dims when wider), ``"pca"``, ``"opq"``, ``"none"``.
        pq_bytes: for IVF-PQ: bytes per code (default: one per 8 dims after the transform).
        progress: show a progress bar while embedding.

    Returns:
        The new :class:`SearchIndex`.

    Raises:
        ImagerecError: bad arguments or data, or a backbone queries could not reproduce.
    """
    if exact_max < 1:
        raise ImagerecError(f"exact_max={exact_max} must be at least 1; the default is {_store.EXACT_MAX:,}")
    check_out(out)
    if pq_bytes is not None and pq_bytes < 1:
        raise ImagerecError(f"pq_bytes={pq_bytes} must be at least 1; leave it out for one byte per 8 dims")
    _ondisk.factory_for(256, 1, transform)  # an unknown transform fails before any work
    if isinstance(data, (list, tuple)):
        rows, dim, name, pp = scan_parts(list(data))
        check_backbone(name)
        if rows > exact_max:  # streamed from the parts: never all in memory
            meta = {"backbone": name, "preprocessing": pp.to_dict(), "exact_max": exact_max}
            blocks = _part_blocks(list(data))
            return _build_ondisk(out, blocks, dim, meta, transform, pq_bytes, progress)
    embeddings = _embeddings(data, backbone, image_size, split, batch_size, device, engine, max_pixels, progress, allow_outside)
    check_backbone(embeddings.backbone)
    if not len(embeddings):
        raise ImagerecError(f"{data}: holds no images, so there is nothing to index; give embeddings or images of at least one image")
    if len(embeddings) > exact_max:
        meta = {"backbone": embeddings.backbone, "preprocessing": embeddings.preprocessing.to_dict(), "exact_max": exact_max}
        blocks = _embedding_blocks(embeddings)
        return _build_ondisk(out, blocks, embeddings.features.shape[1], meta, transform, pq_bytes, progress, len(embeddings.skipped))
    items = _store.Items.from_embeddings(embeddings.paths, embeddings.labels, embeddings.classes)
    _refuse_repeats(items.paths)
    index, kind = _store.make_faiss(_store.l2_normalize(embeddings.features), exact_max)
    meta = {"backbone": embeddings.backbone, "preprocessing": embeddings.preprocessing.to_dict(), "exact_max": exact_max, **kind}
    with run_lock(out, "index"):
        meta = _store.write(out, index, items, meta)
    return SearchIndex(Path(out), meta, index, items, skipped=len(embeddings.skipped))


INDEX_FILES = re.compile(  # an index's own files, of every kind (the on-disk kind's vectors, lists and blocks too), and their temporaries
    r"meta\.json|\.lock|(index|items)-[0-9]+\.(faiss|csv)|items-[0-9]+\.offsets|vectors-[0-9]+\.f16|trained-[0-9]+\.faiss"
    r"|lists-[0-9]+\.ivfdata|blocks-[0-9]+|\..*\.tmp.*"
)


def check_out(out: str | os.PathLike) -> None:
    """The index folder, checked before any work: new, empty, or an index (damaged ones included:
    rebuilding is their fix), in a place that can be written.

    Raises:
        ImagerecError: a file, a folder holding other files, or a place that cannot be written.
    """
    out = Path(out)
    shown = display_path(out)
    if out.exists() and not out.is_dir():
        raise ImagerecError(f"{shown}: is a file; give --out a folder name for the index (e.g. {display_path(out.stem)}_index)")
    if out.is_dir():
        other = sorted(p.name for p in out.iterdir() if not INDEX_FILES.fullmatch(p.name))
        if other:
            raise ImagerecError(
                f"{shown}: holds files that are not an index's ({display_path(other[0])}{' and more' if len(other) > 1 else ''}); "
                f"give --out a new or empty folder (e.g. {display_path(out.name)}_index) so that nothing of yours is replaced"
            )
    folder = out
    while not folder.exists() and folder != folder.parent:  # the first folder that exists
        folder = folder.parent
    if not folder.is_dir():
        raise ImagerecError(f"{shown}: {display_path(folder)} is a file, not a folder; pick another --out")
    longest = max(out.parts[len(folder.parts) :] or ("",), key=lambda part: len(os.fsencode(part)))
    if len(os.fsencode(longest)) > os.pathconf(folder, "PC_NAME_MAX"):
        raise ImagerecError(
            f"{shown}: a name of {len(os.fsencode(longest))} bytes is longer than this file system allows "
            f"({os.pathconf(folder, 'PC_NAME_MAX')}); pick a shorter --out"
        )
    try:  # the one sure test (permissions, read-only file systems, quotas): write a file there
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ImagerecError(f"{shown}: cannot write in {display_path(folder)} ({e.strerror}); pick another --out") from None


def _build_ondisk(out, blocks, dim, meta, transform, pq_bytes, progress, skipped: int = 0) -> SearchIndex:
    with run_lock(out, "index"):
        meta = _ondisk.build(Path(out), blocks, dim, meta, transform=transform, pq_bytes=pq_bytes, progress=progress)
    index = load_index(out)
    index.skipped = skipped
    return index


def _label_names(e: Embeddings, rows=slice(None)) -> list[str] | None:
    return None if e.labels is None else [e.classes[int(i)] for i in e.labels[rows]]


def _embedding_blocks(e: Embeddings, identities: list[str] | None = None):
    """(features, absolute paths, label names, identities) of ``e`` a block at a time."""
    for s in range(0, len(e), _ondisk.BLOCK_ROWS):
        rows = slice(s, s + _ondisk.BLOCK_ROWS)
        ids = None if identities is None else identities[rows]
        yield e.features[rows], [os.path.abspath(p) for p in e.paths[rows]], _label_names(e, rows), ids


def _part_blocks(parts: list):
    """The blocks of every part, one part in memory at a time."""
    for part in parts:
        yield from _embedding_blocks(Embeddings.load(part))


def _embeddings(data, backbone, image_size, split, batch_size, device, engine, max_pixels, progress, allow_outside) -> Embeddings:
    if isinstance(data, Embeddings):
        return data
    if isinstance(data, (list, tuple)):
        return merge_parts(list(data))
    if not isinstance(data, ImageSource) and str(data).lower().endswith(".npz"):
        return Embeddings.load(data)
    source = data if isinstance(data, ImageSource) else load_images(data, split, max_pixels=max_pixels, allow_outside=allow_outside)
    if backbone != "auto":
        check_backbone(backbone)  # before any decoding
    name, size, source = choose_backbone(source, backbone, image_size)
    return embed(
        source, name, image_size=size, batch_size=batch_size, device=device, engine=engine, max_pixels=max_pixels, progress=progress
    )


def _refuse_repeats(paths: list[str]) -> None:
    seen = set()
    for p in paths:
        if p in seen:
            raise ImagerecError(f"{p} is listed twice; an index holds each image once: remove the repeat from the data")
        seen.add(p)


@dataclass
class AddResult:
    """What :func:`add_to_index` did.

    Attributes:
        index: the index after the addition.
        added: images embedded and added.
        already: images of ``data`` already in the index, unchanged (neither embedded nor added).
        skipped: unreadable images left out.
    """

    index: SearchIndex
    added: int
    already: int
    skipped: int


def add_to_index(
    index_dir: str | os.PathLike,
    data,
    *,
    split: str | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    engine: str = "auto",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allow_outside: bool = False,
    progress: bool = True,
) -> AddResult:
    """Append ``data``'s new images to an index, embedding only them, with the index's own model.

    Images already in the index (same absolute path, same content) are left as they are. An
    indexed image whose file has changed since is an error: the index cannot hold two versions.
    A flat index that grows past its ``exact_max`` becomes the on-disk IVF-PQ kind from its stored
    vectors (no re-embedding); an on-disk index gets one more block of codes and its lists merged again.

    Args:
        index_dir: a folder written by :func:`build_index`.
        data: a data set spec, an :class:`~imagerec.ImageSource`, or embeddings (object or
            ``.npz``) made with the index's backbone and preprocessing.
        split, batch_size, device, engine, max_pixels, allow_outside, progress: as for :func:`build_index`.

    Returns:
        An :class:`AddResult`.

    Raises:
        ImagerecError: not an index, another backbone, changed files, or unreadable data.
    """
    _store.read_meta(index_dir)  # not an index: refused before the lock creates the folder
    with run_lock(index_dir, "index"):
        current = load_index(index_dir)
        pp = current.preprocessing
        if isinstance(data, Embeddings) or (not isinstance(data, ImageSource) and str(data).lower().endswith(".npz")):
            new = data if isinstance(data, Embeddings) else Embeddings.load(data)
            current.check_compatible(new.backbone, new.preprocessing, f"{data}", new.features.shape[1])
            keep, already = _new_images(current, [os.path.abspath(p) for p in new.paths])
            new = _take(new, keep)
        else:
            source = data if isinstance(data, ImageSource) else load_images(data, split, max_pixels=max_pixels, allow_outside=allow_outside)
            keep, already = _new_images(current, [os.path.abspath(p) for p in source.paths])
            if not keep.size:
                return AddResult(current, 0, already, len(source.skipped))
            new = embed(
                source.subset(keep), current.backbone, image_size=pp.input_size, crop_pct=pp.crop_pct,
                batch_size=batch_size, device=device, engine=engine, max_pixels=max_pixels, progress=progress,
            )  # fmt: skip
            current.check_compatible(new.backbone, new.preprocessing, f"{data}", new.features.shape[1])
        if not len(new):
            return AddResult(current, 0, already, len(new.skipped))
        if current.kind == "ivfpq" or (current.kind == "flat" and len(current) + len(new) > current.meta["exact_max"]):
            _add_ondisk(current, new)
            return AddResult(load_index(index_dir), len(new), already, len(new.skipped))
        items = current.items + _store.Items.from_embeddings(new.paths, new.labels, new.classes)
        _refuse_repeats(items.paths)
        index, kind = _grown(current, _store.l2_normalize(new.features))
        meta = _store.write(index_dir, index, items, {**current.meta, **kind})
        return AddResult(SearchIndex(Path(index_dir), meta, index, items), len(new), already, len(new.skipped))


def _add_ondisk(current: SearchIndex, new: Embeddings) -> None:
    """``new`` into an on-disk index, or a flat one rebuilt on disk from its own vectors plus ``new``."""
    folder = current.folder
    if current.kind == "ivfpq":
        known = _ondisk.indexed_hashes(folder, current.meta)
        _ondisk.add(folder, current.meta, _embedding_blocks(new), known)
        return
    old = Embeddings(_store.all_vectors(current.faiss_index), current.items.paths, None, None, current.backbone, current.preprocessing)
    labels = current.items.labels
    blocks = [(old.features, old.paths, labels, current.items.identities), *_embedding_blocks(new)]
    if labels is not None or new.labels is not None:  # one side unlabelled: its rows get ""
        blocks = [(f, p, lab if lab is not None else [""] * len(p), *rest) for f, p, lab, *rest in blocks]
    meta = {key: current.meta[key] for key in ("backbone", "preprocessing", "exact_max")}
    _ondisk.build(folder, iter(blocks), old.features.shape[1], meta, progress=False)


def _new_images(current: SearchIndex, paths: list[str]) -> tuple[np.ndarray, int]:
    """Positions of the paths not yet indexed, and how many are; refuses indexed files that changed."""
    if current.kind == "ivfpq":  # the items stay on disk: look the paths up by hash
        hashes = _ondisk.path_hashes(paths)
        indexed_hashes = _ondisk.indexed_hashes(current.folder, current.meta)
        order = np.argsort(indexed_hashes)
        at = np.searchsorted(indexed_hashes, hashes, sorter=order).clip(0, max(len(order) - 1, 0))
        hit = (indexed_hashes[order[at]] == hashes) if len(order) else np.zeros(len(paths), bool)
        rows = current.items.rows(order[at[hit]].tolist())
        known = {r[0]: r[2] for r in rows}
    else:
        known = dict(zip(current.items.paths, current.items.identities))
    indexed = [p for p in paths if p in known]
    changed = changed_files(known, indexed)
    if changed:
        raise ImagerecError(
            f"{len(changed)} indexed image(s) changed content since they were indexed (e.g. {changed[0]}); "
            f"the index would hold stale vectors for them: rebuild it with 'imagerec index DATA --out {current.folder}' (without --add)"
        )
    return np.asarray([i for i, p in enumerate(paths) if p not in known], dtype=np.int64), len(indexed)


def _take(e: Embeddings, keep: np.ndarray) -> Embeddings:
    return Embeddings(
        features=e.features[keep],
        paths=[e.paths[i] for i in keep],
        labels=None if e.labels is None else e.labels[keep],
        classes=e.classes,
        backbone=e.backbone,
        preprocessing=e.preprocessing,
    )


def _grown(current: SearchIndex, vectors: np.ndarray):
    """The in-memory index (flat within exact_max, or an IVF one of an older version) with ``vectors`` added."""
    meta = current.meta
    index = current.faiss_index
    index.add(vectors)
    return index, {key: meta[key] for key in ("kind", "faiss_index", "nlist", "nprobe") if key in meta}
