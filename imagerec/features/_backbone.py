"""Which backbone embeds a collection, and at what input size: the one place that decides it.

Small images (at most ``SMALL_IMAGE_MAX_SIDE`` pixels a side, like CIFAR's)
carry little detail for ImageNet features; EfficientNet-Lite2 upsampled to ``SMALL_IMAGE_SIZE``
clustered CIFAR-10 best of the Lite0/Lite2 sizes measured (docs/BENCHMARKS.md). Photos get
EfficientNet-Lite0 at its own size (224 px), the cheapest backbone whose features are strong
there.
"""

from __future__ import annotations

import torch
from torch import nn

from .._decode import peek_size
from ..data import SMALL_IMAGE_MAX_SIDE, ImageSource, decode_small_images

SMALL_IMAGE_BACKBONE = "efficientnet_lite2"
SMALL_IMAGE_SIZE = 160  # px: small images are upsampled to this for embedding (CIFAR-10 k-means ACC)
PHOTO_BACKBONE = "efficientnet_lite0"
AUTO_SMALL_IMAGES = (SMALL_IMAGE_BACKBONE, SMALL_IMAGE_SIZE)  # the name older code imports
AUTO_PHOTOS = PHOTO_BACKBONE


def auto_backbone(source: ImageSource, image_size: int | None) -> tuple[str, int | None, ImageSource]:
    """The backbone and input size that ``backbone="auto"`` means for ``source``, and the source
    to embed (decoded into the cache when its images are small, so embedding does not look again).

    Args:
        source: the images.
        image_size: the input side the user asked for, or None.

    Returns:
        (backbone name, input side or None for the backbone's own, source to embed).
    """
    small = decode_small_images(source, progress=False)
    if small is not None:
        return SMALL_IMAGE_BACKBONE, image_size or SMALL_IMAGE_SIZE, small
    if _all_small(source):  # small but of several sizes (resized copies): same rule, read from files
        return SMALL_IMAGE_BACKBONE, image_size or SMALL_IMAGE_SIZE, source
    return PHOTO_BACKBONE, image_size, source


def _all_small(source: ImageSource, probe: int = 64) -> bool:
    """Whether the images (a spread sample of ``probe`` of them) are all at most
    ``SMALL_IMAGE_MAX_SIDE`` pixels a side."""
    paths = source.paths[:: max(1, len(source.paths) // probe)][:probe]
    sizes = [peek_size(p) for p in paths]
    known = [s for s in sizes if s is not None]
    return bool(known) and max(max(s) for s in known) <= SMALL_IMAGE_MAX_SIDE


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
