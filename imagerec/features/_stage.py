"""The feature stage: from data to prepared features, shared by cluster, audit and index.

1. choose the backbone and input size (``"auto"``: see :mod:`._backbone`);
2. optionally adapt the backbone to the images (SimCLR, :func:`adapt_backbone`);
3. embed, or reuse the run folder's cached rows of unchanged files (:mod:`._cache`);
4. check the features, then prepare them (L2, PCA, L2: :class:`FeaturePipeline`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from ..data import DEFAULT_MAX_PIXELS, ImageSource, load_images
from ..embedding import Embeddings
from ..errors import ImagerecError
from ._adapt import ADAPT_METHODS, adapt_backbone
from ._backbone import auto_backbone
from ._cache import is_embeddings_file, resolve_embeddings
from ._prepare import FeaturePipeline, check_pca_dim


@dataclass
class FeatureSet:
    """What the feature stage made of a collection.

    Attributes:
        embeddings: the raw embeddings (paths, labels, classes, backbone, skipped images).
        source: the images they came from, or None when embeddings were given.
        prepared: float32 array (N, d): the prepared features (row i is ``embeddings.paths[i]``).
        pipeline: the fitted preparation (``pipeline.transform`` prepares new features the same way).
        backbone: the model that embedded the images (the adapted one after ``adapt``), or its name.
        seconds: time spent per step (``adapt``, ``embed``, ``prepare``).
        adapt_info: how the backbone was adapted (method, its arguments, steps, seconds), or None.
    """

    embeddings: Embeddings
    source: ImageSource | None
    prepared: np.ndarray
    pipeline: FeaturePipeline
    backbone: str | nn.Module
    seconds: dict = field(default_factory=dict)
    adapt_info: dict | None = None


def compute_features(
    data,
    *,
    backbone: str | nn.Module = "auto",
    split: str | None = None,
    image_size: int | None = None,
    crop_pct: float | None = None,
    adapt: str | None = None,
    adapt_params: dict | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    tta: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    normalize: bool = True,
    pca_dim: int | str | None = None,
    whiten: bool = False,
    random_state: int | None = 0,
    progress: bool = True,
) -> FeatureSet:
    """Embed (or reuse) and prepare the features of a collection.

    Args:
        data: an :class:`~imagerec.Embeddings`, a ``.npz`` from ``imagerec embed``, an
            :class:`~imagerec.ImageSource`, or a data set spec (folder, CSV manifest, ``"cifar10"``).
        backbone: registry name or model; ``"auto"``: EfficientNet-Lite2 at 160 px for small
            images (CIFAR-like), else EfficientNet-Lite0 at 224 px.
        split: ``"train"``, ``"val"``, ``"test"`` or None (all images) of a data set spec.
        image_size: input side in pixels (default: the backbone's, or the small-image size).
        crop_pct: centre-crop share when embedding (default: the backbone's); 1.0: the whole image.
        adapt: ``"simclr"`` fine-tunes the backbone on the images first (no labels); None: as it is.
        adapt_params: arguments of :func:`adapt_backbone`, e.g. ``{"epochs": 8, "image_size": 64}``.
        cache_dir: run folder whose ``embeddings.npz`` is reused for unchanged files; None: no cache.
        batch_size: images per forward pass.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        tta: embed each image as the mean of it and its mirror image.
        max_pixels: decompression-bomb limit per image (embedding and adapting alike).
        normalize: L2-normalise the features (before and after PCA).
        pca_dim: principal components kept; ``"auto"``: by the number of images (32 below
            5,000, else 128: see :class:`FeaturePipeline`); None: no PCA.
        whiten: PCA whitening.
        random_state: seed of the adaptation and the PCA.
        progress: show progress bars.

    Returns:
        A :class:`FeatureSet`.

    Raises:
        ImagerecError: bad arguments (checked before any embedding), unreadable data, no readable
            image, or NaN or infinite features (naming the first such image).
    """
    # 1. validate before the costly steps
    check_pca_dim(pca_dim)
    if adapt is not None and adapt not in ADAPT_METHODS:
        raise ImagerecError(f"adapt={adapt!r} is not one of {ADAPT_METHODS}; use 'simclr' or leave it out")
    given = isinstance(data, (Embeddings, np.ndarray)) or is_embeddings_file(data)
    if adapt is not None and given:
        raise ImagerecError("adapt needs the images, not finished embeddings; pass the image folder as data")
    seconds, timer, adapt_info = {}, time.perf_counter(), None

    # 2. the backbone and input size, then the adaptation
    if not given and (adapt is not None or (isinstance(backbone, str) and backbone == "auto")):
        data = data if isinstance(data, ImageSource) else load_images(data, split, max_pixels=max_pixels)
    if isinstance(backbone, str) and backbone == "auto" and not given:
        backbone, image_size, data = auto_backbone(data, image_size)
    if adapt is not None:
        params = {"image_size": image_size, **dict(adapt_params or {})} if image_size else dict(adapt_params or {})
        backbone = adapt_backbone(data, backbone, method=adapt, device=device, seed=random_state or 0, progress=progress, **params)
        adapt_info = {"method": adapt, **params, **getattr(backbone, "adapt_info", {})}
        image_size = None  # embed at the size the backbone was adapted at
        seconds["adapt"] = time.perf_counter() - timer
        timer = time.perf_counter()

    # 3. embed, or reuse the cached rows of unchanged files
    emb, source = resolve_embeddings(
        data, backbone=backbone, cache_dir=cache_dir, split=split, image_size=image_size, crop_pct=crop_pct, batch_size=batch_size,
        device=device, tta=tta, max_pixels=max_pixels, progress=progress,
    )  # fmt: skip
    seconds["embed"] = time.perf_counter() - timer
    check_embeddings(emb)

    # 4. prepare
    timer = time.perf_counter()
    pipeline = FeaturePipeline(normalize, pca_dim, whiten, random_state)
    prepared = pipeline.fit_transform(emb.features)
    seconds["prepare"] = time.perf_counter() - timer
    return FeatureSet(emb, source, prepared, pipeline, backbone, seconds, adapt_info)


def check_embeddings(emb: Embeddings) -> None:
    """At least one row, and finite features, naming the first image that has none.

    Raises:
        ImagerecError: no rows, or NaN or infinite features.
    """
    features = np.asarray(emb.features)
    if len(features) == 0:
        raise ImagerecError("no image could be embedded; see the skipped list, and give readable images")
    if features.ndim == 2 and np.issubdtype(features.dtype, np.floating):
        bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
        if len(bad):
            raise ImagerecError(
                f"{len(bad)} image(s) have NaN or infinite features (first: {emb.paths[bad[0]]}); "
                "embed them again (imagerec embed) or remove them"
            )
