"""Clustering metrics: against known classes (ACC, NMI, ARI, purity) and label-free (silhouette).

Conventions for noise (label -1, from DBSCAN and HDBSCAN): ACC and purity count noise images
as wrong (they are in no cluster); NMI and ARI see noise as one more cluster, as scikit-learn
does when given the labels as they are.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

from ..errors import ImagerecError


def _pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if len(y_true) != len(y_pred):
        raise ImagerecError(f"y_true has {len(y_true)} labels but y_pred has {len(y_pred)}; pass one of each per image")
    if len(y_true) == 0:
        raise ImagerecError("y_true and y_pred are empty; pass one label of each per image")
    return y_true, y_pred


def contingency(y_true, y_pred) -> np.ndarray:
    """Counts of each (cluster, class) pair, noise left out.

    Returns:
        int64 array (n_clusters, n_classes), rows and columns in sorted label order.
    """
    y_true, y_pred = _pair(y_true, y_pred)
    kept = y_pred >= 0
    _, t = np.unique(y_true, return_inverse=True)
    clusters, p = np.unique(y_pred[kept], return_inverse=True)
    table = np.zeros((len(clusters), int(t.max()) + 1), np.int64)
    np.add.at(table, (p, t[kept]), 1)
    return table


def cluster_accuracy(y_true, y_pred) -> float:
    """ACC: the share of images whose cluster maps to their class under the best one-to-one
    mapping of clusters to classes (Hungarian matching, ``scipy.optimize.linear_sum_assignment``).

    Clusters left without a class (more clusters than classes), and noise, count as wrong.

    Args:
        y_true: int array (N,) of classes.
        y_pred: int array (N,) of clusters; -1 for noise.

    Returns:
        ACC in [0, 1].
    """
    y_true, _ = _pair(y_true, y_pred)
    table = contingency(y_true, y_pred)
    if table.size == 0:
        return 0.0
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / len(y_true))


def purity(y_true, y_pred) -> float:
    """The share of images that belong to the most common class of their cluster (noise: wrong).

    Args:
        y_true: int array (N,) of classes.
        y_pred: int array (N,) of clusters; -1 for noise.

    Returns:
        Purity in [0, 1]; 1 for one cluster per image, so read it beside the number of clusters.
    """
    y_true, _ = _pair(y_true, y_pred)
    table = contingency(y_true, y_pred)
    return float(table.max(1).sum() / len(y_true)) if table.size else 0.0


def nmi(y_true, y_pred) -> float:
    """Normalised mutual information (arithmetic-mean normalisation, scikit-learn's default).

    Returns:
        NMI in [0, 1].
    """
    return float(normalized_mutual_info_score(*_pair(y_true, y_pred)))


def ari(y_true, y_pred) -> float:
    """Adjusted Rand index: 1 for identical partitions, about 0 for random ones (can be < 0)."""
    return float(adjusted_rand_score(*_pair(y_true, y_pred)))


def clustering_scores(y_true, y_pred) -> dict[str, float]:
    """``{"acc", "nmi", "ari", "purity"}`` of a clustering against known classes."""
    return {
        "acc": cluster_accuracy(y_true, y_pred),
        "nmi": nmi(y_true, y_pred),
        "ari": ari(y_true, y_pred),
        "purity": purity(y_true, y_pred),
    }


def sampled_silhouette(
    features: np.ndarray, labels, sample_size: int = 5000, random_state: int | None = 0
) -> float | None:
    """Mean silhouette coefficient on a random sample (it costs O(n^2) on n images).

    Noise (label -1) is left out.

    Args:
        features: float array (N, D).
        labels: int array (N,).
        sample_size: images scored at most.
        random_state: seed of the sample.

    Returns:
        The silhouette in [-1, 1], or None where it is undefined (fewer than 2 clusters, or as
        many clusters as images).
    """
    labels = np.asarray(labels)
    kept = np.flatnonzero(labels >= 0)
    if len(kept) > sample_size:
        kept = np.sort(np.random.default_rng(random_state).choice(kept, sample_size, replace=False))
    n_labels = len(np.unique(labels[kept]))
    if n_labels < 2 or n_labels >= len(kept):
        return None
    return float(silhouette_score(features[kept], labels[kept]))


def neighbor_purity(neighbors: np.ndarray, y_true) -> float:
    """The share of mined neighbours that share the image's class: how much a neighbour-based
    method (SCAN) can trust its neighbours.

    Args:
        neighbors: int array (N, k) of neighbour indices.
        y_true: int array (N,) of classes.

    Returns:
        A share in [0, 1] (nan with no neighbours).
    """
    y_true = np.asarray(y_true)
    if neighbors.size == 0:
        return float("nan")
    return float(np.mean(y_true[neighbors] == y_true[:, None]))
