"""``cluster_images``: from images (or their embeddings) to a run folder of clusters."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from .._io import write_text_atomic
from .._lock import run_lock
from .._version import __version__
from ..data import DEFAULT_MAX_PIXELS, ImageSource, load_images
from ..embedding import Embeddings
from ..errors import ImagerecError
from ..features import FeaturePipeline, compute_features, is_embeddings_file
from . import _report as report
from ._auto_k import DEFAULT_K_RANGE, KSelection, check_k_range, select_n_clusters
from ._base import BaseClustering, cluster_means
from ._checks import check_n_clusters, check_n_samples, check_positive, warn
from ._methods import K_METHODS, check_method, make_estimator
from ._metrics import clustering_scores, neighbor_purity, sampled_silhouette

AUTO_PCA_DIM = {"dbscan": 32, "hdbscan": 32}  # density estimates need few dimensions, at any N
MAP_METHODS = ("tsne", "pca")


@dataclass
class ClusteringResult:
    """The clusters of a set of images.

    Attributes:
        labels: int64 array (N,): each image's cluster; -1 is noise (DBSCAN, HDBSCAN).
        paths: the image of each row.
        names: ``{label: name}``, e.g. ``{0: "cluster_00", -1: "noise"}``.
        distances: float array (N,): distance to the cluster's centre (mean of its images) in the
            prepared feature space; NaN for noise.
        probabilities: float array (N,) of membership (HDBSCAN) or cluster probability (deep),
            or None.
        outliers: bool array (N,): noise, or farther from the centre than the cluster's
            Q3 + 1.5 IQR (Tukey's fence).
        summary: what ``summary.json`` holds.
        estimator: the fitted estimator.
        pipeline: the fitted feature preparation (``pipeline.transform`` new features for
            ``estimator.predict``).
        features: float32 array (N, d): the prepared features that were clustered.
        k_selection: the candidates' scores with ``k="auto"``, else None.
        run_dir: the run folder, or None.
    """

    labels: np.ndarray
    paths: list[str]
    names: dict[int, str]
    distances: np.ndarray
    probabilities: np.ndarray | None
    outliers: np.ndarray
    summary: dict
    estimator: BaseClustering
    pipeline: FeaturePipeline
    features: np.ndarray
    k_selection: KSelection | None
    run_dir: Path | None

    @property
    def n_clusters(self) -> int:
        return int(self.summary["n_clusters"])

    def members(self, label: int) -> np.ndarray:
        """Indices of a cluster's images, the most typical first (nearest the centre, or most
        probable for the deep method)."""
        idx = np.flatnonzero(self.labels == label)
        key = (
            -self.probabilities[idx]
            if self.summary["method"] == "deep" and self.probabilities is not None
            else self.distances[idx]
        )
        return idx[np.argsort(key, kind="stable")]


def cluster_images(
    data,
    method: str = "kmeans",
    k: int | str | None = None,
    *,
    out: str | os.PathLike | None = None,
    params: dict | None = None,
    k_range: tuple[int, int] = DEFAULT_K_RANGE,
    backbone: str | nn.Module = "auto",
    split: str | None = None,
    image_size: int | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    tta: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allow_outside: bool = False,
    normalize: bool = True,
    pca_dim: int | str | None = "auto",
    whiten: bool = False,
    random_state: int | None = 0,
    export_manifest: bool = False,
    map_method: str = "tsne",
    map_sample: int = 2000,
    sheet_size: int = 25,
    gallery_size: int = 24,
    max_clusters_shown: int = 100,
    silhouette_sample: int = 5000,
    adapt: str | None = None,
    adapt_params: dict | None = None,
    progress: bool = True,
) -> ClusteringResult:
    """Group images by what they show, and write a run folder a person can browse.

    Args:
        data: an :class:`~imagerec.Embeddings`, a ``.npz`` from ``imagerec embed``, an
            :class:`~imagerec.ImageSource`, or a data set spec (folder, CSV manifest,
            ``"cifar10"``), embedded with ``backbone`` and cached as ``out/embeddings.npz``.
        method: ``"kmeans"``, ``"minibatch_kmeans"``, ``"dbscan"``, ``"hdbscan"``,
            ``"agglomerative"`` or ``"deep"``.
        k: the number of clusters, or ``"auto"`` (the default, None, for methods that take k);
            must stay None for dbscan and hdbscan, which find it themselves.
        out: run folder; None writes nothing.
        params: the method's own arguments, e.g. ``{"eps": 0.3, "min_samples": 10}`` (dbscan),
            ``{"linkage": "average"}`` (agglomerative), ``{"epochs": 60}`` (deep).
        k_range: inclusive (low, high) candidates for ``k="auto"``.
        backbone: registry name or model that embeds images (see :func:`~imagerec.embed`);
            ``"auto"``: EfficientNet-Lite2 at 160 px for small images (CIFAR-like), else
            EfficientNet-Lite0 at 224 px (see :func:`~imagerec.features.auto_backbone`).
        split: ``"train"``, ``"val"``, ``"test"`` or None (all images) of a data set spec.
        image_size: input side in pixels for embedding (default: the backbone's).
        batch_size: images per forward pass when embedding.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``, for embedding and the deep head.
        max_pixels: decompression-bomb limit per image.
        allow_outside: read CSV manifest rows whose paths lead outside the manifest's folder.
        tta: embed each image as the mean of it and its mirror image.
        normalize: L2-normalise the features (before and after PCA).
        pca_dim: principal components kept; ``"auto"``: 32 for dbscan and hdbscan; for the other
            methods 32 below 5,000 images and 128 from 5,000 on (on 480 to 2,400 images 32 clustered
            better, on 10,000 and more 128: see :class:`~imagerec.features.FeaturePipeline`);
            None: no PCA. ``summary["config"]["pca_dim"]`` records the number used.
        whiten: PCA whitening.
        random_state: seed of everything random.
        export_manifest: also write ``manifest.csv`` (path, cluster name) for ``imagerec train``.
        map_method: ``"tsne"`` (on at most ``map_sample`` images) or ``"pca"`` for ``map.png``.
        map_sample: images drawn on a t-SNE map.
        sheet_size: images per contact sheet.
        gallery_size: images per cluster in ``gallery.html``.
        max_clusters_shown: contact sheets and gallery sections for the largest clusters only.
        silhouette_sample: images the silhouette is computed on.
        adapt: ``"simclr"`` first fine-tunes ``backbone`` on the images themselves, without
            labels (see :func:`~imagerec.features.adapt_backbone`), then embeds them with it at the adapted size;
            None uses the backbone as it is. Worth it where the images differ from ImageNet's
            photos (small images, drawings, medical or satellite images).
        adapt_params: arguments of :func:`~imagerec.features.adapt_backbone`, e.g. ``{"epochs": 8, "image_size": 64}``.
        progress: show the embedding progress bar.

    Returns:
        A :class:`ClusteringResult`. With ``out``: ``assignments.csv``, ``summary.json``,
        ``clusters/<name>.png``, ``map.png``, ``gallery.html``, and as they apply
        ``dendrogram.png``, ``k_distance.png``, ``k_selection.csv``, ``manifest.csv``,
        ``embeddings.npz``.

    Raises:
        ImagerecError: bad arguments, unreadable data, NaN or infinite features, fewer than two
            images, fewer images than clusters.

    Warns:
        ClusteringWarning: k=1, identical images, fewer clusters found than asked for, all noise.
    """
    # 1. validate everything that does not need the features, before the costly embedding
    method = check_method(method)
    k = _check_k(k, method)
    if k == "auto":
        check_k_range(k_range, 10**9)
    pca_dim = _check_pca_dim(pca_dim, method)
    if map_method not in MAP_METHODS:
        raise ImagerecError(f"map_method={map_method!r} is not one of {MAP_METHODS}")
    for name, value in (
        ("map_sample", map_sample),
        ("sheet_size", sheet_size),
        ("gallery_size", gallery_size),
        ("max_clusters_shown", max_clusters_shown),
        ("silhouette_sample", silhouette_sample),
    ):
        check_positive(value, name, integer=True, minimum=1, inclusive=True)
    params = dict(params or {})
    if method == "deep":
        params.setdefault("device", device)
    # unknown parameters and out-of-range values fail now (those relative to N only in fit)
    make_estimator(method, 2 if k == "auto" else k, params, random_state)._check_params(n_samples=2**62)
    run_dir = Path(out) if out is not None else None
    if run_dir is not None and run_dir.exists() and not run_dir.is_dir():
        raise ImagerecError(f"out={run_dir}: is a file; give a folder for the run")
    features = dict(
        backbone=backbone, split=split, image_size=image_size, adapt=adapt, adapt_params=adapt_params,
        batch_size=batch_size, device=device, tta=tta, max_pixels=max_pixels, normalize=normalize, whiten=whiten,
        progress=progress,
    )  # fmt: skip
    view = _View(map_method, map_sample, sheet_size, gallery_size, max_clusters_shown, max_pixels, random_state)

    plan = _Plan(method, k, params, k_range, pca_dim, random_state, silhouette_sample, export_manifest)

    # 2. features: the shared stage (backbone, adaptation, embed or reuse, preparation)
    if not isinstance(data, (Embeddings, ImageSource, np.ndarray)) and not is_embeddings_file(data):
        data = load_images(data, split, max_pixels=max_pixels, allow_outside=allow_outside)  # a bad path fails before the run folder exists
    if run_dir is None:
        return _cluster(data, plan, features, view, None)
    with run_lock(run_dir, "cluster run"):
        return _cluster(data, plan, features, view, run_dir)


@dataclass(frozen=True)
class _Plan:
    """The validated clustering arguments of :func:`cluster_images`."""

    method: str
    k: int | str | None
    params: dict
    k_range: tuple[int, int]
    pca_dim: int | str | None
    random_state: int | None
    silhouette_sample: int
    export_manifest: bool


def _cluster(data, plan: _Plan, features: dict, view: "_View", run_dir: Path | None) -> ClusteringResult:
    """Steps 2 to 5 of :func:`cluster_images`, on validated arguments (under the run folder's lock)."""
    method, k, params, k_range, pca_dim = plan.method, plan.k, plan.params, plan.k_range, plan.pca_dim
    random_state, silhouette_sample = plan.random_state, plan.silhouette_sample
    feats = compute_features(data, cache_dir=run_dir, pca_dim=pca_dim, random_state=random_state, **features)
    emb, source, X, pipeline = feats.embeddings, feats.source, feats.prepared, feats.pipeline
    check_n_samples(len(emb))
    seconds = dict(feats.seconds)
    timer = time.perf_counter()

    # 3. the number of clusters, then the clustering
    selection = None
    if k == "auto":
        selection = select_n_clusters(
            X, method=method, k_range=k_range, params=params, sample_size=silhouette_sample, random_state=random_state
        )
        k = selection.best_k
    elif k is not None:
        check_n_clusters(k, len(X))
    estimator = make_estimator(method, k, params, random_state).fit(X)
    seconds["cluster"] = time.perf_counter() - timer

    # 4. per-image figures and the summary
    labels = estimator.labels_
    names = report.cluster_names(labels)
    distances = _distances(X, labels)
    probabilities = getattr(estimator, "probabilities_", None)
    outliers = _outliers(labels, distances)
    summary = _summary(
        method, k, estimator, emb, X, labels, names, outliers, selection, silhouette_sample, random_state, pipeline
    )
    summary["config"] = {
        "method": method,
        "k": k,
        "params": params,
        "k_range": list(k_range) if selection else None,
        "backbone": emb.backbone,
        "adapt": feats.adapt_info,
        "tta": features["tta"],
        "normalize": features["normalize"],
        "pca_dim": pipeline.pca_dim_,  # "auto" resolved by the number of images
        "whiten": features["whiten"],
        "random_state": random_state,
    }
    result = ClusteringResult(
        labels, list(emb.paths), names, distances, probabilities, outliers, summary, estimator, pipeline, X, selection,
        run_dir,
    )  # fmt: skip

    # 5. the run folder
    if run_dir is not None:
        timer = time.perf_counter()
        _write_tables(result, emb, plan.export_manifest)
        _write_pictures(result, emb.backbone, source, view)
        seconds["report"] = time.perf_counter() - timer
    summary["seconds"] = {key: round(value, 3) for key, value in seconds.items()}
    if run_dir is not None:
        report.write_json(run_dir / "summary.json", summary)
    return result


def _check_k(k, method: str):
    if method not in K_METHODS:
        if k is not None:
            raise ImagerecError(
                f"method={method!r} finds the number of clusters itself; drop k={k!r} (or use one of {', '.join(K_METHODS)})"
            )
        return None
    if k is None or k == "auto":
        return "auto"
    if isinstance(k, str):
        try:
            k = int(k)
        except ValueError:
            raise ImagerecError(f"k={k!r} must be a whole number of clusters or 'auto'") from None
    return check_n_clusters(k)


def _check_pca_dim(pca_dim, method: str) -> int | str | None:
    """The ``pca_dim`` for the feature stage: ``"auto"`` stays ``"auto"`` (resolved there by the
    number of images) except for the density methods, which always get 32."""
    if pca_dim == "auto":
        return AUTO_PCA_DIM.get(method, "auto")  # the others: by the number of images (FeaturePipeline)
    if pca_dim is None:
        return None
    return check_positive(pca_dim, "pca_dim", integer=True, minimum=1, inclusive=True, hint="; try 128, 'auto' or None")


def _distances(X: np.ndarray, labels: np.ndarray) -> np.ndarray:
    distances = np.full(len(X), np.nan)
    kept = labels >= 0
    if kept.any():
        centres = cluster_means(X, labels)
        distances[kept] = np.linalg.norm(X[kept] - centres[labels[kept]], axis=1)
    return distances


def _outliers(labels: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """Noise, or beyond Tukey's fence (Q3 + 1.5 IQR) of the cluster's distances to its centre."""
    outliers = labels < 0
    for label in np.unique(labels[labels >= 0]):
        idx = np.flatnonzero(labels == label)
        if len(idx) >= 4:
            q1, q3 = np.percentile(distances[idx], [25, 75])
            outliers[idx] = distances[idx] > q3 + 1.5 * (q3 - q1)
    return outliers


def _summary(
    method, k, estimator, emb, X, labels, names, outliers, selection, silhouette_sample, random_state, pipeline
) -> dict:
    n = len(labels)
    sizes = {names[int(v)]: int(c) for v, c in zip(*np.unique(labels, return_counts=True)) if v >= 0}
    summary = {
        "method": method,
        "n_images": n,
        "n_clusters": len(sizes),
        "n_clusters_requested": k,
        "sizes": sizes,
        "noise_fraction": float(np.mean(labels < 0)),
        "outliers": int(outliers.sum()),
        "silhouette": sampled_silhouette(X, labels, silhouette_sample, random_state),
        "features": {
            "backbone": emb.backbone,
            "input_dim": int(emb.features.shape[1]),
            "dim": int(X.shape[1]),
            "pca": pipeline.pca_ is not None,
        },
        "params": {
            key: value
            for key, value in estimator.get_params().items()
            if isinstance(value, (int, float, str, bool, type(None)))
        },
        "imagerec_version": __version__,
    }
    if hasattr(estimator, "eps_"):
        summary["eps"] = estimator.eps_
    if selection is not None:
        summary["k_selection"] = {
            "best_k": selection.best_k,
            "scored_with": selection.scored_with,
            "rule": selection.rule,
            "scores": selection.scores,
        }
    if emb.labels is not None:
        summary.update(clustering_scores(emb.labels, labels))
        summary["classes"] = list(emb.classes)
        if getattr(estimator, "neighbors_", None) is not None and estimator.neighbors_.size:
            summary["neighbor_purity"] = neighbor_purity(estimator.neighbors_, emb.labels)
    return summary


@dataclass(frozen=True)
class _View:
    """How much of a run the pictures show (see :func:`cluster_images` for each)."""

    map_method: str
    map_sample: int
    sheet_size: int
    gallery_size: int
    max_clusters_shown: int
    max_pixels: int
    random_state: int | None


def _write_tables(result: ClusteringResult, emb: Embeddings, export_manifest: bool) -> None:
    """``assignments.csv``, ``k_selection.csv`` (k="auto") and ``manifest.csv`` (on request)."""
    run = result.run_dir
    run.mkdir(parents=True, exist_ok=True)
    true = [emb.classes[i] for i in emb.labels] if emb.labels is not None else None
    report.write_assignments(
        run / "assignments.csv", result.paths, result.labels, result.names, result.distances, result.probabilities,
        result.outliers, true,
    )  # fmt: skip
    if result.k_selection is not None:
        columns = ["k", "found", "silhouette", "calinski_harabasz", "davies_bouldin", "mean_rank", "seconds"]
        rows = [[score[c] for c in columns] for score in result.k_selection.scores]
        write_text_atomic(run / "k_selection.csv", report.csv_text(columns, rows))
    if export_manifest:
        written, left_out = report.write_manifest(run / "manifest.csv", result.paths, result.labels, result.names)
        if written == 0:
            raise ImagerecError(
                f"{run / 'manifest.csv'}: no image could be listed (all noise, or images held in arrays such as "
                "the CIFAR batches); cluster image files to export a manifest"
            )
        if left_out:
            warn(f"manifest.csv leaves out {left_out} image(s): noise, or rows of an array that a manifest cannot name")


def _write_pictures(result: ClusteringResult, backbone: str, source, view: _View) -> None:
    """Contact sheets, the map, the dendrogram or k-distance curve, and ``gallery.html``."""
    run, s = result.run_dir, result.summary
    reader = report.ImageReader(result.paths, source, max_pixels=view.max_pixels)
    # 1. one contact sheet per cluster, largest first (noise last, a random sample of it)
    order = sorted((v for v in result.names if v >= 0), key=lambda v: (-s["sizes"][result.names[v]], v))
    shown = order[: view.max_clusters_shown] + ([-1] if -1 in result.names else [])
    sections = []
    for label in shown:
        if label >= 0:
            members, what = result.members(label), "nearest its centre first"
        else:
            noise = np.flatnonzero(result.labels < 0)
            members, what = np.random.default_rng(view.random_state).permutation(noise), "a random sample"
        name, size = result.names[label], len(members)
        sheet = run / "clusters" / f"{name}.png"
        report.contact_sheet(reader, members[: view.sheet_size], f"{name}: {size} images ({what})", sheet)
        top = members[: view.gallery_size]
        sections.append(
            {"name": name, "size": size, "share": size / len(result.labels), "indices": top,
             "captions": [_caption(result, i) for i in top]}
        )  # fmt: skip
    # 2. the 2-D map, and the method's own picture
    idx, coords = report.map_2d(result.features, view.map_method, view.map_sample, view.random_state)
    how = "t-SNE" if view.map_method == "tsne" else "PCA"
    title = f"{s['method']}: {s['n_clusters']} clusters ({how}, {len(idx):,} images)"
    report.plot_map(coords, result.labels[idx], result.names, run / "map.png", title)
    estimator = result.estimator
    if hasattr(estimator, "linkage_matrix_"):
        report.plot_dendrogram(estimator.linkage_matrix_, s["n_clusters"], run / "dendrogram.png")
    if hasattr(estimator, "k_distances_"):
        report.plot_k_distance(
            estimator.k_distances_, estimator.eps_, estimator.min_samples - 1, run / "k_distance.png"
        )
    # 3. the gallery: all of it in one HTML file
    figures = [f"{s['n_images']:,} images", f"{s['n_clusters']} clusters", f"noise {s['noise_fraction']:.1%}"]
    figures += [f"silhouette {s['silhouette']:.3f}"] if s["silhouette"] is not None else []
    figures += [f"{key.upper()} {s[key]:.3f}" for key in ("acc", "nmi", "ari", "purity") if key in s]
    hidden = len(order) - min(len(order), view.max_clusters_shown)
    note = f"{hidden} smaller cluster(s) are not shown; summary.json lists every size." if hidden else ""
    title = f"imagerec clusters: {s['method']}, {backbone}"
    report.write_gallery(run / "gallery.html", title, " | ".join(figures), run / "map.png", sections, reader, note)


def _caption(result: ClusteringResult, i: int) -> str:
    text = f"{result.paths[i]}"
    if np.isfinite(result.distances[i]):
        text += f"\ndistance {result.distances[i]:.4f}"
    if result.probabilities is not None:
        text += f"\nprobability {result.probabilities[i]:.3f}"
    return text
