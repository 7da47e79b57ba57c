"""Agglomerative clustering that scales: linkage on the centroids of a first-level k-means.

Plain Ward linkage on 60,000 images needs the 60k x 60k distance matrix (14 GB in float32, and
O(N^2) merge steps). Here the images are first grouped into ``n_subclusters`` (1,000) small
k-means clusters; the linkage then runs on those, weighted by their sizes, in an m x m matrix
(8 MB for m = 1,000). With N <= ``n_subclusters`` every image is its own subcluster and the
result is exact linkage.

The merge rule is Lance-Williams with the subclusters' sizes:

* ward: the increase in within-cluster sum of squares, exact for clusters made of subclusters;
* average: size-weighted mean of the distances between subcluster centroids (UPGMA on them);
* complete: the largest distance between subcluster centroids.

For average and complete linkage, the distance between two subclusters is that of their
centroids, an approximation of the distance between their images.
"""

from __future__ import annotations

import numpy as np

from ..errors import ImagerecError
from ._base import BaseClustering, cluster_means
from ._checks import check_n_clusters, check_positive
from ._kmeans import KMeans
from ._neighbors import squared_distances

LINKAGES = ("ward", "average", "complete")


class AgglomerativeClustering(BaseClustering):
    """Hierarchical clustering (ward, average or complete linkage) for large collections.

    See the module docstring: linkage on the centroids of a first-level k-means.

    Args:
        n_clusters: where to cut the tree: K clusters.
        linkage: ``"ward"``, ``"average"`` or ``"complete"``.
        n_subclusters: size m of the first level; with N <= m the linkage is exact.
        random_state: seed of the first-level k-means.

    Attributes:
        labels_: int64 array (N,).
        cluster_centers_: float array (K, D): the mean of each cluster's images.
        linkage_matrix_: float array (m - 1, 4) in scipy's format (``scipy.cluster.hierarchy``):
            the merged nodes, the merge height and the number of images below it.
        subcluster_labels_: int64 array (N,): the leaf (subcluster) of each image.
        subcluster_sizes_: int64 array (m,).
    """

    _has_centres = True

    def __init__(
        self, n_clusters: int = 8, *, linkage: str = "ward", n_subclusters: int = 1000, random_state: int | None = 0
    ):
        self.n_clusters = n_clusters
        self.linkage = linkage
        self.n_subclusters = n_subclusters
        self.random_state = random_state

    def _check_params(self, n_samples: int) -> None:
        if self.linkage not in LINKAGES:
            raise ImagerecError(f"linkage={self.linkage!r} is not one of {LINKAGES}; ward is the usual choice")
        check_positive(self.n_subclusters, "n_subclusters", integer=True, minimum=2, inclusive=True, hint="; try 1000")
        if self.n_subclusters < self.n_clusters:
            raise ImagerecError(
                f"n_subclusters={self.n_subclusters} should be >= n_clusters={self.n_clusters}: the tree is cut "
                f"among them; raise n_subclusters"
            )

    def _fit(self, X: np.ndarray) -> None:
        # 1. first level: subclusters (each image alone when there are few)
        if len(X) <= self.n_subclusters:
            sub_labels, centres = np.arange(len(X)), X.astype(np.float64)
        else:
            km = KMeans(self.n_subclusters, n_init=1, max_iter=100, random_state=self.random_state)
            sub_labels = km.fit(X).labels_
            used, sub_labels = np.unique(sub_labels, return_inverse=True)  # drop empty subclusters
            centres = km.cluster_centers_[used].astype(np.float64)
        sizes = np.bincount(sub_labels, minlength=len(centres)).astype(np.int64)
        # 2. linkage among the subclusters, then a cut at n_clusters
        self.linkage_matrix_ = lance_williams(centres, sizes, self.linkage)
        self.subcluster_labels_ = sub_labels.astype(np.int64)
        self.subcluster_sizes_ = sizes
        self.labels_ = self.cut(min(self.n_clusters, len(centres)))
        self.cluster_centers_ = cluster_means(X, self.labels_)

    def cut(self, n_clusters: int) -> np.ndarray:
        """Image labels at another number of clusters, from the same tree (no refitting).

        Args:
            n_clusters: K, at most the number of subclusters.

        Returns:
            int64 array (N,); clusters numbered in order of their first image.

        Raises:
            ImagerecError: ``n_clusters`` out of range.
        """
        n_leaves = len(self.linkage_matrix_) + 1
        n_clusters = check_n_clusters(n_clusters, n_leaves)
        leaf_cluster = cut_tree(self.linkage_matrix_, n_clusters)
        return leaf_cluster[self.subcluster_labels_]


def lance_williams(centres: np.ndarray, sizes: np.ndarray, linkage: str) -> np.ndarray:
    """Agglomerative linkage of weighted points with the Lance-Williams update.

    Args:
        centres: float array (m, D), m >= 2.
        sizes: int array (m,): the number of images each point stands for.
        linkage: ``"ward"``, ``"average"`` or ``"complete"``.

    Returns:
        float array (m - 1, 4): scipy's linkage matrix. For ward the height is
        ``sqrt(2 * increase in sum of squares)``, which for two single images is their distance,
        as in scipy.
    """
    m = len(centres)
    d2 = squared_distances(centres, centres)
    n = sizes.astype(np.float64)
    if linkage == "ward":
        dist = d2 * (n[:, None] * n[None, :]) / (n[:, None] + n[None, :])  # increase in sum of squares
    else:
        dist = np.sqrt(d2)
    np.fill_diagonal(dist, np.inf)
    node = np.arange(m)  # scipy node id held at each row
    active = np.ones(m, bool)
    Z = np.empty((m - 1, 4))
    for step in range(m - 1):
        i, j = np.unravel_index(np.argmin(dist), dist.shape)
        i, j = min(i, j), max(i, j)
        height = dist[i, j]
        # merge j into i: new distances from every other row to i
        if linkage == "ward":
            nk = n
            new = ((n[i] + nk) * dist[i] + (n[j] + nk) * dist[j] - nk * height) / (n[i] + n[j] + nk)
        elif linkage == "average":
            new = (n[i] * dist[i] + n[j] * dist[j]) / (n[i] + n[j])
        else:
            new = np.maximum(dist[i], dist[j])
        new[~active] = np.inf
        dist[i], dist[:, i] = new, new
        dist[i, i] = np.inf
        dist[j], dist[:, j] = np.inf, np.inf
        active[j] = False
        n[i] += n[j]
        Z[step] = (
            min(node[i], node[j]),
            max(node[i], node[j]),
            np.sqrt(2 * height) if linkage == "ward" else height,
            n[i],
        )
        node[i] = m + step
    return Z


def cut_tree(Z: np.ndarray, n_clusters: int) -> np.ndarray:
    """Leaf labels after the first ``m - n_clusters`` merges of a linkage matrix.

    Args:
        Z: float array (m - 1, 4), scipy's linkage format.
        n_clusters: K in [1, m].

    Returns:
        int64 array (m,), clusters numbered in order of their first leaf.
    """
    m = len(Z) + 1
    parent = np.arange(2 * m - 1)
    for step in range(m - n_clusters):
        a, b = int(Z[step, 0]), int(Z[step, 1])
        parent[a] = parent[b] = m + step
    while True:  # pointer jumping: every node ends up pointing at its top-most ancestor
        jumped = parent[parent]
        if np.array_equal(jumped, parent):
            break
        parent = jumped
    root = parent[:m]
    _, first, inverse = np.unique(root, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse]
