"""imagerec: image recognition with transfer learning, and clustering images by what they show.

Layers, each importing only from those before it::

    data -> backbones -> checkpoint, inference, embedding -> training -> evaluation, clustering
         -> classifier, prediction, quickstart, export, compress -> cli

``imagerec.runtime`` stands apart: it runs exported ONNX models with onnxruntime, numpy and
Pillow alone. So that it can be imported where PyTorch is not installed, the names below are
imported on first use (PEP 562), not when ``imagerec`` itself is imported.
"""

from __future__ import annotations

import importlib

from ._version import __version__
from .errors import ImagerecError, ImagerecWarning, SkippedImagesWarning

_LAZY = {
    "AuditResult": ".audit",
    "audit": ".audit",
    "ModelCard": ".backbones",
    "create_backbone": ".backbones",
    "list_backbones": ".backbones",
    "model_card": ".backbones",
    "model_cards": ".backbones",
    "recommend_backbone": ".backbones",
    "Checkpoint": ".checkpoint",
    "load_checkpoint": ".checkpoint",
    "save_checkpoint": ".checkpoint",
    "Classifier": ".classifier",
    "ClusteringResult": ".clustering",
    "ClusteringWarning": ".clustering",
    "cluster_images": ".clustering",
    "ImageSource": ".data",
    "Preprocessing": ".data",
    "load_images": ".data",
    "Embeddings": ".embedding",
    "embed": ".embedding",
    "EvaluationReport": ".evaluation",
    "SearchIndex": ".index",
    "add_to_index": ".index",
    "build_index": ".index",
    "load_index": ".index",
    "quickstart": "._quickstart",
    "select_next": ".suggest",
    "suggest": ".suggest",
    "TrainConfig": ".training",
    "TrainResult": ".training",
    "train": ".training",
}

__all__ = [*_LAZY, "ImagerecError", "ImagerecWarning", "SkippedImagesWarning", "__version__"]  # noqa: PLE0604


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'imagerec' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
