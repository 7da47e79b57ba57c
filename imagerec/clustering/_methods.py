"""The clustering methods by name: ``make_estimator("dbscan", params={"eps": 0.4})``."""

from __future__ import annotations

from ..errors import ImagerecError
from ._base import BaseClustering
from ._deep import DeepClustering
from ._density import DBSCAN, HDBSCAN
from ._hierarchy import AgglomerativeClustering
from ._kmeans import KMeans, MiniBatchKMeans

METHODS: dict[str, type[BaseClustering]] = {
    "kmeans": KMeans,
    "minibatch_kmeans": MiniBatchKMeans,
    "dbscan": DBSCAN,
    "hdbscan": HDBSCAN,
    "agglomerative": AgglomerativeClustering,
    "deep": DeepClustering,
}
K_METHODS = tuple(name for name, cls in METHODS.items() if cls._uses_n_clusters)  # those that take k


def check_method(method: str) -> str:
    """The canonical method name (``-`` and ``_`` are the same; ``ward``/``average``/``complete``
    are agglomerative's linkages and not methods).

    Raises:
        ImagerecError: an unknown name, with the valid ones.
    """
    name = str(method).lower().replace("-", "_")
    if name not in METHODS:
        raise ImagerecError(f"method={method!r} is not one of {', '.join(METHODS)}; pick one of those")
    return name


def make_estimator(
    method: str, n_clusters: int | None = None, params: dict | None = None, random_state: int | None = 0
) -> BaseClustering:
    """An unfitted estimator for ``method``.

    Args:
        method: one of :data:`METHODS`.
        n_clusters: K for the methods that take it (ignored by dbscan and hdbscan).
        params: more constructor arguments, e.g. ``{"linkage": "average"}``.
        random_state: seed, for the methods that take one.

    Returns:
        The estimator.

    Raises:
        ImagerecError: an unknown method or parameter (the message lists the valid ones).
    """
    cls = METHODS[check_method(method)]
    valid = cls().get_params()
    params = dict(params or {})
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ImagerecError(
            f"{unknown[0]!r} is not a parameter of method {method!r}; its parameters are {', '.join(sorted(valid))}"
        )
    if "n_clusters" in valid and n_clusters is not None:
        params["n_clusters"] = n_clusters
    if "random_state" in valid:
        params.setdefault("random_state", random_state)
    return cls(**params)
