"""The feature stage: data -> backbone and input size -> (adapted) embeddings -> prepared features.

The layer after embedding and before clustering, the audit and the index: every command that
needs features of a collection calls :func:`compute_features`, so there is one cache
(``RUN/embeddings.npz``, reused row by row for files whose content is unchanged), one place
that decides the backbone and input size of small images (:data:`SMALL_IMAGE_SIZE`), and one
preparation (L2, PCA, L2: :class:`FeaturePipeline`).
"""

from ._adapt import ADAPT_METHODS, adapt_backbone
from ._backbone import (
    AUTO_PHOTOS,
    AUTO_SMALL_IMAGES,
    PHOTO_BACKBONE,
    SMALL_IMAGE_BACKBONE,
    SMALL_IMAGE_SIZE,
    FlipAveraged,
    auto_backbone,
)
from ._cache import EMBEDDINGS_FILE, IDENTITY_FILE, check_finished, is_embeddings_file, resolve_embeddings
from ._prepare import FeaturePipeline, l2_normalize, prepare_features
from ._stage import FeatureSet, check_embeddings, compute_features

__all__ = [
    "ADAPT_METHODS",
    "AUTO_PHOTOS",
    "AUTO_SMALL_IMAGES",
    "EMBEDDINGS_FILE",
    "IDENTITY_FILE",
    "PHOTO_BACKBONE",
    "SMALL_IMAGE_BACKBONE",
    "SMALL_IMAGE_SIZE",
    "FeaturePipeline",
    "FeatureSet",
    "FlipAveraged",
    "adapt_backbone",
    "auto_backbone",
    "check_embeddings",
    "check_finished",
    "compute_features",
    "is_embeddings_file",
    "l2_normalize",
    "prepare_features",
    "resolve_embeddings",
]
