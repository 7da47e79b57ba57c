"""pca_dim="auto" chooses the preparation by the number of images (issue 14, goal 5): 32
components below 5,000 images, 128 from 5,000 on; the density methods always 32."""

from __future__ import annotations

import numpy as np
import pytest

from imagerec import Embeddings, ImagerecError, Preprocessing
from imagerec.clustering import cluster_images
from imagerec.features import FeaturePipeline, compute_features


def _features(n: int, d: int = 160, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


@pytest.mark.parametrize(("n", "expected"), [(480, 32), (4_999, 32), (5_000, 128), (50_000, 128)])
def test_auto_pca_dim_by_number_of_images(n, expected):
    pipe = FeaturePipeline(pca_dim="auto").fit(_features(n, d=8 if n > 5_000 else 160))
    assert pipe.pca_dim_ == expected
    if n <= 5_000:  # D = 160 > 128: the components really are cut to the resolved number
        assert pipe.n_features_out_ == expected


def test_explicit_pca_dim_is_kept_whatever_n():
    assert FeaturePipeline(pca_dim=128).fit(_features(480)).n_features_out_ == 128
    assert FeaturePipeline(pca_dim=None).fit(_features(480)).n_features_out_ == 160


@pytest.mark.parametrize("bad", ["full", 0, 2.5])
def test_bad_pca_dim_names_auto(bad):
    with pytest.raises(ImagerecError, match="pca_dim"):
        FeaturePipeline(pca_dim=bad).fit(_features(20))
    with pytest.raises(ImagerecError, match="pca_dim"):
        compute_features(_embeddings(20), pca_dim=bad, progress=False)


def _embeddings(n: int) -> Embeddings:
    labels = np.arange(n) % 3
    x = _features(n) + 6.0 * np.eye(160, dtype=np.float32)[labels]  # three separated classes
    return Embeddings(
        x, [f"img{i}.png" for i in range(n)], labels.astype(np.int64), ["a", "b", "c"], "synthetic",
        Preprocessing(32, (0.5,) * 3, (0.5,) * 3),
    )  # fmt: skip


def test_cluster_images_records_the_resolved_pca_dim():
    small = cluster_images(_embeddings(480), "kmeans", 3, map_method="pca", progress=False)
    assert small.summary["config"]["pca_dim"] == 32
    assert small.summary["features"]["dim"] == 32
    assert small.summary["acc"] == 1.0
    density = cluster_images(_embeddings(480), "hdbscan", map_method="pca", progress=False)
    assert density.summary["config"]["pca_dim"] == 32
    explicit = cluster_images(_embeddings(480), "kmeans", 3, pca_dim=128, progress=False)
    assert explicit.summary["config"]["pca_dim"] == 128
    assert explicit.summary["features"]["dim"] == 128
