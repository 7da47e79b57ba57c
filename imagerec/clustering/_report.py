"""The clustering run folder: CSV and JSON for programs, pictures and a gallery for people.

Every file is written atomically. Pictures: one contact sheet per cluster (its most typical
images first), a 2-D map of the embeddings, the dendrogram's top (agglomerative), the k-distance
curve (DBSCAN), and ``gallery.html``, which embeds its thumbnails as data URIs so it opens from
disk in any browser, without a server.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from .._plot import pyplot as _pyplot
from .._plot import save_figure as _save
from .._io import atomic_path, write_text_atomic
from .._decode import display_path
from ..data import DEFAULT_MAX_PIXELS, ImageSource, load_rgb
from ..data import write_manifest as data_write_manifest

NOISE = "noise"


def cluster_names(labels: np.ndarray) -> dict[int, str]:
    """``{label: name}``: ``cluster_00``, ``cluster_01``, ... (wider past 100), ``noise`` for -1."""
    found = sorted(int(v) for v in np.unique(labels))
    width = max(2, len(str(max(found[-1], 0))))
    return {v: NOISE if v < 0 else f"cluster_{v:0{width}d}" for v in found}


def csv_text(header: Sequence[str], rows) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _number(value) -> str:
    return "" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.6g}"


def write_assignments(path: Path, paths, labels, names, distances, probabilities, outliers, true_labels=None) -> None:
    """``assignments.csv``: path, cluster, distance (to the cluster's centre in the prepared
    feature space; empty for noise), probability (HDBSCAN's membership strength, or the deep
    head's; empty for other methods), outlier (0/1), and true_label where the classes are known."""
    header = ["path", "cluster", "distance", "probability", "outlier"] + (
        ["true_label"] if true_labels is not None else []
    )
    rows = []
    for i, p in enumerate(paths):
        row = [
            display_path(p),  # a non-UTF-8 name as \xNN escapes: a UTF-8 CSV cannot hold its bytes
            names[int(labels[i])],
            _number(float(distances[i])),
            "" if probabilities is None else _number(float(probabilities[i])),
            int(outliers[i]),
        ]
        if true_labels is not None:
            row.append(true_labels[i])
        rows.append(row)
    write_text_atomic(path, csv_text(header, rows))


def write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def write_manifest(path: Path, paths, labels, names) -> tuple[int, int]:
    """A CSV manifest ``path,label`` (label: the cluster's name) that ``imagerec.load_images``
    and ``imagerec train`` read: rename the clusters (or the labels) to classes and train.

    Noise images are left out, and so are images that are rows of an array rather than files
    (the CIFAR batches), which a manifest cannot name. Paths are absolute; imagerec records the
    folders they are in, so the manifest reads without ``--allow-outside``.

    Returns:
        (rows written, images left out).
    """
    rows = [(p, names[int(label)]) for p, label in zip(paths, labels) if label >= 0 and os.path.isfile(p)]
    written = data_write_manifest(path, rows)
    return written, len(paths) - written


class ImageReader:
    """Square thumbnails of the clustered images, from their source or their files.

    An image that cannot be read gives None (a blank tile), never an exception.
    """

    def __init__(
        self, paths: Sequence[str], source: ImageSource | None, size: int = 96, max_pixels: int = DEFAULT_MAX_PIXELS
    ):
        self.paths, self.source, self.size, self.max_pixels = paths, source, size, max_pixels
        self._index = {p: i for i, p in enumerate(source.paths)} if source is not None else {}
        self._cache: dict[int, Image.Image | None] = {}

    def thumbnail(self, i: int) -> Image.Image | None:
        if i not in self._cache:
            self._cache[i] = self._read(i)
        return self._cache[i]

    def _read(self, i: int) -> Image.Image | None:
        try:
            if self.paths[i] in self._index:
                image = self.source[self._index[self.paths[i]]][0]
            else:
                image = load_rgb(self.paths[i], self.max_pixels)
        except Exception:  # noqa: BLE001 - a picture that cannot be shown is left blank
            return None
        return ImageOps.fit(image, (self.size, self.size), Image.Resampling.BICUBIC)


def _font(size: int):
    return ImageFont.load_default(size=size)


def contact_sheet(reader: ImageReader, indices: Sequence[int], title: str, path: Path, columns: int = 5) -> None:
    """A PNG grid of thumbnails under a title line (blank tiles for unreadable images)."""
    size, gap, top = reader.size, 4, 26
    columns = max(1, min(columns, len(indices)))
    rows = max(1, -(-len(indices) // columns))
    width = max(columns * (size + gap) + gap, 320)
    sheet = Image.new("RGB", (width, top + rows * (size + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((gap, 5), title, fill="black", font=_font(14))
    for n, i in enumerate(indices):
        x, y = gap + (n % columns) * (size + gap), top + (n // columns) * (size + gap)
        paste_tile(sheet, draw, reader.thumbnail(int(i)), x, y, size)
    with atomic_path(path, suffix=".png") as tmp:
        sheet.save(tmp, format="PNG")


def paste_tile(sheet: Image.Image, draw: ImageDraw.ImageDraw, thumb: Image.Image | None, x: int, y: int, size: int) -> None:
    """One thumbnail of a contact sheet at (x, y); a grey tile where the image could not be read."""
    if thumb is None:
        draw.rectangle([x, y, x + size - 1, y + size - 1], fill=(225, 225, 225))
    else:
        sheet.paste(thumb, (x, y))


def map_2d(features: np.ndarray, method: str, sample: int, random_state: int | None) -> tuple[np.ndarray, np.ndarray]:
    """2-D coordinates of (a sample of) the images for the map.

    Args:
        features: float array (N, D).
        method: ``"tsne"`` (on at most ``sample`` images) or ``"pca"`` (on all, drawn up to
            20,000).
        sample: images drawn at most.
        random_state: seed of the sample and of t-SNE.

    Returns:
        (indices, coords): int64 array (M,) of the images drawn and float array (M, 2).
    """
    from sklearn.decomposition import PCA  # noqa: PLC0415

    n = len(features)
    limit = sample if method == "tsne" else max(sample, 20_000)
    idx = np.arange(n) if n <= limit else np.sort(np.random.default_rng(random_state).choice(n, limit, replace=False))
    x = features[idx].astype(np.float64)
    if method == "tsne" and len(idx) >= 10:
        from sklearn.manifold import TSNE  # noqa: PLC0415

        from threadpoolctl import threadpool_limits  # noqa: PLC0415 - installed with scikit-learn

        if x.shape[1] > 50:
            x = PCA(50, random_state=random_state).fit_transform(x)
        # One thread: t-SNE's OpenMP loops ran 100x slower with two threads on a busy 2-core
        # machine (35 s instead of 0.2 s for 90 images); on one, 2,000 images take about 7 s.
        with threadpool_limits(1):
            coords = TSNE(
                2, perplexity=min(30.0, (len(idx) - 1) / 3), init="pca", random_state=random_state
            ).fit_transform(x)
    elif x.shape[1] >= 2 and len(idx) >= 2:
        coords = PCA(2, random_state=random_state).fit_transform(x)
    else:
        coords = np.column_stack([x[:, 0], np.zeros(len(x))])
    return idx, coords


def plot_map(coords: np.ndarray, labels: np.ndarray, names: dict[int, str], path: Path, title: str) -> None:
    """Scatter plot of the 2-D map coloured by cluster (noise in grey)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    noise = labels < 0
    size = float(np.clip(3000 / max(len(labels), 1), 3, 25))  # dots that neither vanish nor overlap
    if noise.any():
        ax.scatter(coords[noise, 0], coords[noise, 1], s=size, c="lightgrey", label=NOISE, linewidths=0)
    kept = ~noise
    ax.scatter(coords[kept, 0], coords[kept, 1], s=size, c=[cmap(v % cmap.N) for v in labels[kept]], linewidths=0)
    if len(names) <= 20:
        for label, name in names.items():
            if label >= 0:
                ax.scatter([], [], s=20, color=cmap(label % cmap.N), label=name)
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    _save(fig, path)


def plot_dendrogram(Z: np.ndarray, n_clusters: int, path: Path, top: int = 30) -> None:
    """The top ``top`` merges of the tree, coloured below the cut into ``n_clusters``."""
    from scipy.cluster.hierarchy import dendrogram  # noqa: PLC0415

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    m = len(Z) + 1
    k = min(max(n_clusters, 1), m)
    cut = (Z[m - k - 1, 2] + Z[m - k, 2]) / 2 if 1 < k < m else (Z[-1, 2] * 1.01 if k == 1 else 0)
    dendrogram(
        Z,
        truncate_mode="lastp",
        p=min(max(top, k), m),
        color_threshold=cut,
        ax=ax,
        show_leaf_counts=True,
        leaf_font_size=7,
    )
    if 1 < k < m:
        ax.axhline(cut, color="grey", ls="--", lw=1)
    ax.set_ylabel("merge height")
    ax.set_title(f"top of the dendrogram: {k} clusters below the dashed line; (n) = images under a node")
    _save(fig, path)


def plot_k_distance(k_distances: np.ndarray, eps: float, k: int, path: Path) -> None:
    """DBSCAN's sorted k-distance curve, with the eps used."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.sort(k_distances), lw=1)
    ax.axhline(eps, color="red", ls="--", lw=1, label=f"eps = {eps:.4g}")
    ax.set_xlabel("images, sorted")
    ax.set_ylabel(f"distance to the {k}-th nearest neighbour")
    ax.legend()
    ax.set_title("k-distance curve (images above eps are not core points)")
    _save(fig, path)


def _data_uri(image: Image.Image, fmt: str = "JPEG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt, quality=85) if fmt == "JPEG" else image.save(buf, format=fmt)
    mime = "jpeg" if fmt == "JPEG" else fmt.lower()
    return f"data:image/{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em}h2{font-size:1.1em;margin:1.4em 0 .4em}h2 small{font-weight:normal;color:#666}
.summary{color:#444}.map{max-width:100%;border:1px solid #ddd;background:white}
nav a{display:inline-block;margin:0 .6em .3em 0;font-size:.9em}
.grid{display:flex;flex-wrap:wrap;gap:4px}.grid img{width:96px;height:96px;object-fit:cover;border:1px solid #ddd;background:#eee}
.blank{display:inline-block;width:96px;height:96px;background:#e5e5e5}
"""


def write_gallery(
    path: Path,
    title: str,
    summary_line: str,
    map_png: Path | None,
    clusters: list[dict],
    reader: ImageReader,
    note: str = "",
) -> None:
    """A self-contained HTML page: the map, then each cluster's most typical thumbnails.

    Args:
        path: the ``.html`` file.
        title: page heading.
        summary_line: one line of figures under it.
        map_png: the 2-D map, embedded when given.
        clusters: dicts ``{"name", "size", "share", "indices", "captions"}`` in display order.
        reader: where the thumbnails come from.
        note: a line at the end (e.g. how many clusters were left out).
    """
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p class='summary'>{html.escape(summary_line)}</p>",
    ]
    if map_png is not None and map_png.is_file():
        uri = "data:image/png;base64," + base64.b64encode(map_png.read_bytes()).decode("ascii")
        parts.append(f"<p><img class='map' alt='2-D map of the embeddings' src='{uri}'></p>")
    parts.append(
        "<nav>"
        + "".join(f"<a href='#{html.escape(c['name'])}'>{html.escape(c['name'])} ({c['size']})</a>" for c in clusters)
        + "</nav>"
    )
    for c in clusters:
        parts.append(
            f"<section id='{html.escape(c['name'])}'><h2>{html.escape(c['name'])} <small>{c['size']} images, {c['share']:.1%}</small></h2><div class='grid'>"
        )
        for i, caption in zip(c["indices"], c["captions"]):
            thumb = reader.thumbnail(int(i))
            if thumb is None:
                parts.append(f"<span class='blank' title='{html.escape(caption, quote=True)}'></span>")
            else:
                parts.append(
                    f"<img loading='lazy' alt='' title='{html.escape(caption, quote=True)}' src='{_data_uri(thumb)}'>"
                )
        parts.append("</div></section>")
    if note:
        parts.append(f"<p class='summary'>{html.escape(note)}</p>")
    parts.append("</body></html>\n")
    write_text_atomic(path, "".join(parts))
