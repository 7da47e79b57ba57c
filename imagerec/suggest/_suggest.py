"""suggest(): the suggestions of a collection, and the fitted model to update them with."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..embedding import Embeddings
from ..errors import ImagerecError
from ..features import FeaturePipeline, FeatureSet
from ._model import Suggester

PCA_DIM = 128  # the suggester's features: L2, PCA to this many components, L2 (the probe and the graph cost O(D))


@dataclass
class Suggestions:
    """The suggestions for a collection, and the fitted model to update them with.

    Attributes:
        paths: one per image (None where the features came as an array).
        labels: the labels they were fitted on (None: unlabelled).
        features: float array (N, d): the prepared features the model uses (L2, PCA to
            :data:`PCA_DIM`, L2: the feature stage's :class:`~imagerec.features.FeaturePipeline`).
        suggester: the fitted :class:`Suggester`.
    """

    paths: list[str] | None
    labels: list[str | None]
    features: np.ndarray
    suggester: Suggester

    @property
    def classes(self) -> list[str]:
        return self.suggester.classes_

    @property
    def proba(self) -> np.ndarray:
        """float array (N, C): calibrated probabilities, columns in :attr:`classes` order."""
        return self.suggester.proba_

    @property
    def frame(self) -> pd.DataFrame:
        """One row per image: path, label, suggested, confidence, disagrees."""
        s = self.suggester
        return pd.DataFrame({
            "path": self.paths if self.paths is not None else range(len(self.labels)),
            "label": self.labels,
            "suggested": [s.classes_[i] for i in s.suggested_],
            "confidence": s.confidence_,
            "disagrees": s.disagrees_,
        })  # fmt: skip

    def update(self, decisions: dict[int, str | None]) -> Suggestions:
        """New suggestions after the person's decisions (row index -> class name, or None to clear).

        Reuses the neighbour graph, so on 10,000 images this is a refit of the probe and a
        re-solve of the propagation: measured in docs/BENCHMARKS.md ("Suggestions").
        """
        labels = list(self.labels)
        for row, name in decisions.items():
            if not 0 <= int(row) < len(labels):
                raise ImagerecError(f"row {row} is not an image of this collection (0..{len(labels) - 1})")
            labels[int(row)] = name
        self.suggester.refit(labels)
        return Suggestions(self.paths, labels, self.features, self.suggester)


def suggest(embeddings, labels=None, *, method: str = "auto", **params) -> Suggestions:
    """Suggested classes for every image from the labelled ones.

    Args:
        embeddings: an :class:`~imagerec.Embeddings`, a :class:`~imagerec.features.FeatureSet`,
            a ``.npz`` from ``imagerec embed``, or a float array (N, D).
        labels: N class names, None (or "") for an image without one; default: the labels
            stored with the embeddings.
        method: ``"auto"`` (probe and propagation averaged), ``"probe"`` or ``"propagation"``.
        **params: further :class:`Suggester` arguments (``n_neighbors``, ``alpha``, ``C``...).

    Returns:
        :class:`Suggestions`.

    Raises:
        ImagerecError: no labels given or stored, labels of another length, no labelled image.
    """
    paths, features, stored = _features(embeddings)
    if labels is None:
        if stored is None:
            raise ImagerecError("these embeddings hold no labels; pass labels=[class or None for each image]")
        labels = stored
    labels = [None if v is None or str(v) == "" else str(v) for v in labels]
    suggester = Suggester(method, **params).fit(features, labels)
    return Suggestions(paths, labels, features, suggester)


def _features(embeddings) -> tuple[list[str] | None, np.ndarray, list[str | None] | None]:
    """(paths, prepared features, stored labels or None) of what ``suggest`` was given."""
    if isinstance(embeddings, FeatureSet):
        embeddings = embeddings.embeddings
    if isinstance(embeddings, (str, os.PathLike)):
        embeddings = Embeddings.load(embeddings)
    if isinstance(embeddings, Embeddings):
        stored = None
        if embeddings.labels is not None and embeddings.classes is not None:
            stored = [embeddings.classes[i] if i >= 0 else None for i in np.asarray(embeddings.labels)]
        return list(embeddings.paths), _prepare(embeddings.features), stored
    return None, _prepare(embeddings), None


def _prepare(features) -> np.ndarray:
    features = np.asarray(features, np.float32)
    if features.ndim != 2 or len(features) < 2:
        raise ImagerecError(f"features of shape {features.shape} must be (N, D) with N >= 2; embed the images first")
    return FeaturePipeline(normalize=True, pca_dim=PCA_DIM, random_state=0).fit_transform(features).astype(np.float32)
