"""Density-based clustering: DBSCAN with bounded memory and ``eps="auto"``, and HDBSCAN.

scikit-learn's DBSCAN first stores every point's whole eps-neighbourhood, which on 60,000
embeddings with a loose eps is billions of indices. Here nothing of size N x N is ever held:

1. a chunked k-nearest-neighbour pass gives each image's distance to its ``min_samples - 1``-th
   nearest other image; that is the k-distance curve (whose knee is ``eps="auto"``) and also says
   which images are core points (the distance is at most eps);
2. a second pass, one block of rows at a time against the core points only, links core points
   closer than eps (a union-find done with scipy's connected components on the merged labels, so
   each block's edges are dropped after use) and gives every non-core image its nearest core point
   within eps (a border point) or none (noise, label -1).

The result is DBSCAN's, except that a border point within eps of two clusters joins the nearer
(scikit-learn gives it to whichever it meets first).
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ..errors import ImagerecError
from ._base import BaseClustering
from ._checks import check_positive
from ._neighbors import WORKING_MEMORY_MB, iter_blocks, knn


def knee_point(values: np.ndarray) -> int:
    """Index of the knee of an increasing curve: the point farthest below the chord (Kneedle).

    Args:
        values: float array (N,), sorted ascending (e.g. sorted k-distances).

    Returns:
        An index into ``values``; the last one when the curve is flat.
    """
    n = len(values)
    if n < 3 or values[-1] <= values[0]:
        return n - 1
    x = np.linspace(0.0, 1.0, n)
    y = (values - values[0]) / (values[-1] - values[0])
    return int(np.argmax(x - y))


class DBSCAN(BaseClustering):
    """DBSCAN that stays within a few hundred MiB on 60,000 x 1,280 features.

    See the module docstring for how. Euclidean distance; on L2-normalised features that is
    ``sqrt(2 - 2 cos)``, so eps=0.5 means a cosine similarity above 0.875.

    Args:
        eps: neighbourhood radius, or ``"auto"``: the knee of the sorted k-distance curve, with
            k = ``min_samples - 1`` (the other images a core point needs within eps).
        min_samples: images within eps, itself included, that make a core point (>= 2).
        working_memory: MiB for one block of distances.

    Attributes:
        labels_: int64 array (N,); -1 marks noise.
        eps_: the radius used.
        core_sample_indices_: int64 array of the core points.
        k_distances_: float array (N,): each image's distance to its ``min_samples - 1``-th
            nearest other image (the k-distance curve, unsorted).
    """

    _uses_n_clusters = False

    def __init__(self, eps: float | str = "auto", *, min_samples: int = 5, working_memory: float = WORKING_MEMORY_MB):
        self.eps = eps
        self.min_samples = min_samples
        self.working_memory = working_memory

    def _check_params(self, n_samples: int) -> None:
        if self.eps != "auto":
            check_positive(self.eps, "eps", hint="; or pass eps='auto' to take it from the k-distance curve")
        check_positive(self.min_samples, "min_samples", integer=True, minimum=2, inclusive=True, hint="; try 5")
        if self.min_samples > n_samples:
            raise ImagerecError(
                f"min_samples={self.min_samples} should be <= n_samples={n_samples}: a core point needs that "
                f"many images around it; lower min_samples to at most {n_samples}"
            )
        check_positive(self.working_memory, "working_memory", hint=" (MiB); try 128")

    def _fit(self, X: np.ndarray) -> None:
        distances, _ = knn(X, self.min_samples - 1, self.working_memory)
        self.k_distances_ = distances[:, -1].astype(np.float64)
        if self.eps == "auto":
            curve = np.sort(self.k_distances_)
            self.eps_ = float(curve[knee_point(curve)])
        else:
            self.eps_ = float(self.eps)
        # Identical rows can come out a rounding error above 0 apart: a tolerance keeps them together.
        self.eps_ = max(self.eps_, 1e-6 * float(np.sqrt(np.mean(np.einsum("ij,ij->i", X, X)))))
        core = self.k_distances_ <= self.eps_
        self.core_sample_indices_ = np.flatnonzero(core)
        self.labels_ = _connect(X, core, self.eps_, self.working_memory)


def _connect(X: np.ndarray, core: np.ndarray, eps: float, working_memory: float) -> np.ndarray:
    """Labels from core points: connected components of the eps-graph on them, plus borders."""
    core_idx = np.flatnonzero(core)
    if len(core_idx) == 0:
        return np.full(len(X), -1, np.int64)
    position = np.full(len(X), -1, np.int64)
    position[core_idx] = np.arange(len(core_idx))
    component = np.arange(len(core_idx))  # union-find state: the component of each core point
    nearest_core = np.full(len(X), -1, np.int64)
    eps2 = eps * eps
    for start, d2 in iter_blocks(X, X[core_idx], working_memory):
        rows = np.arange(start, start + len(d2))
        is_core = core[rows]
        # 1. core rows: merge the components of every core point within eps
        r, c = np.nonzero((d2 <= eps2)[is_core])
        a, b = component[position[rows[is_core]][r]], component[c]
        differ = a != b
        if differ.any():
            m = len(core_idx)
            pairs = np.unique(a[differ] * m + b[differ])  # each block's edges, deduplicated, then dropped
            component = _merge(component, pairs // m, pairs % m)
        # 2. other rows: their nearest core point, if within eps
        other = ~is_core
        if other.any():
            block = d2[other]
            arg = block.argmin(1)
            close = block[np.arange(len(block)), arg] <= eps2
            nearest_core[rows[other][close]] = arg[close]
    labels = np.full(len(X), -1, np.int64)
    labels[core_idx] = component
    border = nearest_core >= 0
    labels[border] = component[nearest_core[border]]
    return _renumber(labels)


def _merge(component: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Union the components ``a[i]`` and ``b[i]``: connected components of the merge graph."""
    n = len(component)
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    _, merged = connected_components(graph, directed=False)
    return merged[component]


def _renumber(labels: np.ndarray) -> np.ndarray:
    """Clusters numbered 0, 1, ... in order of their first image; -1 stays -1."""
    out = np.full_like(labels, -1)
    kept = labels >= 0
    if kept.any():
        _, first, inverse = np.unique(labels[kept], return_index=True, return_inverse=True)
        rank = np.empty(len(first), np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(len(first))
        out[kept] = rank[inverse]
    return out


class HDBSCAN(BaseClustering):
    """HDBSCAN (scikit-learn's ``sklearn.cluster.HDBSCAN``), validated at imagerec's boundary.

    Finds clusters of varying density and the number of clusters itself; images in no cluster
    get label -1. scikit-learn builds the minimum spanning tree with Prim's algorithm on the
    data matrix (O(N) memory, O(N^2 D) time): reduce the features first (PCA to 32 dimensions,
    which :func:`~imagerec.cluster_images` does by default for this method).

    Args:
        min_cluster_size: the smallest group that counts as a cluster (>= 2).
        min_samples: neighbours that make a point dense (default: ``min_cluster_size``).
        cluster_selection_epsilon: merge clusters closer than this.

    Attributes:
        labels_: int64 array (N,); -1 marks noise.
        probabilities_: float array (N,): strength of each image's membership, in [0, 1].
    """

    _uses_n_clusters = False

    def __init__(
        self, min_cluster_size: int = 5, *, min_samples: int | None = None, cluster_selection_epsilon: float = 0.0
    ):
        self.min_cluster_size = min_cluster_size
        self.min_samples = min_samples
        self.cluster_selection_epsilon = cluster_selection_epsilon

    def _check_params(self, n_samples: int) -> None:
        check_positive(
            self.min_cluster_size, "min_cluster_size", integer=True, minimum=2, inclusive=True, hint="; try 5"
        )
        if self.min_cluster_size > n_samples:
            raise ImagerecError(
                f"min_cluster_size={self.min_cluster_size} should be <= n_samples={n_samples}; "
                f"lower it to at most {n_samples}"
            )
        if self.min_samples is not None:
            check_positive(
                self.min_samples, "min_samples", integer=True, minimum=1, inclusive=True, hint="; try 5 or None"
            )
            if self.min_samples > n_samples:
                raise ImagerecError(f"min_samples={self.min_samples} should be <= n_samples={n_samples}; lower it")
        check_positive(self.cluster_selection_epsilon, "cluster_selection_epsilon", minimum=0.0, inclusive=True)

    def _fit(self, X: np.ndarray) -> None:
        from sklearn.cluster import HDBSCAN as _SkHDBSCAN  # noqa: PLC0415 - scikit-learn >= 1.3

        kwargs = {"copy": True} if "copy" in inspect.signature(_SkHDBSCAN).parameters else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = _SkHDBSCAN(
                min_cluster_size=self.min_cluster_size,
                min_samples=self.min_samples,
                cluster_selection_epsilon=float(self.cluster_selection_epsilon),
                **kwargs,
            ).fit(X)
        self.labels_ = model.labels_.astype(np.int64)
        self.probabilities_ = model.probabilities_.astype(np.float64)

    def _fit_one_cluster(self, X: np.ndarray) -> None:
        super()._fit_one_cluster(X)
        self.probabilities_ = np.ones(len(X))
