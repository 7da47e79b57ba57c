"""``imagerec label``: suggestions for a folder of images from a few labels in a CSV."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .._io import write_text_atomic
from ..data import DEFAULT_MAX_PIXELS, load_images
from ..errors import ImagerecError
from ..features import compute_features
from ._select import select_next
from ._suggest import Suggestions, suggest

COLUMNS = ("path", "label", "suggested", "confidence", "disagrees", "next")


def label_collection(
    data,
    labels: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    split: str | None = None,
    next_count: int = 20,
    backbone: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allow_outside: bool = False,
    progress: bool = True,
) -> tuple[Suggestions, np.ndarray]:
    """Suggest a class for every image of ``data`` from the labels in ``labels``, write a CSV.

    Args:
        data: the images (a folder, a split root, a CSV manifest), through the feature stage.
        split: one split of ``data`` (``"train"``, ``"val"``, ``"test"``), or None for every image.
        labels: a ``path,label`` CSV of the images decided so far (paths relative to the CSV, as
            every imagerec manifest); None: the labels ``data`` itself holds (class folders).
        out: the CSV to write: path, label, suggested, confidence, disagrees, next (the rank of
            the images to label next, 1 first; empty for the others).
        next_count: how many images to rank for labelling next.
        backbone: as for ``imagerec embed``; ``"auto"`` by the images.
        cache_dir: folder whose ``embeddings.npz`` the next run reuses (default: ``OUT.features``
            beside the CSV).
        max_pixels: decompression-bomb limit per image.
        allow_outside: read manifest rows that point outside the manifest's folder.
        progress: progress bars.

    Returns:
        (suggestions, indices of the images to label next).

    Raises:
        ImagerecError: an ``out`` that is a folder, a labels CSV naming images not in ``data``,
            no label at all (checked before any embedding).
    """
    out = Path(out)
    if out.is_dir():
        raise ImagerecError(f"--out {out} is a folder; give a .csv file to write")
    if not isinstance(next_count, int) or next_count < 0:
        raise ImagerecError(f"next_count={next_count!r} must be a whole number >= 0")
    source = load_images(data, split, max_pixels=max_pixels, allow_outside=allow_outside)
    decided = _decided(labels, allow_outside) if labels is not None else None
    if decided is not None:
        unknown = set(decided) - {os.path.realpath(p) for p in source.paths}
        if unknown:
            raise ImagerecError(
                f"{len(unknown)} image(s) of {labels} are not in {data} (first: {sorted(unknown)[0]}); "
                "label images of the collection, or add them to it"
            )
    elif source.labels is None:
        raise ImagerecError(f"{data} holds no labels; pass --labels LABELS.csv (path,label) with a few decided images")
    cache_dir = Path(cache_dir) if cache_dir is not None else out.with_name(out.name + ".features")
    fs = compute_features(source, backbone=backbone, cache_dir=cache_dir, max_pixels=max_pixels, progress=progress)
    emb = fs.embeddings
    if decided is not None:
        row_labels = [decided.get(os.path.realpath(p)) for p in emb.paths]
    else:
        row_labels = [emb.classes[i] for i in emb.labels]
    s = suggest(emb, row_labels)
    picks = select_next(s.features, s.labels, next_count, proba=s.proba) if next_count else np.zeros(0, np.int64)
    frame = s.frame
    rank = np.full(len(frame), "", object)
    rank[picks] = [str(i + 1) for i in range(len(picks))]
    frame["next"] = rank
    frame["label"] = frame["label"].fillna("")
    frame["confidence"] = frame["confidence"].round(4)
    write_text_atomic(out, frame.to_csv(index=False, columns=list(COLUMNS)))
    return s, picks


def _decided(labels: str | os.PathLike, allow_outside: bool) -> dict[str, str]:
    """Real path -> label of every row of the labels CSV."""
    if not Path(labels).is_file():
        raise ImagerecError(f"--labels {labels}: no such file; give a path,label CSV of the images decided so far")
    decided = load_images(labels, allow_outside=allow_outside)
    if decided.labels is None or not len(decided):
        raise ImagerecError(f"--labels {labels} holds no labelled row; write path,label rows (a header is optional)")
    return {os.path.realpath(p): decided.classes[i] for p, i in zip(decided.paths, decided.labels)}
