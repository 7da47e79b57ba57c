"""cluster_images: the run folder (assignments, summary, pictures, gallery, manifest), where the
features come from (Embeddings, .npz, images embedded and cached), and bad input."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import make_blobs

import imagerec.features._cache as features_module  # where the feature stage calls embed
from imagerec import Embeddings, ImagerecError, Preprocessing, create_backbone, embed, load_images
from imagerec.clustering import ClusteringWarning, cluster_images
from imagerec.clustering._features import FlipAveraged

from .conftest import make_colour_dataset, make_image

FAST_DEEP = {"epochs": 25, "self_label_epochs": 3, "n_heads": 2, "hidden_dim": 64}


@pytest.fixture
def blob_embeddings(tmp_path) -> Embeddings:
    """60 real image files whose "features" are 3 separated Gaussian blobs, labelled."""
    x, y = make_blobs(60, n_features=12, centers=3, cluster_std=0.5, center_box=(-10, 10), random_state=0)
    paths = [str(make_image(tmp_path / "imgs" / f"{i:03d}.png", seed=i)) for i in range(60)]
    return Embeddings(
        x.astype(np.float32),
        paths,
        y.astype(np.int64),
        ["a", "b", "c"],
        "synthetic",
        Preprocessing(32, (0.5,) * 3, (0.5,) * 3),
    )


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_run_folder_of_kmeans(blob_embeddings, tmp_path):
    run = tmp_path / "run"
    result = cluster_images(blob_embeddings, "kmeans", 3, out=run, map_method="pca", export_manifest=True)
    # assignments: one row per image, the columns the issue names
    rows = read_csv(run / "assignments.csv")
    assert len(rows) == 60 and list(rows[0]) == ["path", "cluster", "distance", "probability", "outlier", "true_label"]
    assert {r["cluster"] for r in rows} == {"cluster_00", "cluster_01", "cluster_02"}
    assert all(float(r["distance"]) >= 0 and r["outlier"] in ("0", "1") and r["probability"] == "" for r in rows)
    assert [r["cluster"] for r in rows] == [result.names[v] for v in result.labels]
    # summary: counts and, with known classes, the metrics
    summary = json.loads((run / "summary.json").read_text())
    assert summary["n_clusters"] == 3 and sum(summary["sizes"].values()) == 60 and summary["noise_fraction"] == 0
    assert summary["acc"] == summary["nmi"] == summary["ari"] == summary["purity"] == 1.0
    assert summary["silhouette"] > 0.5 and summary["config"]["k"] == 3
    # pictures: one contact sheet per cluster, the map
    sheets = sorted(p.name for p in (run / "clusters").iterdir())
    assert sheets == ["cluster_00.png", "cluster_01.png", "cluster_02.png"]
    with Image.open(run / "clusters" / "cluster_00.png") as sheet, Image.open(run / "map.png") as picture:
        assert sheet.format == picture.format == "PNG" and sheet.width >= 5 * 96
    # the gallery is one file: every picture is a data URI, nothing is fetched
    page = (run / "gallery.html").read_text()
    assert page.count("src='data:image/jpeg;base64,") == 60 and page.count("src='data:image/png;base64,") == 1
    assert not re.search(r"(src|href)=['\"](?!data:|#)", page)
    # the manifest reads back as a labelled data set: one class per cluster
    source = load_images(run / "manifest.csv")
    assert source.classes == ["cluster_00", "cluster_01", "cluster_02"]
    by_path = dict(zip(source.paths, (source.classes[i] for i in source.labels)))
    assert all(by_path[p] == result.names[v] for p, v in zip(result.paths, result.labels))


def test_contact_sheet_starts_with_the_image_nearest_the_centre(blob_embeddings, tmp_path):
    result = cluster_images(blob_embeddings, "kmeans", 3, out=tmp_path / "run", map_method="pca")
    members = result.members(0)
    assert result.distances[members[0]] == result.distances[result.labels == 0].min()
    assert (np.diff(result.distances[members]) >= 0).all()
    with Image.open(tmp_path / "run" / "clusters" / "cluster_00.png") as sheet:
        first_tile = np.asarray(sheet.convert("RGB"))[26 : 26 + 96, 4 : 4 + 96]
    with Image.open(result.paths[members[0]]) as image:  # 32 px upscaled to 96 px
        expected = np.asarray(image.convert("RGB").resize((96, 96), Image.Resampling.BICUBIC))
    assert np.abs(first_tile.astype(int) - expected.astype(int)).mean() < 2


@pytest.mark.parametrize(
    "method, k, params",
    [
        ("minibatch_kmeans", 3, {}),
        ("dbscan", None, {"min_samples": 4}),
        ("hdbscan", None, {"min_cluster_size": 5}),
        ("agglomerative", 3, {"linkage": "average"}),
        ("deep", 3, FAST_DEEP),
    ],
)
def test_every_method_writes_a_run_folder(blob_embeddings, tmp_path, method, k, params):
    run = tmp_path / method
    result = cluster_images(blob_embeddings, method, k, params=params, out=run, map_method="pca")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == method and summary["acc"] >= 0.95
    assert len(list((run / "clusters").glob("cluster_*.png"))) == summary["n_clusters"] == 3
    assert (run / "gallery.html").is_file() and (run / "map.png").is_file()
    assert (run / "dendrogram.png").is_file() == (method == "agglomerative")
    assert (run / "k_distance.png").is_file() == (method == "dbscan")
    rows = read_csv(run / "assignments.csv")
    if method in ("deep", "hdbscan"):
        assert all(0 <= float(r["probability"]) <= 1 for r in rows)
    if method == "deep":
        assert summary["neighbor_purity"] == pytest.approx(19 / 20)  # 20 neighbours, 19 others in each blob
        assert (np.diff(result.probabilities[result.members(0)]) <= 0).all()  # most probable first


def test_auto_k_writes_and_returns_every_candidates_score(blob_embeddings, tmp_path):
    result = cluster_images(blob_embeddings, "kmeans", "auto", k_range=(2, 6), out=tmp_path / "run", map_method="pca")
    assert result.k_selection.best_k == 3 == result.n_clusters
    rows = read_csv(tmp_path / "run" / "k_selection.csv")
    assert [int(r["k"]) for r in rows] == [2, 3, 4, 5, 6]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [s["k"] for s in summary["k_selection"]["scores"]] == [2, 3, 4, 5, 6]


def test_deep_auto_k_is_scored_with_kmeans(blob_embeddings):
    result = cluster_images(blob_embeddings, "deep", None, params=FAST_DEEP, k_range=(2, 5))
    assert result.k_selection.scored_with == "kmeans" and result.n_clusters == 3 and result.run_dir is None


def test_tsne_map_on_a_sample(blob_embeddings, tmp_path):
    cluster_images(blob_embeddings, "kmeans", 3, out=tmp_path / "run", map_method="tsne", map_sample=40)
    with Image.open(tmp_path / "run" / "map.png") as picture:
        assert picture.width > 300


def test_noise_is_flagged_and_left_out_of_the_manifest(blob_embeddings, tmp_path):
    far = np.full((1, 12), 100.0, np.float32)
    emb = Embeddings(
        np.concatenate([blob_embeddings.features, far]),
        blob_embeddings.paths + [blob_embeddings.paths[0]],
        None,
        None,
        "synthetic",
        blob_embeddings.preprocessing,
    )
    run = tmp_path / "run"
    with pytest.warns(ClusteringWarning, match="leaves out 1 image"):
        result = cluster_images(
            emb, "dbscan", params={"min_samples": 4}, out=run, map_method="pca", export_manifest=True, pca_dim=None
        )
    assert result.labels[-1] == -1 and result.outliers[-1] and np.isnan(result.distances[-1])
    assert read_csv(run / "assignments.csv")[-1]["cluster"] == "noise"
    assert (run / "clusters" / "noise.png").is_file()
    assert len(read_csv(run / "manifest.csv")) == 60
    summary = json.loads((run / "summary.json").read_text())
    assert summary["noise_fraction"] == pytest.approx(1 / 61) and "acc" not in summary  # unlabelled


def test_embeddings_file_as_input(blob_embeddings, tmp_path):
    blob_embeddings.save(tmp_path / "e.npz")
    result = cluster_images(str(tmp_path / "e.npz"), "kmeans", 3)
    assert result.summary["acc"] == 1.0 and result.paths == blob_embeddings.paths


def test_images_are_embedded_once_and_the_cache_reused(tmp_path, monkeypatch):
    data = make_colour_dataset(tmp_path / "colours", per_class=8)
    run = tmp_path / "run"
    first = cluster_images(data, "kmeans", 3, out=run, image_size=64, map_method="pca", progress=False)
    assert (run / "embeddings.npz").is_file() and first.summary["features"]["input_dim"] == 1280
    assert first.summary["acc"] >= 0.9  # red, green and blue images
    monkeypatch.setattr(features_module, "embed", lambda *a, **k: pytest.fail("the cached embeddings were not reused"))
    again = cluster_images(data, "kmeans", 3, out=run, image_size=64, map_method="pca", progress=False)
    np.testing.assert_array_equal(again.labels, first.labels)
    with Image.open(run / "clusters" / "cluster_00.png") as sheet:  # real thumbnails, not blank tiles
        tile = np.asarray(sheet.convert("RGB"))[26 : 26 + 96, 4 : 4 + 96]
    assert tile.std() > 5


def test_flip_averaged_embedding_is_mirror_symmetric(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels[:, ::-1].copy()).save(tmp_path / "b.png")
    torch.manual_seed(0)
    backbone = create_backbone("seed_cnn", num_classes=0)
    model = FlipAveraged(backbone)
    assert model.backbone_name == "seed_cnn+flip"
    flipped = embed(tmp_path, model, progress=False)
    np.testing.assert_allclose(flipped.features[0], flipped.features[1], atol=1e-5)
    plain = embed(tmp_path, backbone, progress=False)
    assert not np.allclose(plain.features[0], plain.features[1], atol=1e-4)
    np.testing.assert_allclose(flipped.features[0], plain.features.mean(0), atol=1e-5)  # the mean of both views


# ---------------------------------------------------------------- bad input


def test_nan_features_name_the_image(blob_embeddings):
    blob_embeddings.features[7, 2] = np.nan
    with pytest.raises(ImagerecError, match=r"1 image\(s\) have NaN or infinite features \(first: .*007\.png\)"):
        cluster_images(blob_embeddings, "kmeans", 3)


def test_a_bare_array_is_refused_with_the_way_out():
    with pytest.raises(ImagerecError, match="wrap it as Embeddings"):
        cluster_images(np.zeros((5, 3)), "kmeans", 2)


def test_a_single_image(blob_embeddings):
    one = Embeddings(
        blob_embeddings.features[:1], blob_embeddings.paths[:1], None, None, "synthetic", blob_embeddings.preprocessing
    )
    with pytest.raises(ImagerecError, match="n_samples=1 should be >= 2"):
        cluster_images(one, "kmeans", 2)


def test_more_clusters_than_images(blob_embeddings):
    with pytest.raises(ImagerecError, match="n_samples=60 should be >= n_clusters=100"):
        cluster_images(blob_embeddings, "kmeans", 100)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "kmeans", "k": 0}, "n_clusters=0 must be at least 1"),
        ({"method": "kmeans", "k": "ten"}, "k='ten' must be a whole number"),
        ({"method": "dbscan", "k": 3}, "finds the number of clusters itself; drop k=3"),
        ({"method": "tsne"}, "method='tsne' is not one of"),
        ({"method": "kmeans", "params": {"eps": 1}}, "'eps' is not a parameter of method 'kmeans'"),
        ({"method": "kmeans", "pca_dim": 0}, "pca_dim=0 must be >= 1"),
        ({"method": "dbscan", "params": {"eps": -1}}, "eps=-1 must be > 0"),
        ({"method": "deep", "k": 3, "params": {"confidence": 2}}, "confidence=2 must be below 1"),
        ({"method": "kmeans", "map_method": "umap"}, "map_method='umap' is not one of"),
        ({"method": "kmeans", "k": "auto", "k_range": (1, 4)}, "needs 2 <= low <= high"),
    ],
)
def test_bad_arguments_fail_before_any_work(kwargs, message, monkeypatch):
    monkeypatch.setattr(features_module, "embed", lambda *a, **k: pytest.fail("embedded before validating"))
    with pytest.raises(ImagerecError, match=re.escape(message)):
        cluster_images("does/not/matter", **kwargs)


def test_k_one_warns_and_still_writes_a_run(blob_embeddings, tmp_path):
    with pytest.warns(ClusteringWarning, match="n_clusters=1"):
        result = cluster_images(blob_embeddings, "kmeans", 1, out=tmp_path / "run", map_method="pca")
    assert result.n_clusters == 1 and result.summary["silhouette"] is None
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["silhouette"] is None


def test_identical_images_warn(tmp_path, blob_embeddings):
    same = Embeddings(
        np.ones((10, 5), np.float32), blob_embeddings.paths[:10], None, None, "synthetic", blob_embeddings.preprocessing
    )
    with pytest.warns(ClusteringWarning, match="all 10 feature vectors are identical"):
        result = cluster_images(same, "agglomerative", 3, out=tmp_path / "run", map_method="pca")
    assert result.n_clusters == 1 and (tmp_path / "run" / "gallery.html").is_file()


def test_out_must_be_a_folder(blob_embeddings, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ImagerecError, match="is a file; give a folder"):
        cluster_images(blob_embeddings, "kmeans", 3, out=tmp_path / "file")


def test_deep_method_trains_on_the_requested_device_and_restores_torch_threads(blob_embeddings):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = cluster_images(blob_embeddings, "deep", 3, params=FAST_DEEP, device="cpu")
        assert result.estimator.device == "cpu" and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
