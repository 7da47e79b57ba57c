"""Clustering estimators, metrics and feature preparation: hand-computed toy cases, agreement
with scikit-learn and scipy where they compute the same thing, and every kind of bad input."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster, linkage
from sklearn.base import clone
from sklearn.cluster import DBSCAN as SkDBSCAN
from sklearn.datasets import make_blobs

import imagerec.clustering._kmeans as kmeans_module
from imagerec import ImagerecError, ImagerecWarning
from imagerec.clustering import (
    DBSCAN,
    FAISS_MIN_SAMPLES,
    HDBSCAN,
    METHODS,
    AgglomerativeClustering,
    ClusteringWarning,
    DeepClustering,
    FeaturePipeline,
    KMeans,
    ari,
    cluster_accuracy,
    knee_point,
    l2_normalize,
    make_estimator,
    neighbor_purity,
    nmi,
    prepare_features,
    purity,
    sampled_silhouette,
    select_n_clusters,
)

FAST = {"deep": {"epochs": 25, "self_label_epochs": 3, "n_heads": 2, "hidden_dim": 64}}  # seconds, not minutes


def blobs(n=240, centers=4, dim=8, std=0.6, seed=0):
    x, y = make_blobs(n, n_features=dim, centers=centers, cluster_std=std, center_box=(-10, 10), random_state=seed)
    return x.astype(np.float32), y


def estimator(method, k=4, **params):
    return make_estimator(method, k, {**FAST.get(method, {}), **params})


def same_partition(a, b) -> bool:
    """Whether two labelings group the images the same way (up to the clusters' numbering)."""
    pairs = set(zip(np.asarray(a).tolist(), np.asarray(b).tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# ---------------------------------------------------------------- metrics, by hand


def test_accuracy_uses_the_best_one_to_one_mapping():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([1, 1, 0, 0, 0, 2])  # best mapping 1->0, 0->1, 2->2: 5 of 6 right
    assert cluster_accuracy(y_true, y_pred) == pytest.approx(5 / 6)
    assert cluster_accuracy(y_true, (y_pred + 1) % 3) == pytest.approx(5 / 6)  # renaming clusters changes nothing
    assert cluster_accuracy(y_true, y_true) == 1.0


def test_purity_and_accuracy_differ_with_more_clusters_than_classes():
    y_true, y_pred = np.array([0, 0, 1, 1]), np.array([0, 1, 2, 3])
    assert purity(y_true, y_pred) == 1.0  # every cluster is pure ...
    assert cluster_accuracy(y_true, y_pred) == 0.5  # ... but only two clusters can map to a class


def test_ari_and_nmi_by_hand():
    y_true, y_pred = np.array([0, 0, 1, 1]), np.array([0, 0, 0, 1])
    # ARI: sum C(n_ij, 2) = 1, rows C(3,2)+C(1,2) = 3, columns 1+1 = 2, C(4,2) = 6:
    # expected 3*2/6 = 1, max (3+2)/2 = 2.5 -> (1 - 1) / (2.5 - 1) = 0
    assert ari(y_true, y_pred) == pytest.approx(0.0, abs=1e-12)
    mi = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    h_true, h_pred = math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert nmi(y_true, y_pred) == pytest.approx(mi / ((h_true + h_pred) / 2))
    assert ari(y_true, y_true) == nmi(y_true, y_true) == 1.0


def test_noise_counts_as_wrong_for_accuracy_and_purity():
    y_true, y_pred = np.array([0, 0, 1, 1]), np.array([0, 0, -1, 1])
    assert cluster_accuracy(y_true, y_pred) == 0.75
    assert purity(y_true, y_pred) == 0.75
    assert cluster_accuracy(y_true, np.full(4, -1)) == 0.0


def test_silhouette_by_hand():
    x = np.array([[0.0], [1.0], [10.0], [11.0]])
    # a = 1 everywhere; b = 10.5 for the outer points, 9.5 for the inner ones
    expected = (2 * (10.5 - 1) / 10.5 + 2 * (9.5 - 1) / 9.5) / 4
    assert sampled_silhouette(x, np.array([0, 0, 1, 1])) == pytest.approx(expected)
    assert sampled_silhouette(x, np.zeros(4, int)) is None  # one cluster: undefined
    # noise left out: 0 and 1 against 11 (10/11 and 9/10); a cluster of one image scores 0
    assert sampled_silhouette(x, np.array([0, 0, -1, 1])) == pytest.approx((10 / 11 + 9 / 10 + 0) / 3)


def test_neighbor_purity_by_hand():
    neighbors = np.array([[1, 2], [0, 2], [3, 0], [2, 1]])
    y = np.array([0, 0, 1, 1])
    assert neighbor_purity(neighbors, y) == pytest.approx(4 / 8)


def test_metrics_reject_mismatched_lengths():
    with pytest.raises(ImagerecError, match="y_true has 3 labels but y_pred has 2"):
        cluster_accuracy([0, 1, 1], [0, 1])


# ---------------------------------------------------------------- features


def test_l2_normalize_keeps_zero_rows():
    out = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]], np.float32))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])


def test_pca_whitening_gives_unit_variance():
    x, _ = blobs(300, dim=16)
    white = prepare_features(x, normalize=False, pca_dim=4, whiten=True)
    assert white.shape == (300, 4) and white.dtype == np.float32
    np.testing.assert_allclose(white.var(0, ddof=1), 1.0, rtol=1e-3)
    prepared = prepare_features(x, pca_dim=4)
    np.testing.assert_allclose(np.linalg.norm(prepared, axis=1), 1.0, rtol=1e-5)


def test_pipeline_transforms_new_features_like_the_fitted_ones():
    x, _ = blobs(200, dim=16)
    pipe = FeaturePipeline(pca_dim=5, whiten=True).fit(x)
    np.testing.assert_allclose(pipe.transform(x[:7]), pipe.fit_transform(x)[:7], atol=1e-5)
    assert FeaturePipeline(pca_dim=500).fit(x).n_features_out_ == 16  # capped at D: no PCA
    with pytest.raises(ImagerecError, match="fitted on 16"):
        pipe.transform(x[:, :3])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_infinite_features_are_refused(bad):
    x, _ = blobs(20)
    x[3, 1] = bad
    with pytest.raises(ImagerecError, match=r"1 row\(s\) with NaN or infinite values \(first: row 3\)"):
        prepare_features(x)
    with pytest.raises(ImagerecError, match="row 3"):
        KMeans(2).fit(x)


def test_features_must_be_two_dimensional():
    with pytest.raises(ImagerecError, match="must be 2-D"):
        KMeans(2).fit(np.zeros(10))


# ---------------------------------------------------------------- every method


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_recovers_separated_blobs(method):
    x, y = blobs()
    est = estimator(method, min_cluster_size=10) if method == "hdbscan" else estimator(method)
    assert est.fit(x) is est
    assert est.labels_.shape == (240,) and est.labels_.dtype == np.int64
    assert cluster_accuracy(y, est.labels_) >= 0.95
    assert est.n_clusters_ == 4
    np.testing.assert_array_equal(clone(est).fit_predict(x), est.labels_)  # get_params/clone round-trip, seeded


@pytest.mark.parametrize("method", ["kmeans", "minibatch_kmeans", "deep"])
def test_predict_agrees_with_fit_predict_up_to_label_order(method):
    x, _ = blobs()
    fit_labels = estimator(method, random_state=3).fit_predict(x)
    fitted = estimator(method, random_state=7).fit(x)
    assert same_partition(fitted.predict(x), fit_labels)
    np.testing.assert_array_equal(fitted.predict(x), fitted.labels_)


def test_kmeans_predicts_new_points_by_their_nearest_centre():
    x, _ = blobs()
    km = KMeans(4).fit(x)
    near = km.cluster_centers_ + 0.01
    np.testing.assert_array_equal(km.predict(near), np.arange(4))
    assert km.transform(near).shape == (4, 4)
    with pytest.raises(ImagerecError, match="fitted on 8"):
        km.predict(x[:, :2])


def test_density_methods_have_no_predict():
    assert not hasattr(DBSCAN(), "predict") and not hasattr(HDBSCAN(), "predict")
    assert not hasattr(AgglomerativeClustering(), "predict")


# ---------------------------------------------------------------- bad input, each method


@pytest.mark.parametrize("method", list(METHODS))
def test_a_single_image_is_a_clear_error(method):
    with pytest.raises(ImagerecError, match="n_samples=1 should be >= 2"):
        estimator(method, k=1).fit(np.ones((1, 4), np.float32))


@pytest.mark.parametrize("method", list(METHODS))
def test_identical_images_give_one_cluster_and_a_warning(method):
    x = np.tile(np.array([[0.5, -1.0, 2.0]], np.float32), (12, 1))
    est = estimator(method, k=3, **({"min_samples": 3} if method == "dbscan" else {}))
    with pytest.warns(ClusteringWarning, match="all 12 feature vectors are identical"):
        est.fit(x)
    assert est.labels_.tolist() == [0] * 12 and est.n_clusters_ == 1


@pytest.mark.parametrize("method", ["kmeans", "minibatch_kmeans", "agglomerative", "deep"])
def test_fewer_images_than_clusters_is_a_clear_error(method):
    x, _ = blobs(3)
    with pytest.raises(ImagerecError, match="n_samples=3 should be >= n_clusters=5"):
        estimator(method, k=5).fit(x)


@pytest.mark.parametrize("method", ["kmeans", "minibatch_kmeans", "agglomerative", "deep"])
@pytest.mark.parametrize("k", [0, -2, 2.5, "3", True])
def test_a_bad_number_of_clusters_is_a_clear_error(method, k):
    x, _ = blobs(20)
    with pytest.raises(ImagerecError, match="n_clusters="):
        estimator(method, k=k).fit(x)


@pytest.mark.parametrize("method", ["kmeans", "minibatch_kmeans", "agglomerative", "deep"])
def test_one_cluster_warns_and_puts_every_image_in_it(method):
    x, _ = blobs(20)
    est = estimator(method, k=1)
    with pytest.warns(ClusteringWarning, match="n_clusters=1 puts all 20 images in one cluster"):
        est.fit(x)
    assert set(est.labels_.tolist()) == {0}
    np.testing.assert_allclose(est.cluster_centers_[0], x.mean(0), rtol=1e-5)
    if hasattr(est, "predict"):
        assert set(est.predict(x).tolist()) == {0}


def test_fewer_distinct_images_than_clusters_warns():
    x = np.repeat(np.eye(3, dtype=np.float32), 5, axis=0)  # 15 images, 3 distinct
    with pytest.warns(ClusteringWarning, match="found 3 non-empty clusters of the n_clusters=5"):
        km = KMeans(5).fit(x)
    assert km.n_clusters_ == 3


def test_clustering_warning_is_an_imagerec_warning():
    assert issubclass(ClusteringWarning, ImagerecWarning)


def test_unknown_method_or_parameter_lists_the_valid_ones():
    with pytest.raises(ImagerecError, match="is not one of kmeans, minibatch_kmeans, dbscan"):
        make_estimator("spectral", 3)
    with pytest.raises(ImagerecError, match="'eps' is not a parameter of method 'kmeans'; its parameters are .*n_init"):
        make_estimator("kmeans", 3, {"eps": 0.5})


# ---------------------------------------------------------------- k-means backends


def test_kmeans_picks_faiss_only_for_large_collections_and_falls_back(monkeypatch):
    monkeypatch.setattr(kmeans_module, "import_faiss", lambda: object())
    assert KMeans()._resolve_backend(FAISS_MIN_SAMPLES) == "faiss"
    assert KMeans()._resolve_backend(FAISS_MIN_SAMPLES - 1) == "sklearn"
    assert KMeans(backend="sklearn")._resolve_backend(10**7) == "sklearn"
    monkeypatch.setattr(kmeans_module, "import_faiss", lambda: None)
    assert KMeans()._resolve_backend(10**7) == "sklearn"
    with pytest.raises(ImagerecError, match="pip install faiss-cpu"):
        KMeans(2, backend="faiss").fit(blobs(20)[0])


def test_faiss_kmeans_finds_the_blobs():
    pytest.importorskip("faiss")
    x, y = blobs()
    km = KMeans(4, backend="faiss").fit(x)
    assert km.backend_ == "faiss" and cluster_accuracy(y, km.labels_) == 1.0
    np.testing.assert_array_equal(km.predict(x), km.labels_)


# ---------------------------------------------------------------- DBSCAN


def blobs_and_noise(seed=0):
    x, y = blobs(300, centers=3, dim=2, std=0.4, seed=seed)
    rng = np.random.default_rng(seed)
    noise = rng.uniform(-14, 14, (30, 2)).astype(np.float32)
    return np.concatenate([x, noise]), np.concatenate([y, np.full(30, -1)])


@pytest.mark.parametrize("eps, min_samples", [(0.5, 5), (0.8, 10), (0.3, 3)])
def test_dbscan_matches_scikit_learn(eps, min_samples):
    x, _ = blobs_and_noise()
    ours = DBSCAN(eps, min_samples=min_samples).fit(x)
    theirs = SkDBSCAN(eps=eps, min_samples=min_samples).fit(x)
    np.testing.assert_array_equal(np.sort(ours.core_sample_indices_), np.sort(theirs.core_sample_indices_))
    core = ours.core_sample_indices_
    assert same_partition(ours.labels_[core], theirs.labels_[core])
    np.testing.assert_array_equal(ours.labels_ == -1, theirs.labels_ == -1)  # the same noise


def test_dbscan_blocks_of_one_row_give_the_same_result():
    x, _ = blobs_and_noise(seed=1)
    whole = DBSCAN(0.6, min_samples=5).fit(x)
    tiny = DBSCAN(0.6, min_samples=5, working_memory=1e-6).fit(x)  # one row per block: many merges
    np.testing.assert_array_equal(tiny.labels_, whole.labels_)


def test_dbscan_eps_auto_finds_blobs_and_noise():
    x, y = blobs_and_noise()
    db = DBSCAN("auto", min_samples=5).fit(x)
    assert db.n_clusters_ == 3
    assert cluster_accuracy(y[y >= 0], db.labels_[y >= 0]) >= 0.95
    assert np.mean(db.labels_[y == -1] == -1) >= 0.8  # most scattered points are noise
    assert db.eps_ == pytest.approx(np.sort(db.k_distances_)[knee_point(np.sort(db.k_distances_))])


def test_knee_point_by_hand():
    # x - y_normalised: [0, .143, .286, .429, .571, .603, .413, 0] -> index 5
    assert knee_point(np.array([1, 1, 1, 1, 1, 2, 5, 10], float)) == 5
    assert knee_point(np.ones(6)) == 5  # flat: the last point


def test_dbscan_all_noise_warns():
    x, _ = blobs(50)
    with pytest.warns(ClusteringWarning, match="marked all 50 images as noise"):
        db = DBSCAN(1e-4, min_samples=3).fit(x)
    assert (db.labels_ == -1).all() and db.n_clusters_ == 0


@pytest.mark.parametrize(
    "params, message",
    [
        ({"eps": 0}, "eps=0 must be > 0"),
        ({"eps": "big"}, "eps='big' must be a number"),
        ({"min_samples": 1}, "min_samples=1 must be >= 2"),
        ({"min_samples": 40}, "min_samples=40 should be <= n_samples=30"),
    ],
)
def test_dbscan_bad_parameters(params, message):
    with pytest.raises(ImagerecError, match=message):
        DBSCAN(**params).fit(blobs(30)[0])


def test_hdbscan_membership_and_bad_sizes():
    x, y = blobs()
    hd = HDBSCAN(10).fit(x)
    assert ((hd.probabilities_ >= 0) & (hd.probabilities_ <= 1)).all()
    with pytest.raises(ImagerecError, match="min_cluster_size=50 should be <= n_samples=30"):
        HDBSCAN(50).fit(x[:30])


# ---------------------------------------------------------------- agglomerative


@pytest.mark.parametrize("method", ["ward", "average", "complete"])
def test_exact_linkage_matches_scipy(method):
    x, _ = blobs(60, centers=3, dim=5, std=2.0)
    ours = AgglomerativeClustering(3, linkage=method).fit(x)
    reference = linkage(x.astype(np.float64), method=method)
    np.testing.assert_allclose(np.sort(ours.linkage_matrix_[:, 2]), np.sort(reference[:, 2]), rtol=1e-6)
    np.testing.assert_array_equal(ours.linkage_matrix_[-1, 3], 60)
    assert same_partition(ours.labels_, fcluster(reference, 3, criterion="maxclust"))
    assert same_partition(ours.cut(5), fcluster(reference, 5, criterion="maxclust"))


def test_agglomerative_on_subclusters_keeps_memory_small():
    x, y = blobs(600, centers=5)
    agg = AgglomerativeClustering(5, n_subclusters=40).fit(x)
    assert agg.linkage_matrix_.shape == (39, 4)  # a 40 x 40 problem, not 600 x 600
    assert agg.subcluster_sizes_.sum() == 600
    assert cluster_accuracy(y, agg.labels_) == 1.0
    assert len(np.unique(agg.cut(8))) == 8
    with pytest.raises(ImagerecError, match="n_subclusters=3 should be >= n_clusters=5"):
        AgglomerativeClustering(5, n_subclusters=3).fit(x)
    with pytest.raises(ImagerecError, match="linkage='single' is not one of"):
        AgglomerativeClustering(5, linkage="single").fit(x)


# ---------------------------------------------------------------- deep clustering head


def test_deep_clustering_is_reproducible_and_probabilistic():
    x, y = blobs(200, centers=3, dim=16, std=1.5)
    a = estimator("deep", k=3, random_state=1).fit(x)
    b = estimator("deep", k=3, random_state=1).fit(x)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    np.testing.assert_array_equal(a.predict_proba(x), b.predict_proba(x))
    proba = a.predict_proba(x)
    assert proba.shape == (200, 3)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(a.probabilities_, proba.max(1), rtol=1e-5)
    assert cluster_accuracy(y, a.labels_) >= 0.95
    assert a.neighbors_.shape == (200, 20) and neighbor_purity(a.neighbors_, y) > 0.95
    assert [h["phase"] for h in a.history_].count("self-label") == 3


def test_deep_linear_head_and_no_self_labelling():
    x, y = blobs(200, centers=3, dim=16, std=1.5)
    est = DeepClustering(3, hidden_dim=0, epochs=30, self_label_epochs=0).fit(x)
    assert cluster_accuracy(y, est.labels_) >= 0.95
    assert all(h["phase"] == "scan" for h in est.history_)


def test_deep_without_confident_images_warns_and_skips_self_labelling():
    x, _ = blobs(100, centers=3, dim=16, std=1.5)
    with pytest.warns(ClusteringWarning, match="no image reached confidence=0.999999"):
        DeepClustering(3, epochs=1, self_label_epochs=2, confidence=0.999999, hidden_dim=16, n_heads=1).fit(x)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"confidence": 1.0}, "confidence=1.0 must be below 1"),
        ({"n_neighbors": 0}, "n_neighbors=0 must be >= 1"),
        ({"batch_size": 1}, "batch_size=1 must be >= 2"),
        ({"device": "tpu"}, "device 'tpu' is not one of"),
    ],
)
def test_deep_bad_parameters(params, message):
    with pytest.raises(ImagerecError, match=message):
        DeepClustering(3, **params).fit(blobs(30)[0])


# ---------------------------------------------------------------- k="auto"


@pytest.mark.parametrize("method", ["kmeans", "agglomerative"])
def test_auto_k_finds_the_number_of_blobs_and_scores_every_candidate(method):
    x, _ = blobs(300, centers=5)
    selection = select_n_clusters(x, method=method, k_range=(2, 8))
    assert selection.best_k == 5
    assert [s["k"] for s in selection.scores] == list(range(2, 9))
    assert all(
        s["silhouette"] is not None and s["calinski_harabasz"] > 0 and s["davies_bouldin"] > 0 for s in selection.scores
    )
    best = max(selection.scores, key=lambda s: s["silhouette"])
    assert best["k"] == 5
    lines = selection.table().splitlines()
    assert len(lines) == 8 and lines[4].rstrip().endswith("*")


def test_auto_k_caps_the_range_at_the_number_of_images():
    x, _ = blobs(6, centers=2)
    assert [s["k"] for s in select_n_clusters(x, k_range=(2, 15)).scores] == [2, 3, 4, 5]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k_range": (1, 5)}, "needs 2 <= low <= high"),
        ({"k_range": (5, 3)}, "needs 2 <= low <= high"),
        ({"k_range": "many"}, "must be two whole numbers"),
        ({"method": "dbscan"}, "finds the number of clusters itself"),
    ],
)
def test_auto_k_bad_arguments(kwargs, message):
    with pytest.raises(ImagerecError, match=message):
        select_n_clusters(blobs(30)[0], **kwargs)


@pytest.mark.parametrize("method", ["kmeans", "agglomerative"])
def test_auto_k_on_identical_images_scores_nothing_and_does_not_crash(method):
    selection = select_n_clusters(np.ones((10, 3), np.float32), method=method, k_range=(2, 4))
    assert selection.best_k == 2 and all(s["found"] == 1 and s["silhouette"] is None for s in selection.scores)


def test_auto_k_with_too_few_images():
    with pytest.raises(ImagerecError, match="n_samples=2 should be >= 3"):
        select_n_clusters(blobs(2)[0])


def test_no_scikit_learn_warning_escapes_on_degenerate_input():
    x = np.repeat(np.eye(2, dtype=np.float32), 4, axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # anything but our own warning fails the test
        warnings.simplefilter("default", ClusteringWarning)
        for method in METHODS:
            estimator(
                method,
                k=3,
                **(
                    {"min_samples": 2} if method == "dbscan" else {"min_cluster_size": 2} if method == "hdbscan" else {}
                ),
            ).fit(x)
