"""imagerec: image recognition with transfer learning, and clustering images by what they show.

Layers, each importing only from those before it::

    data -> backbones -> checkpoint, inference, embedding -> training -> evaluation, clustering
         -> classifier, prediction, quickstart -> cli
"""

from ._version import __version__
from .backbones import ModelCard, create_backbone, list_backbones, model_card, model_cards, recommend_backbone
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .classifier import Classifier
from .clustering import ClusteringResult, ClusteringWarning, cluster_images
from .data import ImageSource, Preprocessing, load_images
from .embedding import Embeddings, embed
from .errors import ImagerecError, ImagerecWarning, SkippedImagesWarning
from .evaluation import EvaluationReport
from .quickstart import quickstart
from .training import TrainConfig, TrainResult, train

__all__ = [
    "Checkpoint",
    "Classifier",
    "ClusteringResult",
    "ClusteringWarning",
    "Embeddings",
    "EvaluationReport",
    "ImageSource",
    "ImagerecError",
    "ImagerecWarning",
    "ModelCard",
    "Preprocessing",
    "SkippedImagesWarning",
    "TrainConfig",
    "TrainResult",
    "__version__",
    "cluster_images",
    "create_backbone",
    "embed",
    "list_backbones",
    "load_checkpoint",
    "load_images",
    "model_card",
    "model_cards",
    "quickstart",
    "recommend_backbone",
    "save_checkpoint",
    "train",
]
