"""Features for clustering: where they come from, and how they are prepared.

Embeddings come from an :class:`~imagerec.Embeddings` object, from a ``.npz`` file written by
``imagerec embed``, or are computed with :func:`~imagerec.embed` and cached in the run folder
(resumable: a killed run continues; a finished one is reused by the next run with the same
images and backbone). Preparation is L2 normalisation, then optionally PCA (whitened or not),
then L2 normalisation again, so Euclidean distances between prepared features follow cosine
similarity.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.decomposition import PCA
from sklearn.utils.validation import check_is_fitted
from torch import nn

from ..backbones import create_backbone
from ..data import DEFAULT_MAX_PIXELS, ImageSource, decode_small_images, load_images
from ..embedding import Embeddings, embed
from ..errors import ImagerecError
from ._checks import all_identical, check_features, check_positive

EMBEDDINGS_FILE = "embeddings.npz"  # the cache inside a run folder


def l2_normalize(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero).

    Args:
        features: float array (N, D).

    Returns:
        float array (N, D), a new array.
    """
    norms = np.sqrt(np.einsum("ij,ij->i", features, features))[:, None]
    return features / np.maximum(norms, np.finfo(features.dtype).tiny)


class FeaturePipeline(TransformerMixin, BaseEstimator):
    """L2 normalisation, then PCA to ``pca_dim`` (optionally whitened), then L2 again.

    Fit it once on a collection; ``transform`` prepares new images' features the same way (for
    ``predict`` of k-means or the deep head).

    Args:
        normalize: L2-normalise before PCA and after it.
        pca_dim: keep this many principal components (capped at min(N, D)); None: no PCA
            (nor when every row is the same: there are no components).
        whiten: scale each component to unit variance (PCA whitening).
        random_state: seed of the randomised SVD.

    Attributes:
        pca_: the fitted ``sklearn.decomposition.PCA``, or None.
        n_features_in_: D.
        n_features_out_: the prepared dimension.
    """

    def __init__(
        self, normalize: bool = True, pca_dim: int | None = None, whiten: bool = False, random_state: int | None = 0
    ):
        self.normalize = normalize
        self.pca_dim = pca_dim
        self.whiten = whiten
        self.random_state = random_state

    def fit(self, X, y=None):
        """Learn the PCA of ``X`` (float array (N, D)); returns self.

        Raises:
            ImagerecError: NaN or infinite features, or a bad ``pca_dim``.
        """
        X = check_features(X)
        if self.pca_dim is not None:
            check_positive(
                self.pca_dim, "pca_dim", integer=True, minimum=1, inclusive=True, hint="; try 128, or None for no PCA"
            )
        self.n_features_in_ = X.shape[1]
        self.pca_ = None
        if self.pca_dim is not None and (self.pca_dim < X.shape[1] or self.whiten) and not all_identical(X):
            x = l2_normalize(X) if self.normalize else X
            n_components = min(int(self.pca_dim), len(X), X.shape[1])
            self.pca_ = PCA(n_components, random_state=self.random_state).fit(x)
        self.n_features_out_ = self.pca_.n_components_ if self.pca_ is not None else X.shape[1]
        return self

    def transform(self, X) -> np.ndarray:
        """Prepare features.

        Args:
            X: float array (M, D).

        Returns:
            float32 array (M, n_features_out_).

        Raises:
            ImagerecError: NaN or infinite features, or a dimension other than the fitted one.
        """
        check_is_fitted(self, "n_features_out_")
        X = check_features(X)
        if X.shape[1] != self.n_features_in_:
            raise ImagerecError(
                f"X has {X.shape[1]} features but the pipeline was fitted on {self.n_features_in_}; use the same backbone"
            )
        x = l2_normalize(X) if self.normalize else X
        if self.pca_ is not None:
            x = (x - self.pca_.mean_) @ self.pca_.components_.T
            if self.whiten:
                variance = self.pca_.explained_variance_
                x = x / np.sqrt(np.maximum(variance, 1e-6 * variance.max() + 1e-12))  # near-0 components not blown up
            if self.normalize:
                x = l2_normalize(x)
        return np.ascontiguousarray(x, dtype=np.float32)


def prepare_features(
    features, *, normalize: bool = True, pca_dim: int | None = None, whiten: bool = False, random_state: int | None = 0
) -> np.ndarray:
    """``FeaturePipeline(...).fit_transform(features)``: see :class:`FeaturePipeline`.

    Args:
        features: float array (N, D).
        normalize: L2-normalise (before and after PCA).
        pca_dim: principal components to keep, or None.
        whiten: PCA whitening.
        random_state: seed.

    Returns:
        float32 array (N, min(pca_dim, N, D)) or (N, D) without PCA.

    Raises:
        ImagerecError: NaN or infinite features, a bad ``pca_dim``.
    """
    return FeaturePipeline(normalize, pca_dim, whiten, random_state).fit_transform(features)


class FlipAveraged(nn.Module):
    """A backbone whose embedding is the mean of an image's and its mirror image's
    (test-time augmentation of the embeddings). Keeps the model contract ``embed`` needs."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.preprocessing = backbone.preprocessing
        self.backbone_name = f"{getattr(backbone, 'backbone_name', type(backbone).__name__)}+flip"
        self.num_features = getattr(backbone, "num_features", None)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return images  # both views are run in forward_head

    def forward_head(self, images: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        b = self.backbone
        pooled = b.forward_head(b.forward_features(images), pre_logits=True)
        mirrored = b.forward_head(b.forward_features(images.flip(-1)), pre_logits=True)
        return (pooled + mirrored) / 2


AUTO_SMALL_IMAGES = ("efficientnet_lite2", 160)  # CIFAR-10 test, k-means ACC: see docs/BENCHMARKS.md
AUTO_PHOTOS = "efficientnet_lite0"


def auto_backbone(source: ImageSource, image_size: int | None) -> tuple[str, int | None, ImageSource]:
    """The backbone and input size that ``backbone="auto"`` means for ``source``, and the source
    to embed (decoded into the cache when its images are small, so embedding does not look again).

    Small images (all of one size, at most ``SMALL_IMAGE_MAX_SIDE`` pixels a side, like CIFAR's)
    carry little detail for ImageNet features: EfficientNet-Lite2 at 160 px clustered CIFAR-10
    best of the Lite0/Lite2 sizes measured. Photos get EfficientNet-Lite0 at its own size
    (224 px), the cheapest backbone whose features are strong there.
    """
    small = decode_small_images(source, progress=False)
    if small is not None:
        name, size = AUTO_SMALL_IMAGES
        return name, image_size or size, small
    return AUTO_PHOTOS, image_size, source


def resolve_embeddings(
    data,
    *,
    backbone: str | nn.Module = "efficientnet_lite0",
    cache_dir: str | os.PathLike | None = None,
    split: str | None = None,
    image_size: int | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    tta: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> tuple[Embeddings, ImageSource | None]:
    """The embeddings of ``data``, computed only when they are not given or cached.

    Args:
        data: an :class:`Embeddings`, a ``.npz`` file from ``imagerec embed``, an
            :class:`ImageSource`, or a data set spec for :func:`~imagerec.load_images`.
        backbone: registry name or model, when the images must be embedded.
        cache_dir: folder for ``embeddings.npz`` (resumable, and reused when it holds the same
            images from the same registry backbone at the same size).
        split: ``"train"``, ``"val"``, ``"test"`` or None, for a data set spec.
        image_size: input side in pixels (default: the backbone's).
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
    if isinstance(data, Embeddings):
        return data, None
    if isinstance(data, np.ndarray):
        raise ImagerecError(
            "data is a bare array: wrap it as Embeddings(features, paths, ...) so clusters can name their "
            "images, or fit an estimator of imagerec.clustering (KMeans, DBSCAN, ...) on it directly"
        )
    if not isinstance(data, ImageSource) and str(data).lower().endswith(".npz"):
        if tta or image_size:
            raise ImagerecError(
                f"{data}: holds finished embeddings; tta and image_size apply only when images are embedded"
            )
        return Embeddings.load(data), None
    source = data if isinstance(data, ImageSource) else load_images(data, split, max_pixels=max_pixels)
    model = backbone if isinstance(backbone, nn.Module) else create_backbone(backbone, num_classes=0)
    if tta:
        model = FlipAveraged(model)
    cache = Path(cache_dir) / EMBEDDINGS_FILE if cache_dir is not None else None
    if (
        cache is not None
        and isinstance(backbone, str)
        and _cache_matches(cache, source, model.backbone_name, image_size or model.preprocessing.input_size)
    ):
        return Embeddings.load(cache), source
    result = embed(
        source,
        model,
        out=cache,
        image_size=image_size,
        batch_size=batch_size,
        device=device,
        max_pixels=max_pixels,
        progress=progress,
    )
    return result, source


def _cache_matches(cache: Path, source: ImageSource, name: str, input_size: int) -> bool:
    """Whether a finished embeddings file holds ``source``'s images from backbone ``name``."""
    if not cache.is_file():
        return False
    try:
        with np.load(cache, allow_pickle=False) as d:
            meta = json.loads(str(d["meta"]))
            paths = d["paths"].tolist()
    except (OSError, KeyError, ValueError):
        return False
    wanted = set(source.paths)
    return (
        meta.get("backbone") == name
        and meta["preprocessing"]["input_size"] == input_size
        and all(p in wanted for p in paths)
        and len(paths) + int(meta.get("skipped", 0)) - len(source.skipped) == len(source)
    )
