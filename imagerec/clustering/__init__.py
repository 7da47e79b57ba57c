"""Clustering: group images by what they show, without labels.

The layer after embedding: features come from :func:`~imagerec.embed` (or its ``.npz`` files),
are prepared by :class:`FeaturePipeline` (L2, PCA, whitening), and are clustered by estimators
that follow scikit-learn's protocol (``fit`` returns self, ``labels_``, ``fit_predict``,
``predict`` where it means something). :func:`cluster_images` does all of it and writes a run
folder with assignments, metrics, contact sheets, a map and an HTML gallery.

Methods (``cluster_images(method=...)``):

* ``kmeans``: :class:`KMeans` (scikit-learn; FAISS from :data:`FAISS_MIN_SAMPLES` images on
  where it is installed);
* ``minibatch_kmeans``: :class:`MiniBatchKMeans`;
* ``dbscan``: :class:`DBSCAN`, bounded memory, ``eps="auto"`` from the k-distance curve;
* ``hdbscan``: :class:`HDBSCAN` (scikit-learn's);
* ``agglomerative``: :class:`AgglomerativeClustering`, ward/average/complete linkage on the
  centroids of a first-level k-means, so 60,000 images fit in memory;
* ``deep``: :class:`DeepClustering`, a SCAN clustering head trained on frozen features.
"""

from ._api import ClusteringResult, cluster_images
from ._auto_k import KSelection, select_n_clusters
from ._checks import ClusteringWarning
from ._deep import DeepClustering
from ._density import DBSCAN, HDBSCAN, knee_point
from ._features import FeaturePipeline, l2_normalize, prepare_features
from ._hierarchy import AgglomerativeClustering
from ._kmeans import FAISS_MIN_SAMPLES, KMeans, MiniBatchKMeans
from ._methods import METHODS, make_estimator
from ._metrics import ari, cluster_accuracy, clustering_scores, neighbor_purity, nmi, purity, sampled_silhouette

__all__ = [
    "DBSCAN",
    "FAISS_MIN_SAMPLES",
    "HDBSCAN",
    "METHODS",
    "AgglomerativeClustering",
    "ClusteringResult",
    "ClusteringWarning",
    "DeepClustering",
    "FeaturePipeline",
    "KMeans",
    "KSelection",
    "MiniBatchKMeans",
    "ari",
    "cluster_accuracy",
    "cluster_images",
    "clustering_scores",
    "knee_point",
    "l2_normalize",
    "make_estimator",
    "neighbor_purity",
    "nmi",
    "prepare_features",
    "purity",
    "sampled_silhouette",
    "select_n_clusters",
]
