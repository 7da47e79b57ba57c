"""What every imagerec clustering estimator shares: scikit-learn's protocol and the boundary.

``__init__`` stores keyword arguments and nothing else (so ``get_params``, ``set_params`` and
``clone`` work); ``fit(X)`` validates once, handles the degenerate cases the same way for every
method, and hands clean features to the subclass's ``_fit``; learned state ends in ``_``.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import csr_matrix
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.utils.validation import check_is_fitted

from ..errors import ImagerecError
from ._checks import all_identical, check_features, check_n_clusters, check_n_samples, warn


class BaseClustering(ClusterMixin, BaseEstimator):
    """Base class: subclasses implement ``_check_params(n_samples)`` and ``_fit(X)``.

    Attributes set by ``fit``:
        labels_: int64 array (N,), the cluster of each image; -1 marks noise (density methods).
        n_clusters_: number of clusters found (noise not counted).
        n_features_in_: D, the feature dimension seen in ``fit``.
    """

    _uses_n_clusters = True  # density methods find the number of clusters themselves

    def fit(self, X, y=None):
        """Cluster feature vectors.

        Args:
            X: float array (N, D), e.g. ``Embeddings.features`` after
                :func:`~imagerec.clustering.prepare_features`.
            y: ignored (scikit-learn's signature).

        Returns:
            self, fitted.

        Raises:
            ImagerecError: NaN or infinite features, fewer than 2 images, fewer images than
                clusters, a number of clusters below 1, or an invalid parameter.

        Warns:
            ClusteringWarning: k=1, all images identical, or fewer clusters found than asked for.
        """
        X = check_features(X, "X")
        n = len(X)
        check_n_samples(n)
        if self._uses_n_clusters:
            check_n_clusters(self.n_clusters, n)
        self._check_params(n)
        self.n_features_in_ = X.shape[1]
        if self._uses_n_clusters and self.n_clusters == 1:
            warn(f"n_clusters=1 puts all {n} images in one cluster; ask for 2 or more to group them", stacklevel=3)
            self._fit_one_cluster(X)
        elif all_identical(X):
            warn(
                f"all {n} feature vectors are identical (duplicate or blank images): they form one cluster",
                stacklevel=3,
            )
            self._fit_one_cluster(X)
        else:
            self._fit(X)
            self.n_clusters_ = int(len(np.unique(self.labels_[self.labels_ >= 0])))
            self._warn_if_degenerate(n)
        return self

    def _check_params(self, n_samples: int) -> None:
        """Validate the constructor's arguments against the data (subclasses extend)."""

    def _fit(self, X: np.ndarray) -> None:
        raise NotImplementedError

    def _fit_one_cluster(self, X: np.ndarray) -> None:
        """The degenerate result: every image in cluster 0, its centre the mean."""
        self.labels_ = np.zeros(len(X), np.int64)
        self.n_clusters_ = 1
        if hasattr(self, "_has_centres"):
            self.cluster_centers_ = X.mean(0, keepdims=True).astype(X.dtype)

    def _warn_if_degenerate(self, n: int) -> None:
        if self.n_clusters_ == 0:
            warn(
                f"{type(self).__name__} marked all {n} images as noise; loosen its parameters (larger eps, smaller min_samples)"
            )
        elif self._uses_n_clusters and self.n_clusters_ < self.n_clusters:
            warn(
                f"found {self.n_clusters_} non-empty clusters of the n_clusters={self.n_clusters} asked for; "
                "the images have fewer distinct groups (duplicates?) - ask for fewer clusters"
            )

    def _check_predict_input(self, X) -> np.ndarray:
        check_is_fitted(self, "labels_")
        X = check_features(X, "X")
        if X.shape[1] != self.n_features_in_:
            raise ImagerecError(
                f"X has {X.shape[1]} features per image but the model was fitted on {self.n_features_in_}; "
                "prepare new features the same way (same backbone, same FeaturePipeline)"
            )
        return X


def cluster_means(X: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The mean feature vector of each cluster.

    Args:
        X: float array (N, D).
        labels: int array (N,); -1 (noise) is left out.

    Returns:
        float array (K, D) with K = ``labels.max() + 1`` (a cluster with no image gets zeros).
    """
    k = int(labels.max()) + 1 if len(labels) else 0
    kept = np.flatnonzero(labels >= 0)
    onehot = csr_matrix((np.ones(len(kept)), (labels[kept], kept)), shape=(k, len(X)))
    sums = np.asarray(onehot @ X, dtype=np.float64)
    return (sums / np.maximum(np.bincount(labels[kept], minlength=k), 1)[:, None]).astype(X.dtype)
