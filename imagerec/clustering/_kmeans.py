"""k-means and mini-batch k-means, with FAISS for large collections where it is installed."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.cluster import KMeans as _SkKMeans
from sklearn.cluster import MiniBatchKMeans as _SkMiniBatchKMeans
from sklearn.exceptions import ConvergenceWarning

from ..errors import ImagerecError
from ._base import BaseClustering
from ._checks import check_positive
from ._neighbors import nearest_centres, squared_distances

FAISS_MIN_SAMPLES = 50_000  # backend="auto" uses FAISS from this many images on, where importable
_BACKENDS = ("auto", "sklearn", "faiss")


def import_faiss():
    """The ``faiss`` module, or None where it is not installed (``pip install faiss-cpu``)."""
    try:
        import faiss  # noqa: PLC0415 - optional dependency
    except ImportError:
        return None
    return faiss


class _CentroidMixin:
    _has_centres = True

    def predict(self, X) -> np.ndarray:
        """The nearest cluster centre of each feature vector.

        Args:
            X: float array (M, D), prepared like the features passed to ``fit``.

        Returns:
            int64 array (M,) of cluster indices.

        Raises:
            ImagerecError: not fitted on features of this dimension, or NaN/inf values.
        """
        X = self._check_predict_input(X)
        return nearest_centres(X, self.cluster_centers_)[0]

    def transform(self, X) -> np.ndarray:
        """Distances to every cluster centre: float array (M, K)."""
        X = self._check_predict_input(X)
        return np.sqrt(squared_distances(X, self.cluster_centers_.astype(X.dtype)))


class KMeans(_CentroidMixin, BaseClustering):
    """k-means (Lloyd), on scikit-learn, or on FAISS for large collections.

    With ``backend="auto"`` FAISS is used from :data:`FAISS_MIN_SAMPLES` (50,000) images on
    when ``faiss`` is importable (``pip install faiss-cpu``), scikit-learn otherwise. FAISS
    trains on every image (its default subsampling is switched off) and starts each restart
    from random images rather than k-means++; it is several times faster on many cores.

    Args:
        n_clusters: number of clusters K, at least 1 and at most N.
        n_init: restarts; the one with the lowest inertia is kept.
        max_iter: Lloyd iterations per restart.
        backend: ``"auto"``, ``"sklearn"`` or ``"faiss"``.
        random_state: seed.

    Attributes:
        labels_: int64 array (N,).
        cluster_centers_: float array (K, D).
        inertia_: sum of squared distances to the nearest centre.
        backend_: the backend that ran.
    """

    def __init__(
        self,
        n_clusters: int = 8,
        *,
        n_init: int = 4,
        max_iter: int = 300,
        backend: str = "auto",
        random_state: int | None = 0,
    ):
        self.n_clusters = n_clusters
        self.n_init = n_init
        self.max_iter = max_iter
        self.backend = backend
        self.random_state = random_state

    def _check_params(self, n_samples: int) -> None:
        check_positive(self.n_init, "n_init", integer=True, minimum=1, inclusive=True, hint="; try 4")
        check_positive(self.max_iter, "max_iter", integer=True, minimum=1, inclusive=True, hint="; try 300")
        if self.backend not in _BACKENDS:
            raise ImagerecError(f"backend={self.backend!r} is not one of {_BACKENDS}")
        if self.backend == "faiss" and import_faiss() is None:
            raise ImagerecError("backend='faiss' needs FAISS: pip install faiss-cpu (or use backend='sklearn')")

    def _resolve_backend(self, n_samples: int) -> str:
        if self.backend != "auto":
            return self.backend
        return "faiss" if n_samples >= FAISS_MIN_SAMPLES and import_faiss() is not None else "sklearn"

    def _fit(self, X: np.ndarray) -> None:
        self.backend_ = self._resolve_backend(len(X))
        if self.backend_ == "faiss":
            self.cluster_centers_ = _faiss_kmeans(X, self.n_clusters, self.n_init, self.max_iter, self.random_state)
            self.labels_, distances = nearest_centres(X, self.cluster_centers_)
            self.inertia_ = float(np.sum(distances**2))
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # fewer distinct points: our own warning says it
            km = _SkKMeans(
                self.n_clusters, n_init=self.n_init, max_iter=self.max_iter, random_state=self.random_state
            ).fit(X)
        self.cluster_centers_ = km.cluster_centers_
        self.labels_ = km.labels_.astype(np.int64)
        self.inertia_ = float(km.inertia_)


def _faiss_kmeans(X: np.ndarray, k: int, n_init: int, max_iter: int, seed: int | None) -> np.ndarray:
    faiss = import_faiss()
    x = np.ascontiguousarray(X, dtype=np.float32)
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=max_iter,
        nredo=n_init,
        seed=0 if seed is None else int(seed) % 2**31,
        max_points_per_centroid=max(len(x), 1),
        min_points_per_centroid=1,
        verbose=False,
    )
    km.train(x)
    return np.asarray(km.centroids, dtype=X.dtype).reshape(k, x.shape[1])


class MiniBatchKMeans(_CentroidMixin, BaseClustering):
    """Mini-batch k-means (scikit-learn): k-means on random batches, for very large collections.

    Args:
        n_clusters: number of clusters K.
        batch_size: images per batch.
        n_init: restarts (best inertia kept).
        max_iter: passes over the data.
        random_state: seed.

    Attributes:
        labels_: int64 array (N,).
        cluster_centers_: float array (K, D).
        inertia_: sum of squared distances to the nearest centre.
    """

    def __init__(
        self,
        n_clusters: int = 8,
        *,
        batch_size: int = 2048,
        n_init: int = 3,
        max_iter: int = 100,
        random_state: int | None = 0,
    ):
        self.n_clusters = n_clusters
        self.batch_size = batch_size
        self.n_init = n_init
        self.max_iter = max_iter
        self.random_state = random_state

    def _check_params(self, n_samples: int) -> None:
        check_positive(self.batch_size, "batch_size", integer=True, minimum=1, inclusive=True, hint="; try 2048")
        check_positive(self.n_init, "n_init", integer=True, minimum=1, inclusive=True, hint="; try 3")
        check_positive(self.max_iter, "max_iter", integer=True, minimum=1, inclusive=True, hint="; try 100")

    def _fit(self, X: np.ndarray) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            km = _SkMiniBatchKMeans(
                self.n_clusters,
                batch_size=self.batch_size,
                n_init=self.n_init,
                max_iter=self.max_iter,
                random_state=self.random_state,
            ).fit(X)
        self.cluster_centers_ = km.cluster_centers_
        self.labels_, distances = nearest_centres(X, self.cluster_centers_)  # labels that agree with predict()
        self.inertia_ = float(np.sum(distances**2))
