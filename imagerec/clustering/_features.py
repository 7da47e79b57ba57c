"""Features for clustering come from the shared feature stage, :mod:`imagerec.features`.

Kept so that older imports (``from imagerec.clustering._features import FeaturePipeline``)
still work; new code imports from :mod:`imagerec.features`.
"""

from ..features import (
    AUTO_PHOTOS,
    AUTO_SMALL_IMAGES,
    EMBEDDINGS_FILE,
    FeaturePipeline,
    FlipAveraged,
    auto_backbone,
    l2_normalize,
    prepare_features,
    resolve_embeddings,
)

__all__ = [
    "AUTO_PHOTOS",
    "AUTO_SMALL_IMAGES",
    "EMBEDDINGS_FILE",
    "FeaturePipeline",
    "FlipAveraged",
    "auto_backbone",
    "l2_normalize",
    "prepare_features",
    "resolve_embeddings",
]
