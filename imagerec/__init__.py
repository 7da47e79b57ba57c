"""imagerec: image recognition with transfer learning, and clustering images by what they show.

Layers, each importing only from those before it::

    data -> backbones -> embedding -> cli
"""

from ._version import __version__
from .backbones import ModelCard, create_backbone, list_backbones, model_card, model_cards, recommend_backbone
from .data import ImageSource, Preprocessing, load_images
from .embedding import Embeddings, embed
from .errors import ImagerecError, ImagerecWarning, SkippedImagesWarning

__all__ = [
    "Embeddings",
    "ImageSource",
    "ImagerecError",
    "ImagerecWarning",
    "ModelCard",
    "Preprocessing",
    "SkippedImagesWarning",
    "__version__",
    "create_backbone",
    "embed",
    "list_backbones",
    "load_images",
    "model_card",
    "model_cards",
    "recommend_backbone",
]
