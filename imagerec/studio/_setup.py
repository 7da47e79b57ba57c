"""The first run on a folder: labelled data brings its classes; unlabelled photos are clustered."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..checkpoint import BEST, LAST, RUN_PREFIX
from ..data import DEFAULT_MAX_PIXELS, load_images
from ..errors import ImagerecError
from ._db import Project


def import_data(project: Project, data: str, *, k: int | str | None = None, backbone: str = "auto",
                image_size: int | None = None, progress: bool = True) -> str:
    """Fill an empty project from ``data`` (nothing happens if it is filled already).

    Args:
        project: the project to fill.
        data: a folder of photos, class folders (``DIR/<class>/*``), a split root or a CSV manifest.
        k: clusters for unlabelled photos: a number, or ``"auto"``/None to choose it.
        backbone: the backbone that embeds photos for clustering (see ``imagerec cluster``).
        image_size: input side for that embedding (default: the backbone's).
        progress: show progress bars on the console.

    Returns:
        A line saying how the groups were made.

    Raises:
        ImagerecError: no images, images held in arrays rather than files, or bad ``k``.
    """
    if project.imported:
        return project.meta("how")
    source = load_images(data, max_pixels=DEFAULT_MAX_PIXELS)
    if any("#" in p and not os.path.isfile(p) for p in source.paths[:1]):
        raise ImagerecError(f"{data}: the images are held in arrays, not files; the studio needs image files (e.g. a folder of JPEGs)")
    paths = [os.path.abspath(p) for p in source.paths]
    if source.labelled:
        groups = [(name, "class") for name in source.classes]
        rows = [(p, int(label), float(n)) for n, (p, label) in enumerate(zip(paths, source.labels))]
        how = f"{len(paths):,} labelled images in {len(groups)} classes, from {data}"
    else:
        groups, rows, how = _clustered(project, source, paths, data, k, backbone, image_size, progress)
    if source.skipped:
        how += f"; {len(source.skipped)} file(s) skipped as unreadable"
    project.import_groups(str(data), groups, rows, how)
    return how


FEATURES_DIR = "features"  # the project's embeddings cache: the clustering fills it, the review reuses it


def features_backbone(project: Project, default: str, image_size: int | None) -> tuple[str, int | None]:
    """The backbone the studio embeds with, and its input size: the network of its latest finished
    training run at that run's own size (features that learn from the person's labels), else
    ``default`` at ``image_size`` (the studio's ``--backbone`` and ``--image-size``)."""
    for run in project.runs():  # newest first
        folder = Path(run["run_dir"] or "")
        if run["status"] == "done" and any((folder / name).is_file() for name in (BEST, LAST)):
            return RUN_PREFIX + str(folder.resolve()), None
    return default, image_size


def collection_features(folder: Path, source, backbone: str, image_size: int | None, progress: bool = True):
    """The raw embeddings of ``source``, cached by content in ``folder/features`` (a trained run's in
    ``folder/features/run-<run folder>``), so unchanged files are not embedded again."""
    from ..features import compute_features  # noqa: PLC0415 - torch only when embedding

    cache = Path(folder) / FEATURES_DIR
    if str(backbone).startswith(RUN_PREFIX):
        cache = cache / f"run-{Path(str(backbone)[len(RUN_PREFIX):]).name}"
    return compute_features(source, backbone=backbone, image_size=image_size, cache_dir=cache, pca_dim=None, progress=progress).embeddings


def _clustered(project, source, paths, data, k, backbone, image_size, progress):
    from ..clustering import cluster_images  # noqa: PLC0415 - torch only when clustering

    if len(paths) < 4:
        raise ImagerecError(f"{data}: {len(paths)} image(s) are too few to cluster; give at least 4, or class folders")
    k_value = "auto" if k in (None, "auto") else int(k)
    if k_value != "auto" and not 2 <= k_value <= len(paths) // 2:
        raise ImagerecError(f"k={k_value} must be between 2 and {len(paths) // 2} (half the {len(paths)} images), or 'auto'")
    k_range = (2, max(2, min(15, len(paths) // 4)))
    emb = collection_features(project.folder, source, backbone, image_size, progress)
    result = cluster_images(emb, "kmeans", k_value, k_range=k_range, random_state=0, progress=progress)
    labels = np.asarray(result.labels)
    order = sorted(set(labels.tolist()))
    index = {label: n for n, label in enumerate(order)}
    groups = [(f"cluster {n + 1:02d}", "cluster") for n in range(len(order))]
    by_path = {os.path.abspath(p): n for n, p in enumerate(result.paths)}
    rows = []
    for p in paths:
        n = by_path.get(p)
        if n is not None:
            distance = float(result.distances[n]) if np.isfinite(result.distances[n]) else 1e9
            rows.append((p, index[int(labels[n])], distance))
    how = f"{len(rows):,} photos clustered into {len(groups)} groups by k-means (k={'auto' if k_value == 'auto' else k_value}) from {data}"
    return groups, rows, how


def default_project(data: str) -> Path:
    """``<data>.studio`` beside a folder or manifest."""
    path = Path(data).expanduser().resolve()
    return path.with_name(path.name + ".studio")
